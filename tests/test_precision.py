"""MODEL.PRECISION / MODEL.CHANNELS_LAST / MODEL.CPU_FAST_PATH: the fast path keeps outputs, the switches live
with the model, and the CPU pieces are built into it and act only on CPU.

Accuracy guard (tiny R-18 GN FPN, random weights, fixed 128 px input): bf16 + channels_last backbone features are
within 3% relative L2 error of fp32 (measured ~1.5-1.8%: bfloat16 keeps 8 significant bits) and every training
loss within 2% of fp32 (measured < 0.4%). docs/SPEED.md states the same tolerances.
"""
import json
import os

import pytest

pytest.importorskip("detectron2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.modeling import GeneralizedRCNN, build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from conftest import BNSTAR_FPN, CONFIG_DIR, GN_FPN, TINY_OPTS, tool_exit_message, tool_main  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.analysis.random_inputs import random_detection_batch  # noqa: E402

SWITCHES = ["MODEL.PRECISION", "bf16", "MODEL.CHANNELS_LAST", "True"]
FAST = SWITCHES + ["MODEL.CPU_FAST_PATH", "True"]
STOCK_HEADS = ["MODEL.META_ARCHITECTURE", "GeneralizedRCNN", "MODEL.ROI_HEADS.NAME", "StandardROIHeads",
               "MODEL.RPN.HEAD_NAME", "StandardRPNHead"]
SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
               "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
               "MODEL.RPN.POST_NMS_TOPK_TEST", "64", "TEST.DETECTIONS_PER_IMAGE", "20",
               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.FPN.OUT_CHANNELS", "64",
               "MODEL.ROI_BOX_HEAD.CONV_DIM", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "256", "MODEL.ROI_MASK_HEAD.CONV_DIM",
               "64"]
RETINANET = os.path.join(CONFIG_DIR, "COCO-Detection", "retinanet_R_50_FPN_3x_gn.yaml")
FEATURE_RTOL = 0.03  # relative L2 error of each FPN level
LOSS_RTOL = 0.02


def tiny_cfg(*opts, config=GN_FPN):
    return get_gn_cfg(config, TINY_OPTS + SMALL_INPUT + list(opts))


def build(*opts, config=GN_FPN):
    torch.manual_seed(0)
    return build_model(tiny_cfg(*opts, config=config))


def fp32_and_fast(config=GN_FPN, fast_opts=FAST):
    """An fp32 model and a model built with ``fast_opts`` (bf16 + channels_last + CPU fast path), same weights."""
    reference = build(config=config)
    fast = build(*fast_opts, config=config)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def training_losses(model, batch, seed=0):
    model.train()
    torch.manual_seed(seed)  # same proposal/anchor sampling for both models
    with EventStorage():
        return model(batch)


