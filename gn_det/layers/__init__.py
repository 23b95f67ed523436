from .norm import NORM_NAMES, GroupNorm, check_norm_sites, norm_factory, num_groups_for
from .ws import WSConv2d, standardize_weight, use_ws_convs
