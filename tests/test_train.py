"""tools/train_net.py and tools/compare_runs.py end to end: train, evaluate, resume after SIGKILL, two CPU
processes, bad input, real photos."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

from conftest import CONFIG_DIR, REPO, tool_exit_message, tool_main  # noqa: E402

GN_SHAPES = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
BNSTAR_SHAPES = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bnstar.yaml")
FRUITS = os.path.join(os.path.dirname(REPO), "shared", "data", "fruits_nuts")
# small and quick: 128 px, 2 images per batch, few proposals
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0"]


@pytest.fixture(scope="module")
def tiny_shapes(tiny_dataset_specs):
    """train_net's flags of the shared tiny dataset (8 train, 4 val images at 128 px) as training and test set."""
    return [*tiny_dataset_specs, "DATASETS.TRAIN", "('shared_train',)", "DATASETS.TEST", "('shared_val',)"]


def test_trained_runs_evaluate_again_to_the_same_numbers_and_compare(tiny_shapes_runs, tmp_path, capsys):
    runs = [tiny_shapes_runs["gn"], tiny_shapes_runs["bnstar"]]
    for run in runs:
        results = json.loads(open(os.path.join(run, "results.json")).read())
        assert set(results["vis_val"]) == {"bbox", "segm"} and "AP" in results["vis_val"]["segm"]
        assert all(os.path.exists(os.path.join(run, name)) for name in ("model_final.pth", "metrics.json"))
        log = open(os.path.join(run, "log.txt")).read()
        assert "Optimizer parameter groups" in log and "weight decay" in log
    # GN: every GroupNorm γ/β in a zero-decay group (logged table)
    assert "GroupNorm γ/β" in open(os.path.join(runs[0], "log.txt")).read()

    # --eval-only on the trained weights gives the same numbers
    data, out = tiny_shapes_runs["shapes"], tmp_path / "eval"
    tool_main("train_net.py", "--config-file", GN_SHAPES, "--eval-only",
              f"--dataset=vis_val={data}/val.json,{data}/val", "DATASETS.TEST", "('vis_val',)", *SMALL,
              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", out,
              "MODEL.WEIGHTS", os.path.join(runs[0], "model_final.pth"))
    trained = json.loads(open(os.path.join(runs[0], "results.json")).read())
    assert json.loads((out / "results.json").read_text()) == trained

    prefix = tmp_path / "cmp" / "comparison"
    capsys.readouterr()  # the evaluation's log
    tool_main("compare_runs.py", *runs, "--out", str(prefix))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run") and "Δ bbox/AP" in lines[0] and "s/iter" in lines[0]
    assert any(line.startswith("| bnstar") for line in lines)
    assert (tmp_path / "cmp" / "comparison.csv").read_text().count("\n") == 3
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 10_000