def record_stem_input(model, conv):
    """Forward hook on ``conv`` recording the dtype and layout it computes with."""
    seen = []

    def hook(module, inputs, output):
        seen.append((output.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    conv.register_forward_hook(hook)
    return seen


def assert_float_fields(instances):
    for name, value in instances.get_fields().items():
        tensor = getattr(value, "tensor", value)
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name
        else:
            assert tensor.dtype in (torch.bool, torch.int64), name


def test_fast_backbone_features_match_fp32():
    reference, fast = fp32_and_fast()
    batch = random_detection_batch(num_images=2, height=128, width=128)
    with torch.no_grad():
        expected = reference.backbone(reference.preprocess_image(batch).tensor)
        with fast.precision_context():
            images = fast.preprocess_image(batch).tensor
            assert images.is_contiguous(memory_format=torch.channels_last)
            features = fast.backbone(images)
    assert set(features) == set(expected) == {"p2", "p3", "p4", "p5", "p6"}
    for level, feature in features.items():
        assert feature.dtype == torch.bfloat16, level
        error = (feature.float() - expected[level]).norm() / expected[level].norm()
        assert error < FEATURE_RTOL, (level, error.item())


@pytest.mark.slow
def test_fast_training_losses_match_fp32_and_are_float32():
    reference, fast = fp32_and_fast()
    batch = random_detection_batch(num_images=2, height=128, width=128)
    expected = training_losses(reference, batch)
    losses = training_losses(fast, batch)
    assert set(losses) == set(expected)
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        assert abs(loss.item() - expected[name].item()) <= LOSS_RTOL * abs(expected[name].item()), name
    sum(losses.values()).backward()
    grads = [p.grad for p in fast.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)  # float32 weights get float32 gradients


@pytest.mark.slow
def test_fast_inference_outputs_are_float32():
    model = build(*FAST)
    model.eval()
    batch = [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}]
    with torch.no_grad():
        (result,) = model(batch)
        (raw,) = model.inference(batch, do_postprocess=False)
    assert len(result["instances"]) > 0
    assert_float_fields(result["instances"])
    assert result["instances"].pred_masks.dtype == torch.bool
    assert_float_fields(raw)  # unthresholded mask probabilities included
    assert raw.pred_masks.dtype == torch.float32


@pytest.mark.slow
def test_fp32_default_is_stock_generalized_rcnn():
    ours = build()
    assert type(ours).__name__ == "GNGeneralizedRCNN" and ours.precision == "fp32" and not ours.channels_last
    stock = build(*STOCK_HEADS)
    assert type(stock) is GeneralizedRCNN and type(stock.roi_heads).__name__ == "StandardROIHeads"
    stock.load_state_dict(ours.state_dict())
    batch = [{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}]
    with torch.no_grad():
        ours_out = ours.eval()(batch)[0]["instances"]
        stock_out = stock.eval()(batch)[0]["instances"]
    assert torch.equal(ours_out.pred_boxes.tensor, stock_out.pred_boxes.tensor)
    assert torch.equal(ours_out.scores, stock_out.scores)
    assert torch.equal(ours_out.pred_masks, stock_out.pred_masks)


def test_channels_last_keeps_state_dict_names_and_loads_checkpoints():
    reference = build()
    fast = build("MODEL.CHANNELS_LAST", "True")
    assert list(fast.state_dict()) == list(reference.state_dict())
    conv_weights = [p for p in fast.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    fast.load_state_dict(reference.state_dict())  # an NCHW checkpoint loads; the layout stays channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    for (name, value), expected in zip(fast.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


def test_fp16_on_cpu_is_a_one_line_error():
    with pytest.raises(ValueError, match="MODEL.PRECISION='fp16' needs a CUDA device") as error:
        build("MODEL.PRECISION", "fp16")
    assert "\n" not in str(error.value)


def test_which_devices_compute_bf16_natively(monkeypatch):
    """The CPU by oneDNN's kernels; NVIDIA GPUs from compute capability 8.0 (below it, no bf16 tensor cores and no
    cuDNN bf16 convolutions); ROCm GPUs always, as torch counts them."""
    import gn_det.config
    from gn_det.config import missing_bf16_kernels

    for native in (True, False):
        monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: native)
        assert (missing_bf16_kernels(torch.device("cpu")) is None) is native
    asked = []
    for capability, missing in (((6, 1), True), ((7, 5), True), ((8, 0), False), ((8, 9), False), ((9, 0), False)):
        monkeypatch.setattr(gn_det.config, "gpu_compute_capability", lambda index: asked.append(index) or capability)
        line = missing_bf16_kernels(torch.device("cuda", 1))
        assert (line == "No bf16 tensor cores on this GPU (compute capability %d.%d; bf16 needs 8.0 or newer)"
                % capability) if missing else line is None
    assert set(asked) == {1}  # the GPU the model is on
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert missing_bf16_kernels(torch.device("cuda", 0)) is None
    assert missing_bf16_kernels(torch.device("meta")) is None


def test_unknown_precision_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"MODEL.PRECISION='float16' is not a precision; choose one of") as error:
        build("MODEL.PRECISION", "float16")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_default_predictor_gets_the_switches(monkeypatch):
    """A model built by the user's own code computes as its config asks; on a CPU without oneDNN bf16 kernels it
    says once that bf16 is emulated there (gn-det's tools would have run it in fp32)."""
    import gn_det.config
    from gn_det.modeling import meta_arch

    predictor = DefaultPredictor(tiny_cfg(*FAST))  # build_model + eval + checkpoint load, as users do
    stem = record_stem_input(predictor.model, predictor.model.backbone.bottom_up.stem.conv1)
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)  # BGR, HWC
    warnings = []
    monkeypatch.setattr(meta_arch.logger, "warning", warnings.append)
    monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: True)
    result = predictor(image)
    assert not warnings
    monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: False)
    predictor(image)
    predictor(image)
    assert warnings == ["No oneDNN bf16 kernels for this CPU (x86: AVX512 or newer): precision='bf16' is emulated by "
                        "torch, slower than 'fp32' (docs/SPEED.md)"]
    assert stem == [(torch.bfloat16, True)] * 3
    assert result["instances"].image_size == (96, 128)
    assert_float_fields(result["instances"])


def test_retinanet_honours_the_switches():
    reference, fast = fp32_and_fast(config=RETINANET, fast_opts=SWITCHES)
    assert type(fast).__name__ == "GNRetinaNet"
    assert list(fast.state_dict()) == list(reference.state_dict())
    stem = record_stem_input(fast, fast.backbone.bottom_up.stem.conv1)
    batch = random_detection_batch(num_images=2, height=128, width=128)
    expected = training_losses(reference, batch)
    losses = training_losses(fast, batch)
    assert stem == [(torch.bfloat16, True)]
    for name, loss in losses.items():
        assert loss.dtype == torch.float32, name
        assert abs(loss.item() - expected[name].item()) <= LOSS_RTOL * abs(expected[name].item()), name
    fast.eval()
    with torch.no_grad():
        (result,) = fast([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}])
    assert_float_fields(result["instances"])


