"""Every config file loads and builds; the norm at each site is what the config says; group settings.

The every-config tests build on torch's meta device: every builder and every check runs, and each layer gets
parameters of its shape, but no initial values are drawn (docs/TESTS.md). The tests of what a built model holds
build it on the CPU."""
import glob
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.layers import Conv2d, FrozenBatchNorm2d  # noqa: E402
from detectron2.model_zoo import get_config_file  # noqa: E402
from detectron2.modeling import META_ARCH_REGISTRY, build_model  # noqa: E402

from conftest import BNSTAR_FPN, CONFIG_DIR, GN_FPN  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.errors import InputError  # noqa: E402

ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))


def build(path, *opts):
    cfg = get_gn_cfg(path, ["MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg)


@pytest.mark.zoo
@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_config_loads_and_builds(path):
    cfg = get_gn_cfg(path, ["MODEL.DEVICE", "cpu"])
    with torch.device("meta"):  # build_model's body without its move to MODEL.DEVICE, which meta tensors refuse
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("name", ["Base-RCNN-FPN.yaml", "Base-RCNN-C4.yaml"])
def test_base_configs_mirror_detectron2(name):
    import yaml

    with open(os.path.join(CONFIG_DIR, name)) as ours, open(get_config_file(name)) as theirs:
        assert yaml.safe_load(ours) == yaml.safe_load(theirs)


def norm_convs(model):
    """(path, Conv2d) for every detectron2 conv that can carry a norm, backbone and heads."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv2d)]


def test_gn_config_puts_groupnorm_at_every_site():
    model = build(GN_FPN)
    convs = dict(norm_convs(model))
    bottom_up = [n for n in convs if n.startswith("backbone.bottom_up.")]
    assert "backbone.bottom_up.stem.conv1" in bottom_up
    assert any(n.endswith(".shortcut") for n in bottom_up)
    fpn = [n for n in convs if n.startswith("backbone.fpn_")]
    box = [n for n in convs if n.startswith("roi_heads.box_head.")]
    mask = [n for n in convs if n.startswith("roi_heads.mask_head.mask_fcn")]
    assert len(fpn) == 8 and len(box) == 4 and len(mask) == 4
    for name in bottom_up + fpn + box + mask:
        assert isinstance(convs[name].norm, torch.nn.GroupNorm), name
        assert convs[name].norm.num_groups == 32, name
        assert convs[name].bias is None, name  # GN's beta replaces the bias
    assert len(bottom_up) == 1 + 3 * 16 + 4  # stem, 3 convs in each of 16 blocks, 4 shortcuts


def test_bnstar_config_freezes_backbone_bn_and_has_no_head_norm():
    model = build(BNSTAR_FPN)
    for name, conv in norm_convs(model):
        if name.startswith("backbone.bottom_up."):
            assert isinstance(conv.norm, FrozenBatchNorm2d), name
        else:
            assert conv.norm is None, name
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def write_user_yaml(tmp_path, body):
    path = tmp_path / "user.yaml"
    path.write_text(f'_BASE_: "{GN_FPN}"\nMODEL:\n  GN:\n{body}\n')
    return str(path)


def group_norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]


def test_user_yaml_sets_num_groups(tmp_path):
    model = build(write_user_yaml(tmp_path, "    NUM_GROUPS: 16"))
    norms = group_norms(model)
    assert len(norms) == 69 and all(m.num_groups == 16 for m in norms)


def test_user_yaml_sets_dim_per_group(tmp_path):
    model = build(write_user_yaml(tmp_path, "    DIM_PER_GROUP: 16"))
    norms = group_norms(model)
    assert len(norms) == 69
    assert all(m.num_groups == m.num_channels // 16 for m in norms)
    assert {m.num_groups for m in norms} >= {4, 8, 16, 32, 64, 128}


def test_unsplittable_channels_name_the_layer():
    with pytest.raises(ValueError, match=r"^backbone.fpn_lateral2.norm: 256 channels cannot be split "
                                         r"into groups by MODEL.GN.NUM_GROUPS=48$"):
        build(GN_FPN, "MODEL.GN.NUM_GROUPS", "48")
    with pytest.raises(ValueError, match=r"^roi_heads.box_head.conv1.norm: 256 channels .*MODEL.GN.DIM_PER_GROUP=512$"):
        build(GN_FPN, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
              "MODEL.FPN.NORM", "", "MODEL.GN.DIM_PER_GROUP", "512", "MODEL.RESNETS.NORM", "FrozenBN")


def test_bad_norm_name_fails_at_config_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f'_BASE_: "{GN_FPN}"\nMODEL:\n  FPN:\n    NORM: "gn"\n')
    with pytest.raises(ValueError, match=r"bad.yaml: MODEL.FPN.NORM='gn' is not a norm"):
        get_gn_cfg(str(path))


def test_unknown_key_fails_at_config_load(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f'_BASE_: "{GN_FPN}"\nMODEL:\n  GN:\n    NUM_GROUP: 16\n')
    with pytest.raises(InputError, match="typo.yaml: Non-existent config key: MODEL.GN.NUM_GROUP"):
        get_gn_cfg(str(path))


@pytest.mark.parametrize("key,value", [("MODEL.GN.NUM_GROUPS", "0"), ("MODEL.GN.DIM_PER_GROUP", "0"),
                                       ("MODEL.GN.EPS", "0.0")])
def test_bad_group_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + "=" + value):
        get_gn_cfg(GN_FPN, [key, value])


def test_fast_switches_on_a_stock_meta_architecture_fail_at_config_load():
    with pytest.raises(ValueError, match=r"command line: MODEL.PRECISION='bf16' .* not 'GeneralizedRCNN'"):
        get_gn_cfg(None, ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.PRECISION", "bf16"])


@pytest.mark.parametrize("opts, message", [
    # detectron2's own mask head builds its fixed 32-group GroupNorm whatever MODEL.GN says
    (["MODEL.GN.NUM_GROUPS", "16", "MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead"],
     r"MODEL\.ROI_MASK_HEAD\.NORM='GN' is built by MODEL\.ROI_MASK_HEAD\.NAME='MaskRCNNConvUpsampleHead', which "
     r"ignores MODEL\.GN; name one of \['GNMaskHead'\]"),
    (["MODEL.GN.WS", "True", "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone"],
     r"MODEL\.RESNETS\.NORM='GN' is built by MODEL\.BACKBONE\.NAME='build_resnet_fpn_backbone', which ignores "
     r"MODEL\.GN"),
    (["MODEL.RPN.NORM", "GN", "MODEL.RPN.HEAD_NAME", "StandardRPNHead"],
     r"MODEL\.RPN\.NORM='GN' is built by MODEL\.RPN\.HEAD_NAME='StandardRPNHead', which ignores MODEL\.RPN\.NORM"),
])
def test_a_norm_setting_that_the_sites_builder_would_ignore_fails_at_config_load(opts, message):
    with pytest.raises(InputError, match=message):
        get_gn_cfg(GN_FPN, opts)
    get_gn_cfg(GN_FPN, opts[2:])  # detectron2's builder with detectron2's GN, or without an RPN norm: as stock


# --- Python (LazyConfig) configs

# configs/common holds pieces the configs import, not configs
PY_CONFIGS = sorted(p for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.py"), recursive=True)
                    if os.sep + "common" + os.sep not in p)


def paper_numbers(path):
    """The "box AP / mask AP" pairs in a config file's header."""
    import re

    with open(path) as f:
        header = "".join(line for line in f if line.startswith("#"))
    return re.findall(r"\d+\.\d+ (?:box AP )?/ \d+\.\d+", header)


@pytest.mark.zoo
@pytest.mark.parametrize("path", PY_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_python_config_loads_builds_and_survives_yaml(path, tmp_path):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(path)
    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, saved)
    assert not os.path.exists(saved + ".pkl")  # plain YAML, no lambda or partial
    reloaded = LazyConfig.load(saved)
    with torch.device("meta"):
        model = instantiate(reloaded.model)
        assert repr(model) == repr(instantiate(cfg.model))
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert reloaded.optimizer.params.weight_decay_norm == 0.0  # the paper's fine-tuning recipe
    twin = path[:-len(".py")] + ".yaml"
    if os.path.exists(twin):  # same schedule and paper numbers as the YAML config beside it
        yaml_cfg = get_gn_cfg(twin, ["MODEL.DEVICE", "cpu"])
        assert reloaded.train.max_iter == yaml_cfg.SOLVER.MAX_ITER
        assert reloaded.train.init_checkpoint == yaml_cfg.MODEL.WEIGHTS
        if "COCO-InstanceSegmentation" in path:  # the paper's models quote its box / mask AP
            assert paper_numbers(path) == paper_numbers(twin)
            assert paper_numbers(path) or "Paper: no number" in open(path).readline()


def test_python_configs_cover_the_papers_models():
    names = {os.path.relpath(p, CONFIG_DIR)[:-len(".py")] for p in PY_CONFIGS}
    inst = "COCO-InstanceSegmentation/"
    assert {inst + n for n in (
        "mask_rcnn_R_50_FPN_2x_gn", "mask_rcnn_R_50_FPN_3x_gn", "mask_rcnn_R_50_FPN_2x_bnstar",
        "mask_rcnn_R_50_FPN_2x_bnstar_gn_head", "mask_rcnn_R_50_FPN_2x_gn_backbone_gn_head",
        "scratch_mask_rcnn_R_50_FPN_3x_gn", "mask_rcnn_R_50_FPN_3x_syncbn", "mask_rcnn_R_50_C4_2x_gn",
        "mask_rcnn_R_50_C4_2x_bnstar")} | {"shapes/mask_rcnn_R_18_FPN_gn"} <= names
