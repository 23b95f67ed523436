"""GN+WS: the standardised weight's statistics, and WS models from every GN config."""
import glob
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import CONFIG_DIR, GN_FPN, TINY_OPTS  # noqa: E402
from gn_det.config import NORM_SITE_KEYS, get_gn_cfg, select  # noqa: E402
from gn_det.layers import WSConv2d, standardize_weight  # noqa: E402
from gn_det.layers.ws import normed_convs  # noqa: E402

GN_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if any(select(get_gn_cfg(p), key) == "GN" for key in NORM_SITE_KEYS)
)


def test_standardized_weight_has_zero_mean_unit_variance_per_output_channel():
    weight = torch.randn(16, 8, 3, 3) * 5 + 2
    w = standardize_weight(weight).flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(16), atol=1e-4, rtol=0)


@pytest.mark.zoo
@pytest.mark.parametrize("path", GN_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_ws_model_builds_from_every_gn_config(path):
    model = build_model(get_gn_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.GN.WS", "True"]))
    assert any(isinstance(m, WSConv2d) for m in model.modules())
    assert not list(normed_convs(model))  # no conv that a norm follows is left a plain conv


def test_ws_reaches_the_retinanet_head_whose_norms_follow_plain_convs():
    """detectron2's RetinaNetHead puts each GroupNorm after an nn.Conv2d in a Sequential."""
    opts = TINY_OPTS + ["MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.GN.WS", "True"]
    model = build_model(get_gn_cfg(os.path.join(CONFIG_DIR, "COCO-Detection", "retinanet_R_50_FPN_3x_gn.yaml"), opts))
    for subnet in (model.head.cls_subnet, model.head.bbox_subnet):
        convs = [m for m in subnet if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 4 and all(isinstance(m, WSConv2d) and m.norm is None for m in convs)
        assert all(isinstance(subnet[i + 1], torch.nn.GroupNorm) for i, m in enumerate(subnet) if m in convs)
    conv = model.head.cls_subnet[0]
    x = torch.rand(1, conv.in_channels, 8, 8)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, standardize_weight(conv.weight), conv.bias,
                                                                    padding=1))
    assert not isinstance(model.head.cls_score, WSConv2d)  # no norm follows the predictors


def test_ws_keeps_parameter_names_and_changes_outputs():
    plain = build_model(get_gn_cfg(GN_FPN, TINY_OPTS))
    ws = build_model(get_gn_cfg(GN_FPN, TINY_OPTS + ["MODEL.GN.WS", "True"]))
    assert list(plain.state_dict()) == list(ws.state_dict())
    ws.load_state_dict(plain.state_dict())
    x = torch.rand(1, 3, 64, 64)
    conv = plain.backbone.bottom_up.stem.conv1
    ws_conv = ws.backbone.bottom_up.stem.conv1
    assert isinstance(ws_conv, WSConv2d) and not isinstance(conv, WSConv2d)
    expected = torch.nn.functional.conv2d(x, standardize_weight(conv.weight), None, 2, 3)
    torch.testing.assert_close(ws_conv(x), conv.norm(expected))  # the stem applies its ReLU outside


@pytest.mark.parametrize("fast", [False, True], ids=["d2_path", "cpu_fast_path"])
def test_every_normed_conv_that_runs_is_a_ws_conv(fast):
    # FPN's forward reads its convs from plain lists, so a conv left there unconverted would still run
    cfg = get_gn_cfg(GN_FPN, TINY_OPTS + ["MODEL.GN.WS", "True", "MODEL.CPU_FAST_PATH", str(fast)])
    model = build_model(cfg).eval()
    fpn = model.backbone
    assert all(c is getattr(fpn, f"fpn_lateral{i}") for c, i in zip(fpn.lateral_convs, (5, 4, 3, 2)))
    assert all(c is getattr(fpn, f"fpn_output{i}") for c, i in zip(fpn.output_convs, (5, 4, 3, 2)))
    ran = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and getattr(m, "norm", None) is not None:
            m.register_forward_hook(lambda mod, inputs, out: ran.append(mod))
    with torch.no_grad():
        model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8)}])
    assert len({id(m) for m in ran}) == sum(1 for m in model.modules() if isinstance(m, WSConv2d)) > 20
    assert all(type(m) is WSConv2d for m in ran)
    assert [m for m in model.modules() if isinstance(m, WSConv2d) and m.weight.is_meta] == []