@pytest.mark.slow
def test_benchmark_tool_smoke(tmp_path, capsys, monkeypatch):
    """The tool runs the stock bf16 + NHWC peer and gn-det's fast path, each in its own process, and prints the
    wall-clock and CPU-time tables with ratios to the baseline and to the peer."""
    output = tmp_path / "benchmark.json"
    tiny = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.RPN.POST_NMS_TOPK_TEST", "64",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "TEST.DETECTIONS_PER_IMAGE", "10",
            # narrow FPN and heads: the peer runs bf16 wherever the test runs, emulated on a CPU without bf16
            "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_BOX_HEAD.CONV_DIM", "64",
            "MODEL.ROI_MASK_HEAD.CONV_DIM", "64"]
    variants = ["d2_gn_bf16_nhwc", "gn_fast"]  # the peer first: it is also the baseline
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    # the tool in this process; each variant still runs in a fresh subprocess of its own
    tool_main("benchmark.py", "--size", "64", "--images", "1", "--warmup", "0", "--repeats", "2",
              "--variants", *variants, "--output", output, "--config", *tiny)
    stdout = capsys.readouterr().out
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    wall, cpu = rows[:4], rows[4:]  # the wall-clock table, then the same runs in CPU time
    assert "train s/iter" in wall[0] and "train x peer" in wall[0] and "infer x peer" in wall[0]
    assert "peak MiB (train)" in wall[0] and "train cpu-s/iter" in cpu[0]
    for table in (wall, cpu):
        assert [row.split("|")[1].strip() for row in table[2:]] == variants
    report = json.loads(output.read_text())
    assert list(report["variants"]) == variants and report["baseline"] == "d2_gn_bf16_nhwc"
    assert report["variants"]["d2_gn_bf16_nhwc"]["wrap"] == "bf16_nhwc"
    for result in report["variants"].values():
        assert result["train_s_per_iter"] > 0 and result["infer_s_per_image"] > 0 and result["train_peak_mib"] > 0
        for phase in ("train_times", "infer_times"):  # two timed calls per phase, their median reported
            assert len(result[phase]["wall_s"]) == len(result[phase]["cpu_s"]) == 2
        assert result["train_s_per_iter"] == pytest.approx(sum(result["train_times"]["wall_s"]) / 2)


def test_benchmark_calibrates_frozen_bn_statistics_and_runs_no_pass_for_other_models():
    """The calibration pass sets BN* statistics to its input's; a model without FrozenBN gets no pass, which
    would count in its inference peak memory."""
    from detectron2.layers import FrozenBatchNorm2d

    from gn_det.analysis.benchmark import calibrate_frozen_batchnorm

    batch = [{"image": torch.rand(3, 64, 64) * 255}]
    for config, calibrated in ((BNSTAR_FPN, True), (GN_FPN, False)):
        model = build(config=config)
        passes = []
        model.backbone.register_forward_hook(lambda *_: passes.append(1))
        stem_norm = model.backbone.bottom_up.stem.conv1.norm
        calibrate_frozen_batchnorm(model, batch)
        assert len(passes) == calibrated and isinstance(stem_norm, FrozenBatchNorm2d) == calibrated
        if calibrated:
            assert not torch.equal(stem_norm.running_mean, torch.zeros_like(stem_norm.running_mean))


def test_export_protocol_table_names_each_file_and_compares_with_the_fastest_stock_path():
    from gn_det.analysis.benchmark import export_protocol_table

    def result(seconds, export=None, precision=None):
        return {"infer_s_per_image": seconds, "infer_peak_mib": 100.0, "export": export,
                "openvino_precision": precision}
    report = {"baseline": "d2_gn_fp32", "variants": {
        "d2_gn_fp32": result(3.0),
        "d2_gn_openvino_f32": result(2.5, ["onnx", "onnxruntime", "openvino", "f32"], "f32"),
        "gn_openvino": result(2.0, ["openvino", "openvino", "openvino", "default"], "bf16"),
        "gn_openvino_int8": result(1.0, ["openvino-int8", "openvino", "openvino", "default"], "bf16")}}
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in export_protocol_table(report).splitlines()[2:]]
    assert [row[:2] for row in rows] == [["d2_gn_fp32", "eager"], ["d2_gn_openvino_f32", "onnx in openvino (f32)"],
                                         ["gn_openvino", "OpenVINO IR in openvino (bf16)"],
                                         ["gn_openvino_int8", "int8 OpenVINO IR in openvino (bf16)"]]
    assert [row[3:5] for row in rows] == [["1.000", "0.833"], ["1.200", "1.000"], ["1.500", "1.250"],
                                          ["3.000", "2.500"]]  # x stock fp32, x the fastest stock path


def test_benchmark_rounds_pool_their_timed_calls():
    """--rounds: each round is a fresh process; the report pools every round's timed calls and keeps the highest
    peak memory."""
    from gn_det.analysis.benchmark import merge_rounds

    def round_result(wall, peak):
        times = {"wall_s": wall, "cpu_s": [2 * t for t in wall]}
        return {"train_times": times, "infer_times": times, "train_peak_mib": peak, "infer_peak_mib": peak}

    merged = merge_rounds([round_result([1.0, 3.0], 10.0), round_result([2.0, 5.0], 12.0)], images=2)
    assert merged["train_times"]["wall_s"] == [1.0, 3.0, 2.0, 5.0] and merged["train_peak_mib"] == 12.0
    assert merged["train_s_per_iter"] == 2.5 and merged["infer_s_per_image"] == 1.25  # 2 images per call
    assert merged["train_cpu_s_per_iter"] == 5.0


