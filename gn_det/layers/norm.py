"""The one norm concept of gn-det: :class:`GroupNormSpec`, the only GroupNorm constructor of both config systems.

detectron2's ``get_norm(norm, channels)`` takes a norm name (its "GN" is fixed at 32 groups) or a callable
``channels -> nn.Module``. A :class:`GroupNormSpec` is such a callable: YAML configs turn ``MODEL.GN`` into one
(:meth:`GroupNormSpec.from_config`) and hand it to detectron2's builders wherever a norm key says "GN"; Python
configs write ``gn_det.GN(...)``, a ``LazyCall`` of the same class. Every other norm name stays a string, so
detectron2 builds it exactly as it would (``RetinaNetHead`` keeps one BN per FPN level for "BN"/"SyncBN").
"""
from torch import nn

from detectron2.config import LazyCall

from gn_det.errors import InputError

# Every norm name a gn-det norm site accepts: "GN" (gn-det's, following the group setting) and the names
# detectron2's get_norm reads as strings; "" means no norm (the conv then keeps its bias).
NORM_NAMES = ("GN", "FrozenBN", "BN", "SyncBN", "naiveSyncBN", "naiveSyncBN_N", "nnSyncBN", "LN", "")


class GroupNorm(nn.GroupNorm):
    """Group Normalization (Wu & He, 2018, Eq. 1-7).

    It subclasses ``nn.GroupNorm`` so that detectron2's ``get_default_optimizer_params`` treats γ/β as norm
    parameters (``SOLVER.WEIGHT_DECAY_NORM``). Under autocast no cast is needed to keep it accurate: CUDA
    autocast runs ``group_norm`` in float32, and PyTorch's CPU kernel accumulates bfloat16 statistics in
    float32. ``MODEL.CPU_FAST_PATH`` builds its subclass :class:`gn_det.cpu.NCHWCopyGroupNorm` instead.
    """


class UnsplittableGroupNorm(nn.Module):
    """Built where the group setting cannot split a layer's channels.

    A spec only sees a channel count; building this instead of raising lets the build finish so that
    :func:`check_norm_sites` names the full module path of the offending layer. It never runs.
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
    """G for a layer of ``channels`` channels: C/dim_per_group when dim_per_group > 0, else num_groups.
    None when the setting does not divide the channels."""
    if dim_per_group > 0:
        return channels // dim_per_group if channels % dim_per_group == 0 else None
    return num_groups if channels % num_groups == 0 else None


class GroupNormSpec:
    """Builds gn-det's GroupNorm for a layer of ``channels`` channels: ``spec(channels)``.

    ``num_groups`` is G (Sec. 3.1); ``dim_per_group`` > 0 fixes C/G instead, so G follows each layer's width
    (Table 3); ``eps`` is ε in Eq. 2. ``site`` names where the setting was written (``MODEL.GN`` in a YAML config,
    a field such as ``model.backbone.norm`` in a Python one); it appears in error messages only.
    ``norm_class`` is the GroupNorm class built (``MODEL.CPU_FAST_PATH`` passes ``NCHWCopyGroupNorm``).
    The settings are checked here, the one place gn-det checks them.
    """

    def __init__(self, num_groups=32, dim_per_group=-1, eps=1e-5, site="", norm_class=GroupNorm):
        self.num_groups, self.dim_per_group, self.eps, self.site = num_groups, dim_per_group, eps, site
        self.norm_class = norm_class
        if dim_per_group <= 0 and num_groups < 1:
            raise InputError(f"{self.key('num_groups')}={num_groups} must be >= 1 (or set {self.key('dim_per_group')})")
        if dim_per_group == 0 or dim_per_group < -1:
            raise InputError(f"{self.key('dim_per_group')}={dim_per_group} must be -1 (off) or >= 1")
        if not eps > 0:
            raise InputError(f"{self.key('eps')}={eps} must be > 0")

    @classmethod
    def from_config(cls, cfg, norm_class=GroupNorm):
        """The spec of a YAML config's ``MODEL.GN``."""
        gn = cfg.MODEL.GN
        return cls(gn.NUM_GROUPS, gn.DIM_PER_GROUP, gn.EPS, site="MODEL.GN", norm_class=norm_class)

    def key(self, field):
        """Where ``field`` was written, as the config system writes it: ``MODEL.GN.NUM_GROUPS`` in a YAML config
        (upper-case keys), ``model.backbone.norm.num_groups`` in a Python one, ``num_groups`` without a site."""
        if not self.site:
            return field
        return f"{self.site}.{field.upper() if self.site.isupper() else field}"

    def setting(self):
        """The active group setting, as written."""
        if self.dim_per_group > 0:
            return f"{self.key('dim_per_group')}={self.dim_per_group}"
        return f"{self.key('num_groups')}={self.num_groups}"

    def __call__(self, channels):
        groups = num_groups_for(channels, self.num_groups, self.dim_per_group)
        if groups is None:
            return UnsplittableGroupNorm(channels, self.setting())
        return self.norm_class(groups, channels, eps=self.eps)

    def __repr__(self):
        setting = f"dim_per_group={self.dim_per_group}" if self.dim_per_group > 0 else f"num_groups={self.num_groups}"
        return f"GroupNormSpec({setting}, eps={self.eps})"


def GN(num_groups=32, dim_per_group=-1, eps=1e-5):  # noqa: N802  (named like the norm, as detectron2's "GN")
    """A LazyConfig value for any ``norm`` / ``conv_norm`` field: a ``LazyCall`` of :class:`GroupNormSpec`
    (plain keywords, so ``LazyConfig.save`` writes it as YAML). The settings are checked here, at config time."""
    GroupNormSpec(num_groups, dim_per_group, eps)
    return LazyCall(GroupNormSpec)(num_groups=num_groups, dim_per_group=dim_per_group, eps=eps)


def check_norm_sites(module, prefix=""):
    """Raise a one-line InputError naming the first layer whose channels the group setting cannot split."""
    for name, child in module.named_modules(prefix=prefix):
        if isinstance(child, UnsplittableGroupNorm):
            raise InputError(f"{name}: {child.num_channels} channels cannot be split into groups by {child.setting}")
