from .norm import GN, NORM_NAMES, GroupNorm, GroupNormSpec, check_norm_sites, num_groups_for
from .ws import WSConv2d, standardize_weight, use_ws_convs