def random_rois(generator, count, x_range, y_range, size_range):
    """``count`` ROIAlign rois (image index in {0, 1}, x0, y0, x1, y1): corners uniform in the ranges, width and
    height uniform in ``size_range``."""
    x0 = torch.rand(count, generator=generator) * (x_range[1] - x_range[0]) + x_range[0]
    y0 = torch.rand(count, generator=generator) * (y_range[1] - y_range[0]) + y_range[0]
    size = torch.rand(count, 2, generator=generator) * (size_range[1] - size_range[0]) + size_range[0]
    image = torch.randint(0, 2, (count,), generator=generator).float()
    return torch.stack([image, x0, y0, x0 + size[:, 0], y0 + size[:, 1]], 1)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("channels_last", [True, False])
def test_sparse_matrix_roi_align_equals_detectron2_roi_align(aligned, sampling_ratio, channels_last):
    from detectron2.layers import ROIAlign

    from gn_det.cpu import SparseMatrixROIAlign

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 25, 31, generator=gen)
    rois = random_rois(gen, 40, x_range=(-20, 120), y_range=(0, 110), size_range=(0, 70))  # some cross borders
    expected_in = features.clone().requires_grad_()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    ours_in = features.contiguous(memory_format=layout).requires_grad_()
    expected = ROIAlign((7, 7), 0.25, sampling_ratio, aligned)(expected_in, rois)
    ours = SparseMatrixROIAlign((7, 7), 0.25, sampling_ratio, aligned)(ours_in, rois)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    grad = torch.randn_like(expected)
    expected.backward(grad)
    ours.backward(grad)
    torch.testing.assert_close(ours_in.grad, expected_in.grad, rtol=0, atol=1e-5)


def test_sparse_matrix_roi_align_reads_bfloat16_features_as_they_are_in_inference_only():
    """CPU inference on bf16 features pools them directly (bf16 bilinear weights, float32 sums): within 0.5%
    relative L2 of float32 pooling of the float32 features (measured 0.27%; float32 pooling of the bf16
    features, rounded to bf16, 0.23%). With a gradient to compute it pools in float32, exactly as on a float32
    copy."""
    from gn_det.cpu import SparseMatrixROIAlign, pools_in_bfloat16

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 64, 64, 64, generator=gen).contiguous(memory_format=torch.channels_last)
    rois = random_rois(gen, 200, x_range=(0, 200), y_range=(0, 200), size_range=(4, 64))
    pooler = SparseMatrixROIAlign((7, 7), 0.25, 0, True)
    reference = pooler(features, rois)
    low = features.bfloat16()
    with torch.no_grad():
        assert pools_in_bfloat16(low) and not pools_in_bfloat16(features)
        pooled = pooler(low, rois)
    assert pooled.dtype == torch.bfloat16
    assert ((pooled.float() - reference).norm() / reference.norm()).item() < 0.005

    trained = low.clone().requires_grad_()
    assert not pools_in_bfloat16(trained)
    pooled_with_grad = pooler(trained, rois)
    assert torch.equal(pooled_with_grad, pooler(low.float(), rois).bfloat16())


def test_fast_path_pools_with_sparse_matrix_roi_align():
    from gn_det.cpu import LayoutPreservingROIPooler, SparseMatrixROIAlign

    def poolers(model):
        names = [type(m).__name__ for m in model.roi_heads.modules()]
        return [name for name in names if name.endswith(("ROIPooler", "ROIAlign"))]

    assert set(poolers(build())) == {"ROIPooler", "ROIAlign"}  # fp32 default: detectron2's own
    assert set(poolers(build(*SWITCHES))) == {"ROIPooler", "ROIAlign"}  # the switches alone change no module
    fast = {LayoutPreservingROIPooler.__name__, SparseMatrixROIAlign.__name__}
    assert set(poolers(build(*FAST))) == fast
    assert set(poolers(build("MODEL.CPU_FAST_PATH", "True"))) == fast