def test_resume_after_sigkill_continues_from_last_checkpoint(tmp_path, tiny_shapes):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file", GN_SHAPES, *tiny_shapes,
           *SMALL, "SOLVER.MAX_ITER", "200", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "model_0000003.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = (out / "last_checkpoint").read_text().strip()
    assert last.startswith("model_00000") and proc.returncode == -signal.SIGKILL
    resumed_from = int(last[len("model_"):-len(".pth")]) + 1
    tool_main("train_net.py", "--config-file", GN_SHAPES, "--resume", *tiny_shapes, *SMALL,
              "SOLVER.MAX_ITER", str(resumed_from + 2), "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out)
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {resumed_from}" in log
    assert "Loading trainer from" in log  # the trainer's state holds optimizer, scheduler and hooks
    import torch

    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == resumed_from + 1 and final["trainer"]["_trainer"]["optimizer"]["state"]


def test_nan_loss_stops_with_one_line_and_keeps_checkpoints(tmp_path, tiny_shapes):
    out = tmp_path / "nan"
    out.mkdir()
    earlier = out / "model_0000009.pth"
    earlier.write_bytes(b"an earlier checkpoint")
    # a zero pixel std turns every input into inf: the first loss is NaN
    line = tool_exit_message("train_net.py", "--config-file", GN_SHAPES, *tiny_shapes, *SMALL, "MODEL.PIXEL_STD",
                             "[0.0, 0.0, 0.0]", "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", out)
    assert "training diverged (NaN/Inf) at iteration" in line and "SOLVER.BASE_LR" in line, line
    assert "Exception during training: FloatingPointError:" in (out / "log.txt").read_text()  # logged as one line
    assert earlier.read_bytes() == b"an earlier checkpoint"


@pytest.mark.skipif(not os.path.isdir(FRUITS), reason="../shared/data/fruits_nuts not present")
def test_real_photos_train_and_evaluate(tmp_path):
    out = tmp_path / "fruits"
    spec = f"fruits={FRUITS}/trainval.json,{FRUITS}/images"
    tool_main("train_net.py", "--config-file", GN_SHAPES, f"--dataset={spec}", "DATASETS.TRAIN", "('fruits',)",
              "DATASETS.TEST", "('fruits',)", "INPUT.MASK_FORMAT", "polygon", *SMALL, "INPUT.MIN_SIZE_TRAIN",
              "(192,)", "INPUT.MAX_SIZE_TRAIN", "256", "INPUT.MIN_SIZE_TEST", "192", "INPUT.MAX_SIZE_TEST", "256",
              "SOLVER.MAX_ITER", "4", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(out))
    # score threshold 0: after 4 iterations every score is low, and without predictions COCO AP is NaN
    results = json.loads((out / "results.json").read_text())["fruits"]
    assert set(results) == {"bbox", "segm"}
    assert all(0.0 <= results[task]["AP"] <= 100.0 for task in results)


def test_converted_gn_weights_into_bnstar_model_fail_before_training(tmp_path, tiny_shapes):
    import torch
    import torchvision

    from gn_det.checkpoint import IMAGENET_RGB_PIXEL_MEAN, IMAGENET_RGB_PIXEL_STD, convert_weights

    source = torchvision.models.resnet18(norm_layer=lambda channels: torch.nn.GroupNorm(32, channels))
    torch.save(source.state_dict(), tmp_path / "r18_gn.pth")
    convert_weights(str(tmp_path / "r18_gn.pth"), str(tmp_path / "r18_gn.pkl"))
    out = tmp_path / "wrong_norm"
    line = tool_exit_message("train_net.py", "--config-file", BNSTAR_SHAPES, *tiny_shapes, *SMALL, "MODEL.WEIGHTS",
                             tmp_path / "r18_gn.pkl", "INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN",
                             IMAGENET_RGB_PIXEL_MEAN, "MODEL.PIXEL_STD", IMAGENET_RGB_PIXEL_STD, "SOLVER.MAX_ITER", "2",
                             "OUTPUT_DIR", out)
    assert "r18_gn.pkl" in line and "GN" in line
    assert not list(out.glob("*.pth"))


def test_cuda_falls_back_to_cpu_only_without_a_cuda_device(monkeypatch):
    import torch
    from omegaconf import OmegaConf

    import gn_det.config
    from gn_det.config import adapt_to_this_machine, get_gn_cfg

    cfg = get_gn_cfg(opts=["MODEL.DEVICE", "cpu"])
    assert adapt_to_this_machine(cfg) == [] and (cfg.MODEL.DEVICE, cfg.MODEL.PRECISION) == ("cpu", "fp32")
    lazy = OmegaConf.create({"train": {"device": "cpu"}, "model": {"precision": "fp32"}})
    lines = adapt_to_this_machine(lazy, device="cuda:1")
    if torch.cuda.is_available():
        assert (lazy.train.device, lines) == ("cuda:1", [])
    else:
        assert (lazy.train.device, lines) == ("cpu", ["No CUDA device: --device='cuda:1' runs on CPU"])
    assert lazy.model.precision == "fp32"
    model_without_precision = OmegaConf.create({"train": {"device": "cpu"}, "model": {}})
    assert adapt_to_this_machine(model_without_precision) == [] and "precision" not in model_without_precision.model
    # bf16 asked for CUDA on a machine without it: the CPU, then the CPU's precision, one line each, in that order
    monkeypatch.setattr(gn_det.config, "cpu_has_bf16_kernels", lambda: False)
    gn = ["MODEL.META_ARCHITECTURE", "GNGeneralizedRCNN", "MODEL.PRECISION", "bf16"]
    cfg = get_gn_cfg(opts=gn + ["MODEL.DEVICE", "cuda"])
    lines = adapt_to_this_machine(cfg)
    if torch.cuda.is_available():  # bf16 stays where the GPU has bf16 tensor cores (test_cuda.py)
        assert cfg.MODEL.DEVICE == "cuda" and len(lines) == (cfg.MODEL.PRECISION == "fp32")
    else:
        assert [line.split(":")[0] for line in lines] == ["No CUDA device", "No oneDNN bf16 kernels for this CPU (x86"]
        assert (cfg.MODEL.DEVICE, cfg.MODEL.PRECISION) == ("cpu", "fp32")
    cfg = get_gn_cfg(opts=gn + ["MODEL.DEVICE", "cpu"])
    assert adapt_to_this_machine(cfg, keep_precision=True) == [] and cfg.MODEL.PRECISION == "bf16"  # an export
