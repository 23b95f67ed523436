"""LazyConfig: gn_det.GN, gn_det.lazy.set_norm on detectron2's own configs, the lazy train/eval path, and the
same model from a YAML and a Python config."""
import json
import os
import re

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.layers import Conv2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import gn_det  # noqa: E402
from conftest import CONFIG_DIR, GN_FPN, made_once, tool_exit_message, tool_main  # noqa: E402
from gn_det import GN, InputError  # noqa: E402
from gn_det.data import generate_shapes  # noqa: E402
from gn_det.engine import argument_parser  # noqa: E402
from gn_det.engine import train_or_evaluate  # noqa: E402
from gn_det.config import load_lazy_config  # noqa: E402
from gn_det.engine.lazy_train import build_lazy_model  # noqa: E402
from gn_det.layers.norm import GroupNorm  # noqa: E402
from gn_det.lazy import no_weight_decay_on_norm, norm_sites, set_norm, use_4conv1fc_box_head  # noqa: E402

GN_FPN_PY = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_gn.py")
SHAPES_PY = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.py")
LSJ = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
# A user's config file: detectron2's LSJ baseline switched to 16-group GN, at 128 px on a tiny dataset.
USER_LSJ_GN16 = f"""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

import gn_det
from gn_det.lazy import set_norm

_lsj = model_zoo.get_config("{LSJ}")
dataloader, model, optimizer, train, lr_multiplier = (
    _lsj.dataloader, _lsj.model, _lsj.optimizer, _lsj.train, _lsj.lr_multiplier)
set_norm(model, gn_det.GN(num_groups=16))

# small for the test: R-18, and 64 RoIs per image (the 4conv1fc box head's convs run on every RoI)
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1
model.roi_heads.batch_size_per_image = 64
model.roi_heads.num_classes = 3
dataloader.train.dataset.names = "tiny_lazy_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=128, target_width=128),
    L(T.FixedSizeCrop)(crop_size=(128, 128)),
]
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
del dataloader.evaluator
"""


@pytest.fixture(scope="session")
def tiny_lazy_shapes(tmp_path_factory):
    # one folder per session: the datasets are registered under fixed names, which a second folder (a worker
    # that runs this module's tests between other modules' re-creates module fixtures) could not take again
    root = made_once(tmp_path_factory, "lazy_shapes",
                     lambda folder: generate_shapes(str(folder), num_train=6, num_val=3, image_size=128))
    return [f"--dataset=tiny_lazy_train={root}/train.json,{root}/train",
            f"--dataset=tiny_lazy_val={root}/val.json,{root}/val"]


def norm_layers(model):
    """{path: norm module} for every detectron2 conv that carries a norm."""
    return {name: m.norm for name, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}


# --- the spec

def test_gn_spec_builds_groupnorm_by_groups_or_channels_per_group():
    spec = instantiate(GN(num_groups=16, eps=1e-3))
    layer = spec(64)
    assert type(layer) is GroupNorm and layer.num_groups == 16 and layer.num_channels == 64 and layer.eps == 1e-3
    per_group = instantiate(GN(dim_per_group=16))
    assert per_group(256).num_groups == 16 and per_group(64).num_groups == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"num_groups": 0}, "num_groups=0"), ({"dim_per_group": 0}, "dim_per_group=0"), ({"eps": 0.0}, "eps=0.0"),
])
def test_gn_spec_rejects_bad_settings_at_config_time(kwargs, message):
    with pytest.raises(InputError, match=message):
        GN(**kwargs)


def test_unsplittable_channels_fail_at_build_naming_the_field():
    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    cfg.model.backbone.norm = GN(num_groups=48)  # set directly: the build labels it
    cfg.train = {"device": "cpu"}
    with pytest.raises(InputError, match=r"^backbone\.fpn_lateral2\.norm: 256 channels cannot be split into groups "
                                         r"by model\.backbone\.norm\.num_groups=48$"):
        build_lazy_model(cfg)


# --- set_norm on detectron2's own configs

