"""One run plan for both config systems: the same mistake gives the same one-line answer from a YAML config and
from a Python config, before anything is written; the model is built once; detectron2's RNG sequence is kept;
every gn-det head and ROI-heads class can be named in a Python config."""
import logging
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

from conftest import CONFIG_DIR  # noqa: E402
from gn_det.engine import argument_parser, plan_run  # noqa: E402
from gn_det.engine.run import check_run  # noqa: E402
from gn_det.errors import InputError  # noqa: E402

GN_YAML = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
GN_PY = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.py")

# The same setting in each system's own keys: (YAML KEY VALUE pairs, Python key=value overrides).
SETTINGS = {
    "tiny": (["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu"],
             ["dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0", "train.device=cpu"]),
    "amp": (["SOLVER.AMP.ENABLED", "True"], ["train.amp.enabled=True"]),
    "fp16": (["MODEL.PRECISION", "fp16"],
             ["model._target_=gn_det.modeling.meta_arch.GNGeneralizedRCNN", "model.precision=fp16"]),
    "bf16": (["MODEL.PRECISION", "bf16"],
             ["model._target_=gn_det.modeling.meta_arch.GNGeneralizedRCNN", "model.precision=bf16"]),
    "cuda": (["MODEL.DEVICE", "cuda"], ["train.device=cuda"]),
    "batch3": (["SOLVER.IMS_PER_BATCH", "3"], ["dataloader.train.total_batch_size=3"]),
    "syncbn": (["MODEL.FPN.NORM", "SyncBN"], ["model.backbone.norm=SyncBN"]),
    "groups48": (["MODEL.GN.NUM_GROUPS", "48"], ["model.backbone.norm.num_groups=48"]),
}


def args_for(system, dataset, out, *cases, weights=None, eval_only=False):
    """train_net's parsed arguments for the shapes config of ``system`` ("yaml"/"python") on ``dataset``."""
    pick = 0 if system == "yaml" else 1
    opts = [item for case in ("tiny",) + cases for item in SETTINGS[case][pick]]
    train, val = dataset
    if system == "yaml":
        opts += ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)", "OUTPUT_DIR", str(out)]
        if weights is not None:
            opts += ["MODEL.WEIGHTS", weights]
        config = GN_YAML
    else:
        opts += [f"dataloader.train.dataset.names={train}", f"dataloader.test.dataset.names={val}",
                 f"train.output_dir={out}"]
        if weights is not None:
            opts += [f"train.init_checkpoint={weights}"]
        config = GN_PY
    return argument_parser().parse_args(["--config-file", config, *(["--eval-only"] if eval_only else []), *opts])


@pytest.fixture(scope="module")
def dataset(tiny_dataset_specs):
    from gn_det.data import register_datasets

    return tuple(register_datasets(spec.partition("=")[2] for spec in tiny_dataset_specs))


SYSTEMS = ["yaml", "python"]


def refused(args, match):
    with pytest.raises(InputError, match=match) as err:
        plan_run(args)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("system", SYSTEMS)
def test_amp_on_cpu_is_one_line(system, dataset, tmp_path):
    refused(args_for(system, dataset, tmp_path / "out", "amp"), r"(SOLVER\.AMP\.ENABLED|train\.amp\.enabled)=True "
            r"needs CUDA \(detectron2's AMPTrainer, fp16\); on CPU switch it off")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("system", SYSTEMS)
def test_fp16_on_cpu_is_one_line_at_build_and_trains_with_a_gradient_scaler(system, dataset, tmp_path):
    refused(args_for(system, dataset, tmp_path / "out", "fp16"),
            r"^(MODEL\.PRECISION|model\.precision)='fp16' needs a CUDA device, not 'cpu'; on CPU use 'fp32', "
            r"or 'bf16' where the CPU has AVX512-BF16 or AMX$")
    assert not (tmp_path / "out").exists()
    if system == "python":  # on CUDA, fp16 trains with AMPTrainer's scaler whatever train.amp.enabled says
        from omegaconf import OmegaConf

        from gn_det.engine.lazy_train import trains_with_amp

        cfg = OmegaConf.create({"train": {"amp": {"enabled": False}}})
        assert trains_with_amp(cfg, torch.nn.Module()) is False
        fp16_model = torch.nn.Module()
        fp16_model.precision = "fp16"
        assert trains_with_amp(cfg, fp16_model) is True


