from .norm import NORM_NAMES, GroupNorm, check_norm_sites, norm_factory, num_groups_for
from .ws import WSConv2d, convert_to_ws, standardize_weight