@pytest.mark.zoo
def test_set_norm_on_lsj_baseline_gives_16_group_gn_everywhere_and_saves_as_yaml(tmp_path):
    cfg = model_zoo.get_config(LSJ)
    sites = set_norm(cfg.model, GN(num_groups=16))
    assert sites == ["model.backbone.norm", "model.backbone.bottom_up.stem.norm",
                     "model.backbone.bottom_up.stages.norm", "model.roi_heads.box_head.conv_norm",
                     "model.roi_heads.mask_head.conv_norm"]
    path, again = str(tmp_path / "lsj_gn16.yaml"), str(tmp_path / "again.yaml")
    LazyConfig.save(cfg, path)
    assert not os.path.exists(path + ".pkl")  # written as YAML: no lambda left
    reloaded = LazyConfig.load(path)
    LazyConfig.save(reloaded, again)
    assert open(again).read() == open(path).read()
    models = [instantiate(node.model) for node in (cfg, reloaded)]
    for model in models:
        norms = norm_layers(model)
        assert len(norms) == 1 + 3 * 16 + 4 + 8 + 4 + 4  # stem, blocks, shortcuts, FPN, box and mask head convs
        assert all(type(n) is GroupNorm and n.num_groups == 16 for n in norms.values())
        assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in model.modules())
    assert repr(models[0]) == repr(models[1])
    models[1].load_state_dict(models[0].state_dict())  # same names and shapes, strictly


def test_set_norm_reaches_c4_res5_retinanet_and_gn_rpn_heads():
    c4 = model_zoo.get_config("common/models/mask_rcnn_c4.py").model
    assert set_norm(c4, GN(num_groups=16)) == ["model.backbone.stem.norm", "model.backbone.stages.norm",
                                               "model.roi_heads.res5.norm", "model.roi_heads.mask_head.conv_norm"]
    res5 = torch.nn.Sequential(*instantiate(c4.roi_heads.res5))  # make_stage returns a list of blocks
    assert all(type(n) is GroupNorm and n.num_groups == 16 for n in norm_layers(res5).values())
    retinanet = model_zoo.get_config("common/models/retinanet.py").model
    assert "model.head.norm" in set_norm(retinanet, "GN")
    fpn = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    fpn.proposal_generator.head._target_ = gn_det.modeling.heads.GNRPNHead
    assert "model.proposal_generator.head.conv_norm" in set_norm(fpn, "SyncBN")
    assert "model.proposal_generator.head.conv_norm" not in norm_sites(  # detectron2's RPN head takes no norm
        model_zoo.get_config("common/models/mask_rcnn_fpn.py").model)


@pytest.mark.parametrize("norm", ["gn", lambda c: torch.nn.GroupNorm(8, c), 16])
def test_set_norm_rejects_what_it_cannot_save(norm):
    with pytest.raises(InputError, match="norm="):
        set_norm(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model, norm)


def test_4conv1fc_head_and_no_decay_on_gn_gamma_beta():
    cfg = LazyConfig.load(SHAPES_PY)
    assert list(cfg.model.roi_heads.box_head.conv_dims) == [128] * 4
    assert list(cfg.model.roi_heads.box_head.fc_dims) == [1024]
    model = instantiate(cfg.model)
    optimizer = model_zoo.get_config("common/optim.py").SGD
    optimizer.params.weight_decay_norm = 1e-4
    no_weight_decay_on_norm(optimizer)
    optimizer.params.model = model
    groups = instantiate(optimizer).param_groups
    gn_params = {id(p) for m in model.modules() if isinstance(m, GroupNorm) for p in m.parameters()}
    assert gn_params
    for group in groups:
        if any(id(p) in gn_params for p in group["params"]):
            assert group["weight_decay"] == 0.0
    with pytest.raises(InputError, match="box_head"):
        use_4conv1fc_box_head(model_zoo.get_config("common/models/mask_rcnn_c4.py").model)
    with pytest.raises(InputError, match="get_default_optimizer_params"):
        no_weight_decay_on_norm(OmegaConf.create({"params": {"lr": 1.0}}))


# --- same model either way

