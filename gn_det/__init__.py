"""gn-det: Group Normalization (Wu & He, ECCV 2018) for detectron2's Mask R-CNN.

``import gn_det`` registers gn-det's backbones and heads; ``add_gn_config`` adds its config keys (YAML configs);
``GN(...)`` and ``gn_det.lazy`` put gn-det's GroupNorm into detectron2's LazyConfig (Python configs).
"""
from .errors import InputError
from .config import add_gn_config, get_gn_cfg
from .layers.norm import GN, GroupNormSpec
from . import modeling  # noqa: F401  (registration)
from . import lazy  # noqa: F401  (gn_det.lazy.set_norm and the other LazyConfig helpers)

__version__ = "0.1.0"
