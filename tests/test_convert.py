"""timm / torchvision ResNets converted by gn_det.checkpoint compute what the source computes, and bad inputs fail
in one line naming the first mismatched key. No downloads: every source network has random weights."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
import torchvision  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from conftest import CONFIG_DIR, REPO, tool_exit_message, tool_main  # noqa: E402
from gn_det.checkpoint import (  # noqa: E402
    WeightsMismatchError,
    check_weights_for_model,
    convert_resnet_state_dict,
    convert_weights,
    load_converted,
    load_source_state_dict,
)
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.errors import InputError  # noqa: E402
from gn_det.analysis.random_inputs import random_detection_batch  # noqa: E402

COCO = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation")
GN_TIMM = os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_gn_timm.yaml")
BNSTAR_TORCHVISION = os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_bnstar_torchvision.yaml")
GN_C4 = os.path.join(COCO, "mask_rcnn_R_50_C4_2x_gn.yaml")
# what the converted weights expect of the input (a C4 config written for Detectron's weights lacks them)
TIMM_INPUT = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]",
              "MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]", "MODEL.RESNETS.STRIDE_IN_1X1", "False"]
STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


def gn_cfg(path, *opts):
    return get_gn_cfg(path, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])


def randomize_norms(model, seed=0):
    """Random γ/β (and, for BN, running statistics of random data) so that a misplaced norm cannot go unseen."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        batch_norms = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
        if batch_norms:
            for m in batch_norms:
                m.momentum = None  # cumulative average of the batches below
            model.train()
            for _ in range(2):
                model(torch.randn(4, 3, 64, 64, generator=gen))
    return model.eval()


def source_stages(model, x):
    """layer1..layer4 outputs of a timm/torchvision ResNet, keyed by detectron2's stage names."""
    outputs = {}
    hooks = [getattr(model, layer).register_forward_hook(lambda m, i, out, name=name: outputs.__setitem__(name, out))
             for name, layer in STAGES.items()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return outputs


def assert_same_stages(source, bottom_up, size=64):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))  # already normalized input
    expected = source_stages(source.eval(), x)
    bottom_up.eval()
    with torch.no_grad():
        got = bottom_up(x)
    for name in STAGES:
        assert got[name].shape == expected[name].shape, name
        diff = (got[name] - expected[name]).abs().max().item()
        assert diff <= 1e-4, f"{name}: max abs diff {diff}"


def load_model(cfg, weights):
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    check_weights_for_model(model, weights)
    return model


@pytest.fixture(scope="module")
def timm_gn_r50(tmp_path_factory):
    """A random timm resnet50_gn, its saved state dict and the converted checkpoint."""
    timm = pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("timm")
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet50_gn", pretrained=False))
    source = root / "resnet50_gn.pth"
    torch.save(model.state_dict(), source)
    converted = root / "timm_resnet50_gn.pkl"
    convert_weights(str(source), str(converted))
    return model, str(source), str(converted)


@pytest.fixture(scope="module")
def torchvision_bn_r50(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchvision")
    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.resnet50())
    source = root / "resnet50.pth"
    torch.save(model.state_dict(), source)
    converted = root / "torchvision_resnet50.pkl"
    convert_weights(str(source), str(converted))
    return model, str(source), str(converted)


@pytest.mark.zoo
def test_timm_resnet50_gn_equals_gn_fpn_backbone(timm_gn_r50):
    source, _, weights = timm_gn_r50
    cfg = gn_cfg(GN_TIMM)
    norms = [m for m in source.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.eps == cfg.MODEL.GN.EPS and m.num_groups == cfg.MODEL.GN.NUM_GROUPS for m in norms)
    meta = load_converted(weights)["gn_det"]
    assert meta == {"source": "timm", "depth": 50, "norm": "GN", "input_format": "RGB",
                    "pixel_mean": [123.675, 116.28, 103.53], "pixel_std": [58.395, 57.12, 57.375],
                    "stride_in_1x1": False,
                    "group_norm": {"num_groups": 32, "eps": 1e-5, "weight_standardization": False}}
    model = load_model(cfg, weights)
    assert_same_stages(source, model.backbone.bottom_up)