@pytest.mark.zoo
def test_lazy_and_yaml_gn_r50_fpn_are_the_same_model_and_load_a_stock_detectron2_gn_checkpoint():
    yaml_model = build_model(gn_det.get_gn_cfg(GN_FPN, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
                                                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])).eval()
    lazy = LazyConfig.load(GN_FPN_PY)
    lazy.model.roi_heads.box_predictor.test_score_thresh = 0.0  # keep detections from an untrained model
    lazy_model = instantiate(lazy.model).eval()
    stock_cfg = get_cfg()  # detectron2 alone: its own GN config, nn.GroupNorm fixed at 32 groups
    stock_cfg.merge_from_file(model_zoo.get_config_file("Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"))
    stock_cfg.MODEL.DEVICE = "cpu"
    stock_model = build_model(stock_cfg)

    shapes = {k: v.shape for k, v in yaml_model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in lazy_model.state_dict().items()}
    yaml_norms, lazy_norms = norm_layers(yaml_model), norm_layers(lazy_model)
    assert yaml_norms.keys() == lazy_norms.keys() and len(yaml_norms) == 69
    for name, norm in yaml_norms.items():
        assert type(norm) is type(lazy_norms[name]) is GroupNorm, name
        assert (norm.num_groups, norm.eps) == (lazy_norms[name].num_groups, lazy_norms[name].eps), name

    stock_state = stock_model.state_dict()  # a stock checkpoint loads strictly into both
    yaml_model.load_state_dict(stock_state)
    lazy_model.load_state_dict(stock_state)
    torch.manual_seed(0)
    image = {"image": torch.randint(0, 256, (3, 160, 192), dtype=torch.uint8), "height": 160, "width": 192}
    with torch.no_grad():
        features = [m.backbone(m.preprocess_image([image]).tensor) for m in (yaml_model, lazy_model)]
        outputs = [m([image])[0]["instances"] for m in (yaml_model, lazy_model)]
    assert features[0].keys() == features[1].keys()
    for key in features[0]:
        assert torch.equal(features[0][key], features[1][key]), key
    assert len(outputs[0]) > 0
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = outputs[0].get(field), outputs[1].get(field)
        a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
        assert torch.equal(a, b), field


# --- the lazy train/eval path

@pytest.mark.slow
def test_lsj_gn16_user_config_trains_on_cpu(tmp_path, tiny_lazy_shapes):
    config = tmp_path / "lsj_gn16.py"
    config.write_text(USER_LSJ_GN16)
    out = tmp_path / "out"
    args = argument_parser().parse_args(
        ["--config-file", str(config), *tiny_lazy_shapes, f"train.output_dir={out}", "train.max_iter=2",
         "train.log_period=1", "train.checkpointer.period=100", "train.amp.enabled=False"])
    train_or_evaluate(args)
    assert (out / "model_final.pth").is_file()
    saved = LazyConfig.load(str(out / "config.yaml"))  # default_setup's dump: YAML, loadable
    assert saved.model.backbone.norm.num_groups == 16 and saved.train.device == "cpu"
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 1 and "peak_memory_mb" in metrics[-1]


SMALL_SHAPES = ["dataloader.train.dataset.names=tiny_lazy_train", "dataloader.test.dataset.names=tiny_lazy_val",
                "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
                "dataloader.test.num_workers=0", "train.log_period=1"]


@pytest.mark.slow
@pytest.mark.usefixtures("one_launch_at_a_time")
def test_shapes_lazy_config_trains_on_two_processes_resumes_and_evaluates_through_train_net(tmp_path, tiny_lazy_shapes):
    out = tmp_path / "run"
    common = [*tiny_lazy_shapes, *SMALL_SHAPES, f"train.output_dir={out}"]
    # two processes (gloo on CPU) spawned from this one, then a resume and an evaluation in this process
    tool_main("train_net.py", "--config-file", SHAPES_PY, "--num-gpus", "2", *common, "train.max_iter=2",
              "train.checkpointer.period=1")
    log = (out / "log.txt").read_text()
    assert "Optimizer parameter groups" in log and "GroupNorm γ/β" in log
    if not torch.cuda.is_available():
        assert "No CUDA device: train.device='cuda' runs on CPU" in log
    results = json.loads((out / "results.json").read_text())
    assert set(results["tiny_lazy_val"]) == {"bbox", "segm"}

    tool_main("train_net.py", "--config-file", SHAPES_PY, "--resume", *common, "train.max_iter=3")
    assert "Starting training from iteration 2" in (out / "log.txt").read_text()

    evaluated = tmp_path / "eval"
    tool_main("train_net.py", "--config-file", SHAPES_PY, "--eval-only", *tiny_lazy_shapes, *SMALL_SHAPES,
              f"train.output_dir={evaluated}", f"train.init_checkpoint={out / 'model_final.pth'}")
    assert "tiny_lazy_val" in json.loads((evaluated / "results.json").read_text())