def fpn_features_and_boxes(channels_last):
    """Four FPN-like levels (strides 4-32) of 2 images of 512 px, and boxes of 4-500 px on all four levels."""
    from detectron2.modeling.poolers import assign_boxes_to_levels
    from detectron2.structures import Boxes

    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    features = [torch.randn(2, 8, 512 // s, 512 // s, generator=gen).contiguous(memory_format=layout)
                for s in (4, 8, 16, 32)]
    boxes = [Boxes(random_rois(gen, 80, x_range=(0, 400), y_range=(0, 400), size_range=(4, 500))[:, 1:])
             for _ in range(2)]
    assert set(assign_boxes_to_levels(boxes, 2, 5, 224, 4).tolist()) == {0, 1, 2, 3}
    return [f.requires_grad_() for f in features], boxes


@pytest.mark.parametrize("channels_last", [True, False])
def test_layout_preserving_pooler_equals_detectron2_pooler(channels_last):
    """The fast path's ROIPooler gives detectron2's values and gradients exactly, as a tensor of the features'
    layout (channels_last features: no element-by-element transposition when gathering the levels)."""
    from detectron2.modeling.poolers import ROIPooler

    from gn_det.cpu import LayoutPreservingROIPooler, SparseMatrixROIAlign

    ours = LayoutPreservingROIPooler.like(ROIPooler(7, (1 / 4, 1 / 8, 1 / 16, 1 / 32), 0, "ROIAlignV2"))
    assert type(ours) is LayoutPreservingROIPooler
    assert all(type(level) is SparseMatrixROIAlign for level in ours.level_poolers)
    features, boxes = fpn_features_and_boxes(channels_last)
    expected = ROIPooler.forward(ours, features, boxes)  # detectron2's gather over the same levels
    pooled = ours(features, boxes)
    assert pooled.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(pooled, expected)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, features, grad)
    for got, want in zip(torch.autograd.grad(pooled, features, grad), expected_grads):
        assert torch.equal(got, want)


def random_box_predictions(num_proposals, num_classes, stacked, seed=0):
    """Per-class boxes (R x 4K) and softmax scores (R x K+1). ``stacked``: every box is the same one, so NMS
    keeps one per class; else random boxes over a 400 px square."""
    generator = torch.Generator().manual_seed(seed)
    if stacked:
        boxes = torch.tensor([100.0, 100.0, 150.0, 150.0]).repeat(num_proposals, num_classes)
    else:
        corners = torch.rand(num_proposals, num_classes, 2, generator=generator) * 400
        sizes = torch.rand(num_proposals, num_classes, 2, generator=generator) * 40 + 20
        boxes = torch.cat([corners, corners + sizes], dim=2).flatten(1)
    scores = torch.randn(num_proposals, num_classes + 1, generator=generator).softmax(dim=1)
    return boxes, scores


def detections(result):
    instances, kept = result
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes, kept


@pytest.mark.parametrize("stacked", [False, True])
def test_top_scores_first_nms_equals_detectron2(monkeypatch, stacked):
    """Same detections as detectron2's fast_rcnn_inference_single_image, whether the first 4 x topk pairs are
    enough (random boxes) or NMS leaves too few and the subset grows to the full run (stacked boxes: one
    survivor per class, 10 in all)."""
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

    import gn_det.cpu.box_predictor as box_predictor

    thresholds = []

    def recording(boxes, scores, image_shape, score_thresh, *args):
        thresholds.append(score_thresh)
        return fast_rcnn_inference_single_image(boxes, scores, image_shape, score_thresh, *args)

    monkeypatch.setattr(box_predictor, "fast_rcnn_inference_single_image", recording)
    boxes, scores = random_box_predictions(300, 10, stacked)
    for topk in (20, 100):
        thresholds.clear()
        ours = box_predictor.top_scores_first_inference_single_image(boxes, scores, (512, 512), 0.0, 0.5, topk)
        expected = fast_rcnn_inference_single_image(boxes, scores, (512, 512), 0.0, 0.5, topk)
        for got, want in zip(detections(ours), detections(expected)):
            assert torch.equal(got, want)
        if stacked:  # thresholds lowered until the full run at the configured 0.0
            assert len(thresholds) > 1 and thresholds[-1] == 0.0 and thresholds == sorted(thresholds, reverse=True)
        else:  # one NMS over the top 4 x topk pairs
            assert len(thresholds) == 1 and thresholds[0] > 0.0, thresholds