@pytest.mark.zoo
def test_torchvision_gn_resnet50_from_safetensors(tmp_path):
    torch.manual_seed(0)
    source = randomize_norms(torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c)))
    path = tmp_path / "resnet50_gn.safetensors"
    save_file(source.state_dict(), str(path))
    converted = convert_weights(str(path), str(tmp_path / "out.pkl"), source="torchvision")
    assert converted.metadata["source"] == "torchvision" and converted.metadata["norm"] == "GN"
    assert sorted(converted.unused_keys) == ["fc.bias", "fc.weight"] and not converted.dropped_keys
    model = load_model(gn_cfg(GN_TIMM), str(tmp_path / "out.pkl"))
    assert_same_stages(source, model.backbone.bottom_up)


@pytest.mark.zoo
def test_torchvision_bn_resnet50_equals_bnstar_fpn_backbone(torchvision_bn_r50):
    source, _, weights = torchvision_bn_r50
    model = load_model(gn_cfg(BNSTAR_TORCHVISION), weights)
    frozen = model.backbone.bottom_up.res3[0].conv2.norm
    assert torch.equal(frozen.running_var, source.layer2[0].bn2.running_var)  # statistics kept, not folded
    assert not torch.allclose(frozen.running_var, torch.ones_like(frozen.running_var))
    assert_same_stages(source, model.backbone.bottom_up)
    assert load_converted(weights)["gn_det"]["norm"] == "FrozenBN"


def test_resnet18_basic_blocks_into_bnstar_backbone(tmp_path):
    torch.manual_seed(0)
    source = randomize_norms(torchvision.models.resnet18())
    # a training checkpoint: wrapped under "model", saved from DistributedDataParallel
    path = tmp_path / "resnet18.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 90}, path)
    converted = convert_weights(str(path), str(tmp_path / "r18.pkl"))
    assert converted.metadata["depth"] == 18 and converted.metadata["norm"] == "FrozenBN"
    assert len(converted.dropped_keys) == 20  # num_batches_tracked of 20 BNs
    cfg = gn_cfg(BNSTAR_TORCHVISION, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")
    backbone = build_backbone(cfg)
    DetectionCheckpointer(backbone).load(str(tmp_path / "r18.pkl"))
    match = check_weights_for_model(backbone, str(tmp_path / "r18.pkl"))
    assert len(match.matched) == 100
    assert_same_stages(source, backbone.bottom_up, size=96)


@pytest.mark.zoo
def test_c4_model_loads_every_resnet_weight(timm_gn_r50):
    _, _, weights = timm_gn_r50
    cfg = gn_cfg(GN_C4, *TIMM_INPUT)
    model = load_model(cfg, weights)
    checkpoint = load_converted(weights)["model"]
    loaded = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
              **{f"roi_heads.{k}": v for k, v in model.roi_heads.res5.state_dict(prefix="res5.").items()}}
    assert len(loaded) == len(checkpoint) == 159
    for name, tensor in loaded.items():
        assert torch.equal(tensor, torch.from_numpy(checkpoint[name.split(".", 1)[1]])), name


def small_vgg_state_dict():
    vgg = nn.Module()
    vgg.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    vgg.classifier = nn.Linear(8, 10)
    return vgg.state_dict()