@pytest.mark.parametrize("extra, message", [
    (["trian.max_iter=2"], "command line: trian.max_iter=2: .* has no section trian$"),
    (["dataloader.train.dataset.names=nope"], "names dataset 'nope', which is not registered"),
    (["model.backbone.norm={_target_: gn_det.GroupNormSpec, num_groups: 48}"],
     r"backbone\.fpn_lateral2\.norm: 128 channels cannot be split into groups by model\.backbone\.norm\."
     r"num_groups=48$"),
    # detectron2's built-in COCO, registered but its files absent (the test runs in an empty folder)
    (["dataloader.test.dataset.names=coco_2017_val"],
     r"dataloader\.test\.dataset\.names dataset 'coco_2017_val': json_file {coco_val_json} does not exist"),
    (["train.init_checkpoint=/nonexistent/none.pth"], r"train\.init_checkpoint /nonexistent/none\.pth does not exist$"),
])
def test_bad_lazy_input_is_one_line_and_writes_nothing(tmp_path, tiny_lazy_shapes, extra, message, monkeypatch):
    out = tmp_path / "never"
    # detectron2 registered its built-in datasets under the relative root "datasets" (DETECTRON2_DATASETS unset)
    (tmp_path / "no_datasets").mkdir()
    monkeypatch.chdir(tmp_path / "no_datasets")
    from detectron2.data import MetadataCatalog

    message = message.replace("{coco_val_json}", re.escape(MetadataCatalog.get("coco_2017_val").json_file))
    line = tool_exit_message("train_net.py", "--config-file", SHAPES_PY, *tiny_lazy_shapes, *SMALL_SHAPES,
                             f"train.output_dir={out}", *extra)
    assert re.search(message, line), line
    assert not out.exists()


def test_missing_lazy_config_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_lazy_config(str(tmp_path / "nope.py"))


def test_lazy_config_without_a_section_the_run_needs_names_it():
    from gn_det.engine.lazy_train import check_lazy_config

    cfg = LazyConfig.load(SHAPES_PY)
    del cfg.lr_multiplier
    check_lazy_config(cfg, "my.py", eval_only=True)  # evaluation needs no schedule
    with pytest.raises(InputError, match=r"^my\.py: no lr_multiplier "):
        check_lazy_config(cfg, "my.py", eval_only=False)


@pytest.mark.slow
def test_a_diverging_lazy_run_ends_in_one_line_naming_the_iteration(tmp_path, tiny_lazy_shapes):
    out = tmp_path / "diverged"
    line = tool_exit_message("train_net.py", "--config-file", SHAPES_PY, *tiny_lazy_shapes, *SMALL_SHAPES,
                             f"train.output_dir={out}", "optimizer.lr=1e12", "train.max_iter=5")
    assert re.match(r"train_net\.py: error: training diverged \(NaN/Inf\) at iteration \d+: .*lower optimizer\.lr",
                    line), line


def test_lazy_run_checks_the_datasets_it_reads(tiny_lazy_shapes, tmp_path):
    from gn_det.engine.run import check_datasets
    from gn_det.engine.lazy_train import load_lazy_run_config

    def settings(*overrides, eval_only=False, evaluator=True):
        config = tmp_path / "my.py"
        config.write_text(f"from detectron2.config import LazyConfig\n"
                          f"_c = LazyConfig.load({SHAPES_PY!r})\n"
                          f"globals().update({{k: _c[k] for k in _c}})\n"
                          + ("" if evaluator else "del dataloader.evaluator\n"))
        args = argument_parser().parse_args(["--config-file", str(config), *(["--eval-only"] if eval_only else []),
                                             *tiny_lazy_shapes, *overrides])
        return load_lazy_run_config(args)[1]

    checked = settings("dataloader.train.dataset.names=tiny_lazy_train", "dataloader.test.dataset.names=unregistered_val")
    with pytest.raises(InputError, match=r"my\.py: dataloader\.test\.dataset\.names names dataset 'unregistered_val'"):
        check_datasets(checked)  # do_test evaluates it after training
    check_datasets(settings("dataloader.train.dataset.names=tiny_lazy_train",
                            "dataloader.test.dataset.names=unregistered_val", evaluator=False))  # never read
    unregistered_train = ("dataloader.train.dataset.names=unregistered_train", "dataloader.test.dataset.names=tiny_lazy_val")
    check_datasets(settings(*unregistered_train, eval_only=True), training=False)  # an evaluation reads no training set
    with pytest.raises(InputError, match="names dataset 'unregistered_train'"):
        check_datasets(settings(*unregistered_train))