def test_fast_path_predicts_boxes_with_top_scores_first():
    from gn_det.cpu import TopScoresFirstOutputLayers
    from gn_det.layers.onnx_nms import OnnxNMSOutputLayers

    reference = build()
    # fp32 default: detectron2's inference (test_fp32_default_is_stock_generalized_rcnn), per-class NMS in ONNX
    assert type(reference.roi_heads.box_predictor) is OnnxNMSOutputLayers
    assert type(build(*SWITCHES).roi_heads.box_predictor) is OnnxNMSOutputLayers
    fast = build(*FAST)
    assert type(fast.roi_heads.box_predictor) is TopScoresFirstOutputLayers
    # same names, and the same initial weights from the same seed (the fast predictor leaves the RNG as it was)
    for (name, value), expected in zip(fast.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("option, value, minimum",
                         [("--rounds", "0", 1), ("--repeats", "0", 1), ("--warmup", "-1", 0), ("--images", "0", 1)])
def test_benchmark_rejects_counts_out_of_range(option, value, minimum):
    """A count that would leave nothing to measure is a one-line usage error naming the option, before any
    variant runs."""
    expected = f"benchmark.py: error: argument {option}: {value} is not a whole number >= {minimum}"
    assert tool_exit_message("benchmark.py", option, value) == expected


def test_group_norm_on_roi_sized_channels_last_maps_runs_on_an_nchw_copy():
    """PyTorch's channels_last GroupNorm kernel is slow on small bf16 maps with few channels per group (RoI
    features: 7x7 or 14x14, 8 channels per group); gn-det's GroupNorm computes those on an NCHW copy. Values
    and gradients are exactly those of the NCHW kernel and the output stays channels_last; other inputs run
    as they are."""
    import torch.nn.functional as F

    from gn_det.cpu import NCHWCopyGroupNorm, runs_faster_in_nchw

    torch.manual_seed(0)
    norm = NCHWCopyGroupNorm(32, 256)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.1, 0.1)
    weight, bias = norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_()
    roi_features = (torch.randn(6, 256, 7, 7) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours_in = roi_features.clone().requires_grad_()
    expected_in = roi_features.contiguous().requires_grad_()
    assert runs_faster_in_nchw(ours_in, 32)
    ours = norm(ours_in)
    expected = F.group_norm(expected_in, 32, weight, bias, norm.eps)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, expected)
    grad = torch.randn_like(expected)
    ours.backward(grad)
    expected.backward(grad)
    for got, want in [(ours_in.grad, expected_in.grad), (norm.weight.grad, weight.grad), (norm.bias.grad, bias.grad)]:
        assert torch.equal(got, want)

    assert not runs_faster_in_nchw(roi_features.contiguous(), 32)  # already NCHW
    assert not runs_faster_in_nchw(roi_features, 8)  # 32 channels per group fill a vector register
    assert not runs_faster_in_nchw(roi_features.float(), 32)  # float32: the channels_last kernel is faster
    backbone_map = torch.randn(1, 256, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert not runs_faster_in_nchw(backbone_map, 32)  # 1024 pixels: the kernel parallelises over pixels


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def inference_with_chunk_bytes(model, batch, chunk_bytes):
    from gn_det.cpu import RoIChunkedInference

    for module in model.modules():
        if isinstance(module, RoIChunkedInference):
            module.inference_chunk_bytes = chunk_bytes
    with torch.no_grad():
        return model(batch)


def assert_same_instances(results, expected_results, atol=0.0):
    """Same instances: integer and boolean fields equal, float fields within ``atol`` (0: bit-equal)."""
    for result, expected in zip(results, expected_results):
        got, want = result["instances"], expected["instances"]
        assert len(want) > 0 and len(got) == len(want)
        for name, value in want.get_fields().items():
            got_value, want_value = getattr(got.get(name), "tensor", got.get(name)), getattr(value, "tensor", value)
            if want_value.is_floating_point():
                torch.testing.assert_close(got_value, want_value, rtol=0, atol=atol, msg=name)
            else:
                assert torch.equal(got_value, want_value), name


# bf16 CPU kernels round differently for different numbers of RoIs per call (measured: boxes 1.5e-5 px apart
# on this test's model, scores and classes equal); the heads' arithmetic per RoI is the same.
CHUNKED_ATOL = 1e-3


@pytest.mark.slow
def test_fast_cpu_inference_runs_roi_heads_in_chunks_with_the_same_outputs():
    """Box and mask heads see the RoIs in chunks (here forced small) and give the unchunked results, up to bf16
    kernels' rounding; training never chunks, and without MODEL.CPU_FAST_PATH chunking is off."""
    from gn_det.cpu import INFERENCE_CHUNK_BYTES

    assert build().roi_heads.box_head.inference_chunk_bytes == 0  # fp32 default: detectron2's behaviour
    assert build(*SWITCHES).roi_heads.mask_head.inference_chunk_bytes == 0
    model = build(*FAST, "MODEL.RPN.POST_NMS_TOPK_TEST", "100").eval()
    assert model.roi_heads.box_head.inference_chunk_bytes == INFERENCE_CHUNK_BYTES
    assert model.roi_heads.mask_head.inference_chunk_bytes == INFERENCE_CHUNK_BYTES
    batch = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128} for _ in range(2)]
    box_calls, mask_calls = count_calls(model.roi_heads.box_head.conv1), count_calls(model.roi_heads.mask_head.mask_fcn1)

    expected = inference_with_chunk_bytes(model, batch, 0)
    assert (len(box_calls), len(mask_calls)) == (1, 1)
    box_calls.clear(), mask_calls.clear()
    results = inference_with_chunk_bytes(model, batch, 64 * 2**10)  # ~10 box-head RoIs, ~2 mask-head RoIs
    assert len(box_calls) > 10 and len(mask_calls) > 10
    assert_same_instances(results, expected, atol=CHUNKED_ATOL)

    box_calls.clear()
    losses = training_losses(model, random_detection_batch(num_images=2, height=128, width=128, num_classes=3))
    assert len(box_calls) == 1 and all(torch.isfinite(loss) for loss in losses.values())


@pytest.mark.slow
def test_fast_cpu_inference_runs_c4_res5_in_chunks_with_the_same_outputs():
    path = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_C4_2x_gn.yaml")
    model = build(*FAST, "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.RESNETS.WIDTH_PER_GROUP", "16",
                  config=path).eval()
    batch = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]
    res5_calls = count_calls(model.roi_heads.res5)
    expected = inference_with_chunk_bytes(model, batch, 0)
    calls_unchunked = len(res5_calls)
    results = inference_with_chunk_bytes(model, batch, 512 * 2**10)  # 5 RoIs of 14x14x256 bf16 per chunk
    assert len(res5_calls) - calls_unchunked > 2 * calls_unchunked
    assert_same_instances(results, expected, atol=CHUNKED_ATOL)


