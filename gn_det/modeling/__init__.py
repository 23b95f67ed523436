# Importing these modules registers gn-det's backbones, heads and meta-architecture with detectron2.
from . import backbone, heads
from .norm_sites import finish_norm_sites, with_norm_factories
