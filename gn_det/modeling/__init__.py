# Importing these modules registers gn-det's backbones, heads and meta-architecture with detectron2.
from . import backbone, heads, meta_arch
from .meta_arch import GNGeneralizedRCNN
from .norm_sites import finish_norm_sites, gn_spec, with_gn_specs