@pytest.mark.parametrize("system", SYSTEMS)
def test_batch_and_syncbn_against_two_processes(system, dataset, tmp_path):
    from gn_det.engine.lazy_train import load_lazy_run_config
    from gn_det.engine.run import load_yaml_config

    load = load_yaml_config if system == "yaml" else load_lazy_run_config
    _, settings = load(args_for(system, dataset, tmp_path, "batch3"))
    with pytest.raises(InputError, match=r"=3 must be a positive multiple of the number of processes \(2\)$"):
        check_run(settings, 2, training=True)
    _, settings = load(args_for(system, dataset, tmp_path, "syncbn"))
    check_run(settings, 1, training=True)  # one process: torch's SyncBatchNorm is plain BN
    with pytest.raises(InputError, match=r"='SyncBN' needs CUDA with 2 processes .* use 'naiveSyncBN'"):
        check_run(settings, 2, training=True)
    settings.norms = {key: "nnSyncBN" for key in settings.norms}
    with pytest.raises(InputError, match=r"='nnSyncBN' needs CUDA with 2 processes"):
        check_run(settings, 2, training=True)


@pytest.mark.parametrize("system", SYSTEMS)
def test_bf16_on_a_cpu_without_bf16_kernels_runs_in_fp32_with_one_logged_line(system, dataset, tmp_path,
                                                                                   monkeypatch):
    import gn_det.config

    key = "MODEL.PRECISION" if system == "yaml" else "model.precision"
    for native, precision in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: native)
        plan = plan_run(args_for(system, dataset, tmp_path / "out", "bf16"))
        assert repr(plan.model).splitlines()[1].strip().startswith(f"precision={precision},")  # print(model) says it
        saved = plan.cfg.MODEL.PRECISION if system == "yaml" else plan.cfg.model.precision
        assert saved == precision
        lines = [line for line in plan.settings.adjustments if "bf16" in line]
        assert lines == ([] if native else [f"No oneDNN bf16 kernels for this CPU (x86: AVX512 or newer): {key}='bf16' "
                                            "runs in 'fp32' (emulated bf16 would be slower)"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("system", SYSTEMS)
def test_bf16_on_a_gpu_without_bf16_tensor_cores_runs_in_fp32_with_one_logged_line(system, dataset, tmp_path,
                                                                                    monkeypatch):
    """A GPU below compute capability 8.0 (V100, T4) gets the CPU's rule. Without a GPU here, torch is told there
    is one of each capability; the config is loaded, not built."""
    import gn_det.config
    from gn_det.engine.lazy_train import load_lazy_run_config
    from gn_det.engine.run import load_yaml_config

    load = load_yaml_config if system == "yaml" else load_lazy_run_config
    key = "MODEL.PRECISION" if system == "yaml" else "model.precision"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for capability, precision in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp32")):
        monkeypatch.setattr(gn_det.config, "gpu_compute_capability", lambda index: capability)
        cfg, settings = load(args_for(system, dataset, tmp_path / "out", "bf16", "cuda"))
        assert (cfg.MODEL.PRECISION if system == "yaml" else cfg.model.precision) == precision
        assert settings.device == "cuda"
        assert settings.adjustments == ([] if precision == "bf16" else [
            f"No bf16 tensor cores on this GPU (compute capability 7.5; bf16 needs 8.0 or newer): {key}='bf16' runs "
            "in 'fp32' (emulated bf16 would be slower)"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("system", SYSTEMS)
def test_predict_runs_bf16_as_a_run_does_and_an_export_keeps_it(system, dataset, tmp_path, monkeypatch, caplog):
    """predict (and visualize) build the model as a run on this machine would, each adjustment a warning; an
    export keeps the config's precision, for the machine that serves the file."""
    from detectron2.checkpoint import DetectionCheckpointer

    import gn_det.config
    from gn_det.predict import load_predictor

    monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: False)
    pick = 0 if system == "yaml" else 1
    opts = SETTINGS["bf16"][pick] + (["MODEL.DEVICE", "cpu"] if system == "yaml" else ["train.device=cpu"])
    config = GN_YAML if system == "yaml" else GN_PY
    weights = str(tmp_path / "random.pth")
    built = plan_run(args_for(system, dataset, tmp_path / "out", "bf16")).model  # the same model, random weights
    DetectionCheckpointer(built, save_dir=str(tmp_path)).save("random")
    key = "MODEL.PRECISION" if system == "yaml" else "model.precision"
    logger = logging.getLogger("gn_det.predict")
    logger.addHandler(caplog.handler)  # a run in this process (setup_logger) stops gn_det's records at "gn_det"
    try:
        assert load_predictor(config, weights, opts).model.precision == "fp32"
        if not torch.cuda.is_available():  # a --device without CUDA: the CPU, with the same kind of warning
            load_predictor(config, weights, opts, device="cuda")
            assert "No CUDA device: --device='cuda' runs on CPU" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)
    assert f"{key}='bf16' runs in 'fp32'" in caplog.text
    assert load_predictor(config, weights, opts, keep_precision=True).model.precision == "bf16"


@pytest.mark.parametrize("system", SYSTEMS)
def test_unsplittable_groups_name_the_layer_and_the_key(system, dataset, tmp_path):
    key = r"MODEL\.GN\.NUM_GROUPS" if system == "yaml" else r"model\.backbone\.norm\.num_groups"
    refused(args_for(system, dataset, tmp_path / "out", "groups48"),
            rf"^backbone\.fpn_lateral2\.norm: 128 channels cannot be split into groups by {key}=48$")


@pytest.mark.parametrize("system", SYSTEMS)
def test_missing_weights_and_dataset_files_are_one_line(system, dataset, tmp_path):
    key = "MODEL.WEIGHTS" if system == "yaml" else "train.init_checkpoint"
    refused(args_for(system, dataset, tmp_path / "out", weights=str(tmp_path / "none.pth")),
            rf"^{key} {tmp_path}/none\.pth does not exist$")
    from detectron2.data import DatasetCatalog, MetadataCatalog

    gone = "gone_val"
    if gone not in DatasetCatalog.list():
        DatasetCatalog.register(gone, lambda: [])
        MetadataCatalog.get(gone).set(json_file="/nonexistent/gone.json", image_root="/nonexistent")
    key = "DATASETS.TEST" if system == "yaml" else r"dataloader\.test\.dataset\.names"
    refused(args_for(system, (dataset[0], gone), tmp_path / "out"),
            rf"{key} dataset 'gone_val': json_file /nonexistent/gone\.json does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("system", SYSTEMS)
def test_weights_that_do_not_fit_are_refused_for_evaluation_only(system, dataset, tmp_path):
    """Evaluation needs every parameter: a BN*-model checkpoint for a GN model names the file and the first
    missing parameter; the same file may initialise training (detectron2 logs what it did not fill)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gn_det.config import get_gn_cfg

    bnstar = build_model(get_gn_cfg(os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bnstar.yaml"),
                                    ["MODEL.DEVICE", "cpu"]))
    DetectionCheckpointer(bnstar, str(tmp_path)).save("bnstar")
    weights = str(tmp_path / "bnstar.pth")
    refused(args_for(system, dataset, tmp_path / "out", weights=weights, eval_only=True),
            rf"^weights file {weights} does not fit the model: \S+ is (missing|not in the model)")
    plan = plan_run(args_for(system, dataset, tmp_path / "out", weights=weights))
    assert plan.preloaded  # read once, handed to the trainer's checkpointer
    assert not (tmp_path / "out").exists()


def test_model_is_built_once_and_rng_sequence_is_detectron2s(dataset, tmp_path, monkeypatch):
    """plan_run builds the model after seeding as default_setup does and restores the post-build RNG state
    after default_setup: the same initial weights and the same next random numbers as stock detectron2's
    default_setup + DefaultTrainer, which builds the model itself."""
    from detectron2.engine import DefaultTrainer, default_setup

    from gn_det.engine import GNTrainer
    from gn_det.engine.run import set_rng_state

    args = args_for("yaml", dataset, tmp_path / "ours", "tiny")
    args.opts += ["SEED", "7", "MODEL.PRECISION", "fp32", "MODEL.CHANNELS_LAST", "False", "MODEL.CPU_FAST_PATH",
                  "False", "SOLVER.MAX_ITER", "1"]
    builds = []
    plan = plan_run(args)
    default_setup(plan.cfg, args)
    set_rng_state(plan.rng_state)
    monkeypatch.setattr(GNTrainer, "build_model", classmethod(lambda cls, cfg: builds.append(cfg)))
    ours = GNTrainer(plan.cfg, plan.model, plan.preloaded)
    assert builds == []  # the plan's model, not a second build
    ours_next = torch.rand(4)

    cfg = plan.cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(tmp_path / "stock")
    cfg.freeze()
    default_setup(cfg, args)
    stock = DefaultTrainer(cfg)
    stock_next = torch.rand(4)
    assert torch.equal(ours_next, stock_next)
    for (name, a), b in zip(ours.model.state_dict().items(), stock.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_every_gn_det_head_and_roi_heads_class_builds_from_a_python_config():
    """Plain constructor arguments: each registered head and ROI-heads class, and the box predictor, is a LazyCall
    target."""
    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.layers import ShapeSpec

    import gn_det
    from gn_det.modeling.heads import GNConvFCHead, GNMaskHead, GNRes5ROIHeads, GNRPNHead, GNStandardROIHeads
    from gn_det.modeling.meta_arch import GNGeneralizedRCNN

    box = instantiate(L(GNConvFCHead)(input_shape=ShapeSpec(channels=64, height=7, width=7), conv_dims=[64] * 4,
                                      fc_dims=[128], conv_norm=gn_det.GN(num_groups=16), ws=True))
    assert box.conv1.norm.num_groups == 16 and type(box.conv1).__name__ == "WSConv2d"
    mask = instantiate(L(GNMaskHead)(input_shape=ShapeSpec(channels=64, height=14, width=14), num_classes=3,
                                     conv_dims=[64] * 5, conv_norm=gn_det.GN(dim_per_group=16)))
    assert mask.mask_fcn1.norm.num_groups == 4
    rpn = instantiate(L(GNRPNHead)(in_channels=64, num_anchors=3, conv_norm=gn_det.GN(num_groups=8),
                                   cpu_fast_path=True))
    assert rpn.conv.norm.num_groups == 8 and type(rpn.conv.activation).__name__ == "CPUInplaceReLU"

    fpn = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    fpn._target_ = GNGeneralizedRCNN
    fpn.roi_heads._target_ = GNStandardROIHeads
    fpn.roi_heads.box_head._target_ = GNConvFCHead
    fpn.roi_heads.mask_head._target_ = GNMaskHead
    fpn.proposal_generator.head._target_ = GNRPNHead
    fpn.roi_heads.box_predictor._target_ = "gn_det.layers.onnx_nms.OnnxNMSOutputLayers"  # as docs/DEPLOY.md says
    fpn.backbone.bottom_up.stages.depth = 18
    del fpn.backbone.bottom_up.stages.stride_in_1x1
    gn_det.lazy.set_norm(fpn, gn_det.GN(num_groups=32))
    model = instantiate(fpn)
    assert type(model.roi_heads.box_head).__name__ == "GNConvFCHead"
    assert type(model.roi_heads.box_predictor).__name__ == "OnnxNMSOutputLayers"
    assert type(model.proposal_generator.rpn_head.conv.norm).__name__ == "GroupNorm"

    c4 = model_zoo.get_config("common/models/mask_rcnn_c4.py").model
    c4.roi_heads._target_ = GNRes5ROIHeads
    gn_det.lazy.set_norm(c4, gn_det.GN(num_groups=16))
    assert instantiate(c4).roi_heads.res5[0].conv1.norm.num_groups == 16


def test_predict_with_weights_of_another_norm_is_one_line(tmp_path):
    """A BN* config given a GN run's weights: detectron2 alone would log the unloaded norms and predict from a
    half-loaded model; gn-det's predict loads strictly and names the file and the first parameter."""
    from PIL import Image

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from conftest import tool_exit_message
    from gn_det.config import get_gn_cfg

    DetectionCheckpointer(build_model(get_gn_cfg(GN_YAML, ["MODEL.DEVICE", "cpu"])), str(tmp_path)).save("gn")
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    bnstar = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bnstar.yaml")
    message = tool_exit_message("predict.py", "--config-file", bnstar, "--weights", tmp_path / "gn.pth",
                                tmp_path / "a.png", "--out", tmp_path / "out")
    assert f"weights file {tmp_path}/gn.pth does not fit the model:" in message, message
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converted_gn_r18(tmp_path_factory):
    """torchvision's ResNet-18 with GroupNorm(32), converted by gn-det (weights that expect RGB input)."""
    import torchvision

    from gn_det.checkpoint import convert_weights

    root = tmp_path_factory.mktemp("converted")
    source = torchvision.models.resnet18(norm_layer=lambda channels: torch.nn.GroupNorm(32, channels))
    torch.save(source.state_dict(), root / "r18_gn.pth")
    convert_weights(str(root / "r18_gn.pth"), str(root / "r18_gn.pkl"))
    return str(root / "r18_gn.pkl")


@pytest.mark.parametrize("system", SYSTEMS)
def test_converted_weights_for_other_input_are_one_line(system, dataset, tmp_path, converted_gn_r18):
    """The shapes configs read BGR: converted timm/torchvision weights, which expect RGB, are refused before
    training, in the same words for both systems (read off the built model)."""
    refused(args_for(system, dataset, tmp_path / "out", weights=converted_gn_r18),
            rf"^INPUT\.FORMAT / model\.input_format is 'BGR', but {converted_gn_r18} holds ResNet-18 GN weights "
            r"\(timm\) that expect 'RGB'$")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("system", SYSTEMS)
def test_a_mask_model_refuses_a_dataset_without_segmentations(system, dataset, tmp_path, tiny_dataset_specs):
    import json

    from gn_det.data import register_datasets

    json_file, image_dir = tiny_dataset_specs[1].partition("=")[2].partition("=")[2].split(",")
    coco = json.loads(open(json_file).read())
    first = coco["annotations"][0]
    del first["segmentation"]
    boxes_only = tmp_path / "boxes_only.json"
    boxes_only.write_text(json.dumps(coco))
    name, = register_datasets([f"boxes_only_{system}={boxes_only},{image_dir}"])
    key = "DATASETS.TEST" if system == "yaml" else r"dataloader\.test\.dataset\.names"
    refused(args_for(system, (dataset[0], name), tmp_path / "out"),
            rf": {key} dataset '{name}': {boxes_only}: annotation {first['id']!r} has no segmentation, which a model "
            "predicting masks needs")
    assert not (tmp_path / "out").exists()