@pytest.mark.slow
def test_fast_path_runs_head_relus_in_place_with_the_same_values():
    """The fast path's head ReLUs (box head, mask head, RPN conv) overwrite their inputs; losses, gradients and
    detections are exactly those of the same model with detectron2's out-of-place ReLUs. Without
    MODEL.CPU_FAST_PATH the heads keep detectron2's ``nn.ReLU()``."""
    import copy

    from torch import nn

    from gn_det.cpu import CPUInplaceReLU

    for opts in ([], SWITCHES):
        relus = [m for m in build(*opts).modules() if isinstance(m, nn.ReLU)]
        assert relus and all(type(m) is nn.ReLU and not m.inplace for m in relus)
    model = build("MODEL.CPU_FAST_PATH", "True")  # in fp32: the check is of values, bf16 only adds time
    heads = (model.roi_heads.box_head, model.roi_heads.mask_head, model.proposal_generator.rpn_head)
    for head in heads:
        relus = [m for m in head.modules() if isinstance(m, nn.ReLU)]
        assert relus and all(type(m) is CPUInplaceReLU for m in relus), type(head).__name__
    reference = copy.deepcopy(model)
    for module in list(reference.modules()):
        for name, child in module.named_children():
            if isinstance(child, CPUInplaceReLU):
                setattr(module, name, nn.ReLU())

    batch = random_detection_batch(num_images=1, height=128, width=128, num_classes=3)
    gradients = []
    for net in (model, reference):
        losses = training_losses(net, batch)
        net.zero_grad()
        sum(losses.values()).backward()
        gradients.append((losses, {name: p.grad for name, p in net.named_parameters() if p.grad is not None}))
    (losses, grads), (expected_losses, expected_grads) = gradients
    assert all(torch.equal(losses[k], expected_losses[k]) for k in expected_losses)
    assert grads.keys() == expected_grads.keys() and all(torch.equal(grads[k], expected_grads[k]) for k in grads)

    images = [{"image": torch.rand(3, 128, 128) * 255, "height": 128, "width": 128}]
    with torch.no_grad():
        assert_same_instances(model.eval()(images), reference.eval()(images))


def test_print_of_the_fast_model_shows_the_cpu_pieces():
    """The CPU pieces are modules of the model as built: ``print(model)`` names every one of them, and a model
    without MODEL.CPU_FAST_PATH names none."""
    cpu_classes = ["LayoutPreservingROIPooler", "SparseMatrixROIAlign", "TopScoresFirstOutputLayers",
                   "NCHWCopyGroupNorm", "CPUInplaceReLU"]
    printed = str(build(*FAST))
    assert all(name in printed for name in cpu_classes), [name for name in cpu_classes if name not in printed]
    printed = str(build(*SWITCHES))
    assert not any(name in printed for name in cpu_classes)


def spy(monkeypatch, cls, method):
    """Replace ``cls.method`` by a recorder that calls the original; returns the list of recorded calls."""
    calls = []
    original = getattr(cls, method)

    def recorder(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, recorder)
    return calls


