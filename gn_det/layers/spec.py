"""GroupNorm as a value for detectron2's LazyConfig: ``norm=gn_det.GN(num_groups=16)``.

detectron2's ``get_norm(norm, channels)`` accepts a callable ``channels -> nn.Module``. A lambda or a
``functools.partial`` would do at build time, but ``LazyConfig.save`` cannot write either as YAML. So
:func:`GN` returns a ``LazyCall`` node of :class:`GroupNormSpec`: plain keywords that save as YAML and that
``instantiate`` turns into a :class:`GroupNormSpec`. detectron2's builders then call that object with each
layer's channel count.
"""
from detectron2.config import LazyCall

from gn_det.errors import InputError

from .norm import GroupNorm, num_groups_for


class GroupNormSpec:
    """Builds gn-det's :class:`~gn_det.layers.norm.GroupNorm` for a layer of ``channels`` channels.

    ``num_groups`` is G. ``dim_per_group`` > 0 fixes C/G instead, so G follows each layer's width.
    ``eps`` is ε in Eq. 2. ``site`` names the config field the spec is assigned to, such as
    ``model.backbone.bottom_up.stages.norm``. :func:`gn_det.lazy.set_norm` fills it in, and so does the lazy
    training path for fields that were set directly. It only appears in error messages.
    """

    def __init__(self, num_groups=32, dim_per_group=-1, eps=1e-5, site=""):
        where = f"{site}: " if site else ""
        if dim_per_group <= 0 and num_groups < 1:
            raise InputError(f"{where}GN num_groups={num_groups} must be >= 1 (or set dim_per_group)")
        if dim_per_group == 0 or dim_per_group < -1:
            raise InputError(f"{where}GN dim_per_group={dim_per_group} must be -1 (off) or >= 1")
        if not eps > 0:
            raise InputError(f"{where}GN eps={eps} must be > 0")
        self.num_groups, self.dim_per_group, self.eps, self.site = num_groups, dim_per_group, eps, site

    def setting(self):
        """The active group setting, as it is written in the config."""
        if self.dim_per_group > 0:
            return f"dim_per_group={self.dim_per_group}"
        return f"num_groups={self.num_groups}"

    def __call__(self, channels):
        groups = num_groups_for(channels, self.num_groups, self.dim_per_group)
        if groups is None:
            # get_norm passes only the channel count: the config field is the most precise name available
            raise InputError(
                f"{self.site or 'GN'}: {channels} channels cannot be split into groups by GN {self.setting()}"
            )
        return GroupNorm(groups, channels, eps=self.eps)

    def __repr__(self):
        return f"GroupNormSpec({self.setting()}, eps={self.eps})"


def GN(num_groups=32, dim_per_group=-1, eps=1e-5):  # noqa: N802  (named like the norm, as detectron2's "GN")
    """A LazyConfig value for any ``norm`` / ``conv_norm`` field: gn-det's GroupNorm with G = ``num_groups``
    groups, or C/G = ``dim_per_group`` channels per group when that is > 0, and ε = ``eps``.

    The settings are checked here, at config time, and raise :class:`gn_det.InputError`.
    """
    GroupNormSpec(num_groups, dim_per_group, eps)
    return LazyCall(GroupNormSpec)(num_groups=num_groups, dim_per_group=dim_per_group, eps=eps)
