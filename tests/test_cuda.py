"""MODEL.PRECISION / MODEL.CHANNELS_LAST / MODEL.CPU_FAST_PATH on a CUDA GPU (skipped without one).

Tiny R-18 GN FPN Mask R-CNN, random weights, fixed 128 px input. Tolerances, against fp32 on the same GPU:
FPN features within 3% relative L2 error per level under bf16 (8 significant bits) and 1% under fp16 (11 bits),
as on CPU (tests/test_precision.py); detections are compared through those features because a random-weight
model's boxes depend on exactly tied scores.
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import itertools  # noqa: E402

from detectron2.engine import AMPTrainer, SimpleTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from conftest import GN_FPN, TINY_OPTS  # noqa: E402
from gn_det.config import adapt_to_this_machine, get_gn_cfg  # noqa: E402
from gn_det.analysis.random_inputs import random_detection_batch  # noqa: E402
from gn_det.solver import build_gn_optimizer  # noqa: E402

CUDA_OPTS = [opt if opt != "cpu" else "cuda" for opt in TINY_OPTS] + [
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
FEATURE_RTOL = {"bf16": 0.03, "fp16": 0.01}
# Below compute capability 8.0 torch emulates bf16 and cuDNN has no bf16 convolutions; gn-det's tools run fp32.
# torch's own answer, so that the test below checks gn-det's rule (gn_det.config.missing_bf16_kernels) against it.
NATIVE_BF16 = torch.cuda.is_bf16_supported(including_emulation=False)
needs_native_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this GPU has no bf16 tensor cores")


def cuda_cfg(*opts):
    return get_gn_cfg(GN_FPN, CUDA_OPTS + list(opts))


def build(*opts):
    torch.manual_seed(0)
    return build_model(cuda_cfg(*opts))


def batch_on_cuda(num_images=2):
    return [{**item, "image": item["image"].cuda()} for item in
            random_detection_batch(num_images=num_images, height=128, width=128, num_classes=3)]


def one_training_step(trainer_class, *opts):
    cfg = cuda_cfg(*opts)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = build_gn_optimizer(cfg, model)
    trainer = trainer_class(model, itertools.repeat(batch_on_cuda()), optimizer)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    with EventStorage():
        trainer.run_step()
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the step moved the weights
    return model


def test_fp16_training_step_through_amp_trainer():
    one_training_step(AMPTrainer, "MODEL.PRECISION", "fp16", "SOLVER.AMP.ENABLED", "True")


def test_bf16_runs_in_fp32_only_where_this_gpu_lacks_bf16_tensor_cores():
    cfg = cuda_cfg("MODEL.PRECISION", "bf16")
    lines = adapt_to_this_machine(cfg)
    expected = ("cuda", "bf16", 0) if NATIVE_BF16 else ("cuda", "fp32", 1)
    assert (cfg.MODEL.DEVICE, cfg.MODEL.PRECISION, len(lines)) == expected


@needs_native_bf16
def test_bf16_training_step():
    one_training_step(SimpleTrainer, "MODEL.PRECISION", "bf16", "MODEL.CHANNELS_LAST", "True")


@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=needs_native_bf16), "fp16"])
def test_low_precision_inference_matches_fp32(precision):
    reference = build().eval()
    model = build("MODEL.PRECISION", precision).eval()
    model.load_state_dict(reference.state_dict())
    batch = [{"image": torch.rand(3, 128, 128, device="cuda") * 255, "height": 128, "width": 128}]
    with torch.no_grad():
        expected = reference.backbone(reference.preprocess_image(batch).tensor)
        with model.precision_context():
            features = model.backbone(model.preprocess_image(batch).tensor)
        (result,) = model(batch)
    for level, feature in features.items():
        error = (feature.float() - expected[level]).norm() / expected[level].norm()
        assert error < FEATURE_RTOL[precision], (level, error.item())
    instances = result["instances"]
    assert instances.scores.dtype == torch.float32 and instances.pred_boxes.tensor.dtype == torch.float32


def test_channels_last_on_cuda():
    model = build("MODEL.CHANNELS_LAST", "True").eval()
    conv_weights = [p for p in model.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    seen = []
    model.backbone.bottom_up.stem.conv1.register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        model([{"image": torch.rand(3, 128, 128, device="cuda") * 255, "height": 128, "width": 128}])
    assert seen == [True]


@needs_native_bf16
def test_no_cpu_piece_computes_on_cuda(monkeypatch):
    """A model with every speed key on, on CUDA (built there, or built on CPU and moved), runs detectron2's
    pooler gather, torchvision's ROIAlign, detectron2's box inference, unchunked heads and out-of-place ReLUs."""
    import gn_det.cpu.box_predictor as box_predictor
    import gn_det.cpu.group_norm as group_norm
    import gn_det.cpu.roi_align as roi_align
    from gn_det.cpu import RoIChunkedInference

    def cpu_only(*args, **kwargs):
        raise AssertionError("CPU code ran on CUDA")

    monkeypatch.setattr(roi_align, "roi_align_sampling_matrix", cpu_only)
    monkeypatch.setattr(box_predictor, "top_scores_first_inference_single_image", cpu_only)
    opts = ["MODEL.PRECISION", "bf16", "MODEL.CHANNELS_LAST", "True", "MODEL.CPU_FAST_PATH", "True"]
    cpu_built = get_gn_cfg(GN_FPN, TINY_OPTS + CUDA_OPTS[len(TINY_OPTS):] + opts)
    nchw_decisions, chunk_runs = [], []
    decide = group_norm.runs_faster_in_nchw
    monkeypatch.setattr(group_norm, "runs_faster_in_nchw",
                        lambda *args: nchw_decisions.append(decide(*args)) or nchw_decisions[-1])
    run_in_chunks = RoIChunkedInference.run_in_chunks

    def counting_runs(self, run, x):
        runs = []
        output = run_in_chunks(self, lambda chunk: runs.append(1) or run(chunk), x)
        chunk_runs.append(len(runs))
        return output

    monkeypatch.setattr(RoIChunkedInference, "run_in_chunks", counting_runs)
    for model in (build(*opts), build_model(cpu_built).cuda()):
        with torch.no_grad():
            (result,) = model.eval()([{"image": torch.rand(3, 128, 128, device="cuda") * 255,
                                       "height": 128, "width": 128}])
        assert result["instances"].pred_boxes.tensor.is_cuda
        model.train()
        with EventStorage():
            losses = model(batch_on_cuda())
        sum(losses.values()).backward()
        assert all(torch.isfinite(loss) for loss in losses.values())
    assert nchw_decisions and not any(nchw_decisions)  # every GroupNorm ran as nn.GroupNorm
    assert chunk_runs and all(runs == 1 for runs in chunk_runs)  # every head saw all its RoIs at once