def test_cpu_pieces_compute_as_detectron2_off_the_cpu(monkeypatch):
    """A bf16 + CPU-fast-path model built on CPU and moved off it (to the "meta" device, which runs no kernel
    and stands for a GPU here): each piece hands its input to detectron2's own code, and none of its CPU code
    runs (tests/test_cuda.py checks the same on a GPU)."""
    from detectron2.layers import ROIAlign
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.structures import Boxes, Instances
    from torch.nn import functional as F

    import gn_det.cpu.box_predictor as box_predictor
    import gn_det.cpu.roi_align as roi_align
    from gn_det.cpu import runs_faster_in_nchw

    def cpu_only(*args, **kwargs):
        raise AssertionError("CPU code ran off the CPU")

    monkeypatch.setattr(roi_align, "roi_align_sampling_matrix", cpu_only)
    monkeypatch.setattr(box_predictor, "top_scores_first_inference_single_image", cpu_only)
    model = build(*FAST).to("meta").eval()
    heads = model.roi_heads

    level = heads.box_pooler.level_poolers[0]
    roi_align_calls = spy(monkeypatch, ROIAlign, "forward")
    feature = torch.empty(2, 256, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    pooled = level(feature, torch.zeros(5, 5, device="meta"))
    assert roi_align_calls == ["SparseMatrixROIAlign"] and pooled.shape == (5, 256, 7, 7)

    pooler_calls = []
    monkeypatch.setattr(ROIPooler, "forward", lambda self, x, boxes: pooler_calls.append(type(self).__name__))
    features = [torch.empty(2, 256, 32 // 2**i, 32 // 2**i, device="meta").contiguous(
        memory_format=torch.channels_last) for i in range(4)]
    heads.box_pooler(features, [Boxes(torch.zeros(3, 4, device="meta"))] * 2)
    assert pooler_calls == ["LayoutPreservingROIPooler"]

    inference_calls = []
    monkeypatch.setattr(FastRCNNOutputLayers, "inference",
                        lambda self, predictions, proposals: inference_calls.append(type(self).__name__))
    proposals = [Instances((64, 64), proposal_boxes=Boxes(torch.zeros(3, 4, device="meta")))]
    heads.box_predictor.inference(heads.box_predictor(torch.empty(3, 256, device="meta")), proposals)
    assert inference_calls == ["TopScoresFirstOutputLayers"]

    runs = []
    heads.box_head.run_in_chunks(lambda x: runs.append(len(x)), torch.empty(5000, 256, 7, 7, device="meta"))
    assert heads.box_head.inference_chunk_bytes > 0 and runs == [5000]  # all RoIs at once, as detectron2

    roi_map = torch.empty(8, 256, 7, 7, device="meta", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    assert not runs_faster_in_nchw(roi_map, 32) and runs_faster_in_nchw(torch.empty_like(roi_map, device="cpu"), 32)

    relu = heads.box_head.conv1.activation
    on_meta, on_cpu = torch.empty(4, device="meta"), torch.randn(4)
    assert relu(on_meta) is not on_meta and relu(on_cpu) is on_cpu
    assert torch.equal(relu(torch.tensor([-1.0, 2.0])), F.relu(torch.tensor([-1.0, 2.0])))


def test_fused_sgd_is_built_only_for_cpu_parameters_with_the_fast_path():
    from gn_det.solver import build_gn_optimizer

    def fused(opts, device="cpu"):
        model = build(*opts).to(device)
        return all(group["fused"] for group in build_gn_optimizer(tiny_cfg(*opts), model).param_groups)

    assert fused(FAST) and not fused([]) and not fused(SWITCHES) and not fused(FAST, device="meta")


def test_a_user_subclass_of_gn_det_meta_architecture_gets_the_switches():
    from detectron2.modeling import META_ARCH_REGISTRY

    from gn_det.modeling import GNGeneralizedRCNN

    class MyRCNN(GNGeneralizedRCNN):
        pass

    META_ARCH_REGISTRY.register(MyRCNN)
    try:
        model = build(*FAST, "MODEL.META_ARCHITECTURE", "MyRCNN")
    finally:
        META_ARCH_REGISTRY._obj_map.pop("MyRCNN")
    assert type(model) is MyRCNN and model.precision == "bf16" and model.channels_last


def test_cpu_fast_path_on_detectron2_roi_heads_is_a_one_line_input_error():
    from gn_det import InputError

    with pytest.raises(InputError, match=r"MODEL.CPU_FAST_PATH=True needs a MODEL.ROI_HEADS.NAME of .* not "
                                         r"'StandardROIHeads'") as error:
        tiny_cfg("MODEL.CPU_FAST_PATH", "True", "MODEL.ROI_HEADS.NAME", "StandardROIHeads")
    assert "\n" not in str(error.value)


def test_cpu_fast_path_on_for_a_cuda_model_is_logged_once():
    import logging

    from gn_det.cpu import cpu_fast_path, log_cpu_fast_path_off_cpu

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    # a handler on the logger itself: detectron2's setup_logger (run by earlier training tests in this process)
    # stops "gn_det" records from propagating to the root logger that pytest's caplog listens on
    records = Records()
    logger = logging.getLogger("gn_det.cpu")
    logger.addHandler(records)
    log_cpu_fast_path_off_cpu.cache_clear()
    cfg = tiny_cfg(*FAST)
    cfg.MODEL.DEVICE = "cuda"
    try:
        assert cpu_fast_path(cfg) and cpu_fast_path(cfg) and cpu_fast_path(tiny_cfg(*FAST))
    finally:
        logger.removeHandler(records)
    logged = [r.getMessage() for r in records.records]
    assert logged == ["MODEL.CPU_FAST_PATH=True on MODEL.DEVICE='cuda': its pieces compute as detectron2 does off "
                      "the CPU (gn_det/cpu)"]


@pytest.mark.parametrize("device, expected", [("foo", "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
                                              ("cuda", "--device cuda: CUDA is not available on this machine"),
                                              ("meta", "--device meta: only cpu and cuda are benchmarked")])
def test_benchmark_rejects_a_device_before_any_variant_runs(device, expected, monkeypatch):
    import gn_det.analysis.benchmark as benchmark

    def no_variant_runs(*args):
        raise AssertionError("a variant ran")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    monkeypatch.setattr(benchmark, "measure_in_subprocess", no_variant_runs)
    assert tool_exit_message("benchmark.py", "--device", device) == f"benchmark.py: error: {expected}"


def test_benchmark_checks_its_output_before_any_variant_runs(tmp_path, monkeypatch):
    import gn_det.analysis.benchmark as benchmark

    def no_variant_runs(*args):
        raise AssertionError("a variant ran")

    monkeypatch.setattr(benchmark, "measure_in_subprocess", no_variant_runs)
    message = tool_exit_message("benchmark.py", "--variants", "gn_fp32", "--output", tmp_path)
    assert message == f"benchmark.py: error: --output {tmp_path}: a folder is in the way of the output file"
