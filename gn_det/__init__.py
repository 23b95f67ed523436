"""gn-det: Group Normalization (Wu & He, ECCV 2018) for detectron2's Mask R-CNN.

``import gn_det`` registers gn-det's backbones and heads; ``add_gn_config`` adds its config keys.
"""
from .errors import InputError
from .config import add_gn_config, get_gn_cfg
from . import modeling  # noqa: F401  (registration)

__version__ = "0.1.0"