def one_line_error(match, call, *args, **kwargs):
    with pytest.raises(WeightsMismatchError, match=match) as err:
        call(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_other_architectures_name_the_first_key():
    one_line_error(r"^features\.0\.weight: not a parameter of a timm/torchvision ResNet",
                   convert_resnet_state_dict, small_vgg_state_dict())
    random_names = {"encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3), "head.bias": torch.zeros(1)}
    one_line_error(r"^encoder\.blocks\.0\.attn\.qkv\.weight: not a parameter", convert_resnet_state_dict, random_names)


def test_pickled_module_is_refused_without_unpickling_it(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Conv2d(3, 8, 3), path)  # the module, not its state dict
    with pytest.raises(InputError, match=r"whole_model\.pt is refused: it would load torch\.nn\.modules\.conv\."
                                         r"Conv2d, which is not weights"):
        load_source_state_dict(str(path))


@pytest.mark.zoo
def test_explicit_depth_mismatch_names_the_first_key(timm_gn_r50):
    r18 = torchvision.models.resnet18().state_dict()
    one_line_error(r"^layer1\.2\.conv1\.weight: missing, ResNet-34 \(FrozenBN\) needs it .*BasicBlock blocks "
                   r"\(2, 2, 2, 2\)", convert_resnet_state_dict, r18, depth=34)
    one_line_error(r"^layer1\.0\.conv1\.weight: shape \(64, 64, 3, 3\), but ResNet-50", convert_resnet_state_dict,
                   r18, depth=50)
    gn_r50 = load_source_state_dict(timm_gn_r50[1])
    one_line_error(r"^layer3\.6\.conv1\.weight: missing, ResNet-101 \(GN\)", convert_resnet_state_dict, gn_r50,
                   depth=101)


@pytest.mark.zoo
def test_config_depth_mismatch_names_the_first_key(timm_gn_r50):
    _, _, weights = timm_gn_r50
    cfg = gn_cfg(GN_TIMM, "MODEL.RESNETS.DEPTH", "101")
    one_line_error(r"^bottom_up\.res4\.6\.conv1\.weight: not filled by any tensor; .* holds ResNet-50 GN weights "
                   r"\(timm\); the model has ResNet-101 with GroupNorm$", check_weights_for_model,
                   build_backbone(cfg), weights)


@pytest.mark.zoo
def test_forced_norm_against_the_source_fails(timm_gn_r50, torchvision_bn_r50):
    gn_r50 = load_source_state_dict(timm_gn_r50[1])
    one_line_error(r"^bn1\.weight: a norm without running_mean/running_var \(GroupNorm\), but BN was asked for",
                   convert_resnet_state_dict, gn_r50, norm="BN")
    bn_r50 = load_source_state_dict(torchvision_bn_r50[1])
    one_line_error(r"^bn1\.running_mean: BatchNorm running statistics, but GN was asked for",
                   convert_resnet_state_dict, bn_r50, norm="GN")


@pytest.mark.zoo
def test_gn_weights_into_bnstar_model_and_back_fail(timm_gn_r50, torchvision_bn_r50):
    cfg = gn_cfg(BNSTAR_TORCHVISION)
    one_line_error(r"^bottom_up\.stem\.conv1\.norm\.running_mean: not filled by any tensor; .* holds ResNet-50 GN "
                   r"weights \(timm\); the model has ResNet-50 with FrozenBatchNorm2d$", check_weights_for_model,
                   build_backbone(cfg), timm_gn_r50[2])
    cfg = gn_cfg(GN_TIMM)
    one_line_error(r"^stem\.conv1\.norm\.running_mean: matches no parameter of the model; .* holds ResNet-50 "
                   r"FrozenBN weights \(torchvision\); the model has ResNet-50 with GroupNorm$",
                   check_weights_for_model, build_backbone(cfg), torchvision_bn_r50[2])


@pytest.mark.zoo
def test_config_that_feeds_other_input_fails(timm_gn_r50):
    cfg = gn_cfg(GN_TIMM, "MODEL.RESNETS.STRIDE_IN_1X1", "True")
    one_line_error(r"^MODEL\.RESNETS\.STRIDE_IN_1X1 / stride_in_1x1 is True, but .* expect False$",
                   check_weights_for_model, build_model(cfg), timm_gn_r50[2])
    cfg = gn_cfg(os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_gn.yaml"))  # written for Detectron's BGR weights
    one_line_error(r"^INPUT\.FORMAT / model\.input_format is 'BGR', but", check_weights_for_model, build_model(cfg),
                   timm_gn_r50[2])


@pytest.mark.slow
def test_gn_det_imports_without_timm():
    code = ("import sys; sys.modules['timm'] = None\n"  # any `import timm` now raises ImportError
            "import gn_det, gn_det.checkpoint\nfrom gn_det.checkpoint import convert_weights\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def timm_name(d2_name):
    """detectron2 ResNet parameter name -> timm/torchvision name, e.g. ``res2.0.shortcut.norm.weight`` ->
    ``layer1.0.downsample.1.weight`` (written out here independently of the converter)."""
    module, param = d2_name.rsplit(".", 1)
    if module.startswith("stem."):
        return {"stem.conv1": "conv1", "stem.conv1.norm": "bn1"}[module] + "." + param
    stage, block, conv, *norm = module.split(".")
    layer = f"layer{int(stage[3:]) - 1}.{block}"
    if conv == "shortcut":
        return f"{layer}.downsample.{1 if norm else 0}.{param}"
    return f"{layer}.{conv.replace('conv', 'bn') if norm else conv}.{param}"


@pytest.mark.slow
def test_cli_converts_timm_resnet50_gn_and_the_model_trains(timm_gn_r50, tmp_path, capsys):
    source, source_path, _ = timm_gn_r50
    out = tmp_path / "weights" / "timm_resnet50_gn.pkl"
    capsys.readouterr()
    tool_main("convert_weights.py", source_path, out, "--config-file", GN_TIMM)
    lines = capsys.readouterr().out.splitlines()
    assert "resnet50_gn.pth: timm ResNet-50, GN" in lines[0]
    assert "matched 159/159 parameters of gn-det's ResNet-50 (GN)" in lines
    assert "unused: fc.weight, fc.bias" in lines
    assert lines[-1].endswith("mask_rcnn_R_50_FPN_2x_gn_timm.yaml: all 159 ResNet weights of the model matched")

    cfg = gn_cfg(GN_TIMM, "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32")
    model = load_model(cfg, str(out))
    source_weights = source.state_dict()
    bottom_up = model.backbone.bottom_up.state_dict()
    assert len(bottom_up) == 159
    for name, tensor in bottom_up.items():
        assert torch.equal(tensor, source_weights[timm_name(name)]), name

    model.train()
    with EventStorage():  # detectron2's heads log training statistics to it
        losses = model(random_detection_batch(num_images=2, height=96, width=96))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    # FREEZE_AT 2: the stem and res2 keep their ImageNet weights, res3 onwards fine-tunes
    assert model.backbone.bottom_up.stem.conv1.weight.grad is None
    assert model.backbone.bottom_up.res3[0].conv1.norm.weight.grad.abs().sum() > 0


def test_cli_bad_input_exits_with_one_line(tmp_path):
    path = tmp_path / "vgg.pth"
    torch.save(small_vgg_state_dict(), path)
    assert tool_exit_message("convert_weights.py", path, tmp_path / "vgg.pkl") == (
        "convert_weights.py: error: features.0.weight: not a parameter of a timm/torchvision ResNet (conv1, bn1, "
        "layer1-4.N.conv1-3/bn1-3/downsample.0-1, fc)")
    assert not (tmp_path / "vgg.pkl").exists()


@pytest.mark.zoo
def test_cli_checks_the_config_before_writing(timm_gn_r50, tmp_path):
    _, source_path, _ = timm_gn_r50
    out = tmp_path / "timm_resnet50_gn.pkl"
    line = tool_exit_message("convert_weights.py", source_path, str(out), "--config-file",
                             os.path.join(COCO, "mask_rcnn_R_50_FPN_2x_gn.yaml"))  # a BGR config
    assert "INPUT.FORMAT / model.input_format is 'BGR'" in line and str(out) in line, line
    assert not out.exists()


def test_gn_weights_into_other_groups_or_ws_fail(tmp_path):
    """GroupNorm parameters have the same shapes under any group count: the converted file records what its
    GroupNorms computed, and a model that would compute otherwise is refused, naming the first such layer."""
    source = torchvision.models.resnet18(norm_layer=lambda channels: nn.GroupNorm(32, channels))
    torch.save(source.state_dict(), tmp_path / "r18_gn.pth")
    convert_weights(str(tmp_path / "r18_gn.pth"), str(tmp_path / "r18_gn.pkl"))
    r18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]
    check_weights_for_model(build_backbone(gn_cfg(GN_TIMM, *r18)), str(tmp_path / "r18_gn.pkl"))
    for opts, found in ((["MODEL.GN.NUM_GROUPS", "16"], "16 groups, eps 1e-05, weight standardization False"),
                        (["MODEL.GN.WS", "True"], "32 groups, eps 1e-05, weight standardization True")):
        one_line_error(rf"^bottom_up\.stem\.conv1\.norm: {found}; but .* trained with 32 groups, eps 1e-05, weight "
                       "standardization False", check_weights_for_model, build_backbone(gn_cfg(GN_TIMM, *r18, *opts)),
                       str(tmp_path / "r18_gn.pkl"))
    convert_weights(str(tmp_path / "r18_gn.pth"), str(tmp_path / "r18_gn16.pkl"), num_groups=16)
    check_weights_for_model(build_backbone(gn_cfg(GN_TIMM, *r18, "MODEL.GN.NUM_GROUPS", "16")),
                            str(tmp_path / "r18_gn16.pkl"))
