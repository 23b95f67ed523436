"""The norm factory: GroupNorm numerics (LN and IN as its extremes), group resolution, errors."""
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from gn_det.layers import NORM_NAMES, GroupNorm, norm_factory, num_groups_for  # noqa: E402


def test_one_group_is_layer_norm_over_chw():
    x = torch.randn(2, 12, 5, 7)
    gn = norm_factory("GN", num_groups=1)(12)
    torch.testing.assert_close(gn(x), F.layer_norm(x, x.shape[1:], eps=gn.eps), atol=1e-5, rtol=1e-5)


def test_c_groups_is_instance_norm():
    x = torch.randn(2, 12, 5, 7)
    gn = norm_factory("GN", dim_per_group=1)(12)
    assert gn.num_groups == 12
    torch.testing.assert_close(gn(x), F.instance_norm(x, eps=gn.eps), atol=1e-5, rtol=1e-5)


def test_group_statistics_by_hand():
    x = torch.randn(3, 8, 4, 4)
    gn = norm_factory("GN", num_groups=4, eps=1e-5)(8)
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


def test_factory_types():
    assert isinstance(norm_factory("GN")(64), GroupNorm)
    assert isinstance(norm_factory("GN")(64), torch.nn.GroupNorm)  # what weight_decay_norm looks for
    assert isinstance(norm_factory("FrozenBN")(64), FrozenBatchNorm2d)
    assert isinstance(norm_factory("BN")(64), torch.nn.BatchNorm2d)
    assert isinstance(norm_factory("SyncBN")(64), torch.nn.SyncBatchNorm)
    assert norm_factory("") == ""
    assert set(NORM_NAMES) == {"GN", "FrozenBN", "BN", "SyncBN", "naiveSyncBN", ""}


def test_unknown_norm_lists_allowed_names():
    with pytest.raises(ValueError, match=r"MODEL.FPN.NORM='GroupNorm' is not a norm; choose one of 'GN'"):
        norm_factory("GroupNorm", key="MODEL.FPN.NORM")


def test_bfloat16_input_is_normalised_accurately():
    x = torch.randn(2, 64, 16, 16) * 30 + 100  # large mean: bf16 statistics would lose digits
    gn = norm_factory("GN")(64)
    reference = gn(x)
    out = gn(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # only the bf16 rounding of input and output remains
    assert (out.float() - reference).abs().max() < 0.1
