"""The one norm concept: GroupNormSpec numerics (LN and IN as its extremes), group resolution, errors; every
other norm name is detectron2's own (RetinaNet keeps one BN per level)."""
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.errors import InputError  # noqa: E402
from gn_det.layers import NORM_NAMES, GroupNorm, GroupNormSpec, num_groups_for  # noqa: E402


def test_one_group_is_layer_norm_over_chw():
    x = torch.randn(2, 12, 5, 7)
    gn = GroupNormSpec(num_groups=1)(12)
    torch.testing.assert_close(gn(x), F.layer_norm(x, x.shape[1:], eps=gn.eps), atol=1e-5, rtol=1e-5)


def test_c_groups_is_instance_norm():
    x = torch.randn(2, 12, 5, 7)
    gn = GroupNormSpec(dim_per_group=1)(12)
    assert gn.num_groups == 12
    torch.testing.assert_close(gn(x), F.instance_norm(x, eps=gn.eps), atol=1e-5, rtol=1e-5)


def test_group_statistics_by_hand():
    x = torch.randn(3, 8, 4, 4)
    gn = GroupNormSpec(num_groups=4, eps=1e-5)(8)
    with torch.no_grad():
        gn.weight.uniform_()
        gn.bias.uniform_()
    groups = x.view(3, 4, -1)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)
    expected = ((groups - mean) / (var + 1e-5).sqrt()).view_as(x) * gn.weight.view(1, -1, 1, 1) + gn.bias.view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(gn(x), expected, atol=1e-5, rtol=1e-5)


def test_group_setting_resolution():
    assert num_groups_for(256, num_groups=32) == 32
    assert num_groups_for(256, num_groups=32, dim_per_group=16) == 16  # C/G wins when set
    assert num_groups_for(64, dim_per_group=16) == 4
    assert num_groups_for(48, num_groups=32) is None
    assert num_groups_for(48, dim_per_group=32) is None


def test_spec_builds_gn_and_other_names_stay_detectron2s():
    assert isinstance(GroupNormSpec()(64), GroupNorm)
    assert isinstance(GroupNormSpec()(64), torch.nn.GroupNorm)  # what weight_decay_norm looks for
    assert set(NORM_NAMES) >= {"GN", "FrozenBN", "BN", "SyncBN", "naiveSyncBN", ""}
    from gn_det.modeling import with_gn_specs

    cfg = get_gn_cfg(None, ["MODEL.BACKBONE.NAME", "build_gn_resnet_fpn_backbone", "MODEL.RESNETS.NORM", "FrozenBN",
                            "MODEL.FPN.NORM", "GN", "MODEL.GN.NUM_GROUPS", "16"])
    resolved = with_gn_specs(cfg)
    assert resolved.MODEL.RESNETS.NORM == "FrozenBN" and resolved.MODEL.ROI_BOX_HEAD.NORM == ""
    assert isinstance(resolved.MODEL.FPN.NORM, GroupNormSpec) and resolved.MODEL.FPN.NORM(64).num_groups == 16


def test_unknown_norm_lists_allowed_names():
    with pytest.raises(InputError, match=r"MODEL.FPN.NORM='GroupNorm' is not a norm; choose one of 'GN'"):
        get_gn_cfg(None, ["MODEL.FPN.NORM", "GroupNorm"])


@pytest.mark.parametrize("field, value, rule", [
    ("num_groups", 0, "must be >= 1"),
    ("dim_per_group", 0, "must be -1"),
    ("eps", 0.0, "must be > 0"),
])
def test_group_settings_have_one_check_and_one_format(field, value, rule):
    """One check (GroupNormSpec) gives one format in both config systems, naming the key as it was written."""
    with pytest.raises(InputError, match=rf"^model\.backbone\.norm\.{field}={value} {rule}"):
        GroupNormSpec(site="model.backbone.norm", **{field: value})
    with pytest.raises(InputError, match=rf"^command line: MODEL\.GN\.{field.upper()}={value} {rule}"):
        get_gn_cfg(None, [f"MODEL.GN.{field.upper()}", str(value)])


def test_retinanet_bn_keeps_one_norm_per_level_like_stock_detectron2():
    """A norm name other than "GN" reaches detectron2 as the string it reads: RetinaNetHead builds one BN per
    FPN level for "BN", as stock detectron2 does (a shared callable would share one BN across levels)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    opts = ["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NORM", "BN", "MODEL.RESNETS.DEPTH", "18",
            "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.RESNETS.NORM", "FrozenBN"]
    stock_cfg = get_cfg()
    stock_cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.BACKBONE.NAME",
                               "build_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
                               "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']",
                               *opts])
    ours = get_gn_cfg(None, ["MODEL.META_ARCHITECTURE", "GNRetinaNet", "MODEL.BACKBONE.NAME",
                             "build_gn_retinanet_resnet_fpn_backbone", "MODEL.RESNETS.OUT_FEATURES",
                             "['res3', 'res4', 'res5']", "MODEL.FPN.IN_FEATURES", "['res3', 'res4', 'res5']", *opts])

    def tree(model):
        return [(name, type(m).__name__) for name, m in model.head.named_modules()]

    stock, gn = build_model(stock_cfg), build_model(ours)
    assert tree(gn) == tree(stock)
    norms = [m for name, m in gn.head.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == len({id(m) for m in norms}) > 5  # one per conv per level


def test_bfloat16_input_is_normalised_accurately():
    x = torch.randn(2, 64, 16, 16) * 30 + 100  # large mean: bf16 statistics would lose digits
    gn = GroupNormSpec()(64)
    reference = gn(x)
    out = gn(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # only the bf16 rounding of input and output remains
    assert (out.float() - reference).abs().max() < 0.1
