"""The one norm factory of gn-det: every norm site of every gn-det builder gets its layer from here.

detectron2's ``get_norm`` accepts either a name (its "GN" is fixed at 32 groups) or a callable
``channels -> nn.Module``; gn-det passes callables made by :func:`norm_factory`, so the group setting of the
config (``MODEL.GN``) reaches every site.
"""
import functools

from torch import nn

from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, get_norm

from gn_det.errors import InputError

# Names accepted at every norm site. "" means no norm (the conv then keeps its bias).
NORM_NAMES = ("GN", "FrozenBN", "BN", "SyncBN", "naiveSyncBN", "")


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He, 2018, Eq. 1-7).

    It subclasses ``nn.GroupNorm`` so that detectron2's ``get_default_optimizer_params`` treats γ/β as norm
    parameters (``SOLVER.WEIGHT_DECAY_NORM``). Under autocast no cast is needed to keep it accurate: CUDA
    autocast runs ``group_norm`` in float32, and PyTorch's CPU kernel accumulates bfloat16 statistics in
    float32 (an explicit float32 copy was measured no more accurate, and slower: docs/SPEED.md).
    ``MODEL.CPU_FAST_PATH`` builds its subclass :class:`gn_det.cpu.NCHWCopyGroupNorm` instead.
    """


class UnsplittableGroupNorm(nn.Module):
    """Placeholder built where the group setting cannot split a layer's channels.

    The factory only sees a channel count; returning this instead of raising lets the build finish so that
    :func:`check_norm_sites` can name the full module path of the offending layer.
    """

    def __init__(self, num_channels, setting):
        super().__init__()
        self.num_channels = num_channels
        self.setting = setting

    def extra_repr(self):
        return f"{self.num_channels} channels, {self.setting}"

    def forward(self, x):
        raise RuntimeError(f"GroupNorm with {self.extra_repr()} cannot run; see check_norm_sites")


def num_groups_for(channels, num_groups=32, dim_per_group=-1):
    """G for a layer of ``channels`` channels: C/DIM_PER_GROUP when DIM_PER_GROUP > 0, else NUM_GROUPS.

    Returns None when the setting does not divide the channels.
    """
    if dim_per_group > 0:
        return channels // dim_per_group if channels % dim_per_group == 0 else None
    return num_groups if channels % num_groups == 0 else None


def make_group_norm(channels, num_groups=32, dim_per_group=-1, eps=1e-5, group_norm=GroupNorm):
    groups = num_groups_for(channels, num_groups, dim_per_group)
    if groups is None:
        setting = (
            f"MODEL.GN.DIM_PER_GROUP={dim_per_group}" if dim_per_group > 0 else f"MODEL.GN.NUM_GROUPS={num_groups}"
        )
        return UnsplittableGroupNorm(channels, setting)
    return group_norm(groups, channels, eps=eps)


def norm_factory(name, num_groups=32, dim_per_group=-1, eps=1e-5, key="norm", group_norm=GroupNorm):
    """A detectron2 ``norm`` argument for the norm called ``name``.

    Returns "" (no norm) for "", else a callable ``channels -> nn.Module``. ``key`` names the config key the
    name came from, for the error on an unknown name; ``group_norm`` is the GroupNorm class "GN" builds.
    """
    if callable(name):
        return name
    if name not in NORM_NAMES:
        raise InputError(f"{key}={name!r} is not a norm; choose one of {', '.join(map(repr, NORM_NAMES))}")
    if name == "":
        return ""
    if name == "GN":
        return functools.partial(make_group_norm, num_groups=num_groups, dim_per_group=dim_per_group, eps=eps,
                                 group_norm=group_norm)
    return {"FrozenBN": FrozenBatchNorm2d, "naiveSyncBN": NaiveSyncBatchNorm}.get(
        name, functools.partial(get_norm, name)
    )


def check_norm_sites(module, prefix):
    """Raise a one-line InputError naming the first layer whose channels the group setting cannot split."""
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, UnsplittableGroupNorm):
            raise InputError(
                f"{name}: {child.num_channels} channels cannot be split into groups by {child.setting}"
            )
