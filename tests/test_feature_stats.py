"""Feature distributions (the paper's Figure 3): percentiles, the recording hook, and tools/feature_stats.py."""
import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

import torch  # noqa: E402
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import CONFIG_DIR, REPO, tool_exit_message, tool_main  # noqa: E402
from gn_det.analysis.feature_stats import FEATURE_STATS_FILE, feature_percentiles, read_feature_stats  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.data import generate_shapes  # noqa: E402
from gn_det.analysis.feature_stats_hook import (  # noqa: E402
    FeatureStatsHook,
    default_feature_layer,
    earlier_feature_stats,
)
from gn_det.errors import InputError  # noqa: E402

SHAPES = os.path.join(CONFIG_DIR, "shapes")
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
         "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "TEST.DETECTIONS_PER_IMAGE", "10", "DATALOADER.NUM_WORKERS", "0",
         "TEST.EVAL_PERIOD", "0"]


def test_percentiles_of_a_known_distribution():
    stats = feature_percentiles(torch.arange(101.0).view(1, 101))
    assert [stats[f"p{p}"] for p in (1, 20, 80, 99)] == pytest.approx([1.0, 20.0, 80.0, 99.0])
    assert stats["mean"] == pytest.approx(50.0)
    # more values than torch.quantile accepts: a regular subsample, still close
    big = feature_percentiles(torch.randn(2**25, generator=torch.Generator().manual_seed(0)))
    assert big["p1"] == pytest.approx(-2.326, abs=0.02) and big["p99"] == pytest.approx(2.326, abs=0.02)


class ToyModel(torch.nn.Module):
    """conv -> GroupNorm, returning a loss dict as detectron2 models do in training."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.norm = torch.nn.GroupNorm(2, 8)

    def forward(self, batch):
        return {"loss": self.norm(self.conv(batch) * 5 + 3).pow(2).mean()}


def train_toy(output_dir, start_iter=0, max_iter=6, **hook_kwargs):
    torch.manual_seed(0)
    model = ToyModel()
    batches = (torch.randn(2, 3, 8, 8) for _ in itertools.count())
    trainer = SimpleTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([FeatureStatsHook(str(output_dir), **hook_kwargs)])
    trainer.train(start_iter, max_iter)
    return read_feature_stats(str(output_dir))


def test_hook_records_every_period_and_the_last_iteration_then_resumes(tmp_path):
    stats = train_toy(tmp_path, layer="norm", where="input", period=2)
    assert (stats["layer"], stats["where"], stats["percentiles"]) == ("norm", "input", [1, 20, 80, 99])
    assert [r["iteration"] for r in stats["records"]] == [0, 2, 4, 5]
    assert stats["records"][0]["mean"] == pytest.approx(3.0, abs=0.5)  # the conv output before the norm
    # resuming at iteration 4 keeps what was recorded before it and continues the file
    resumed = train_toy(tmp_path, start_iter=4, max_iter=8, layer="norm", where="input", period=2)
    assert [r["iteration"] for r in resumed["records"]] == [0, 2, 4, 6, 7]
    assert resumed["records"][:2] == stats["records"][:2]

    normalized = train_toy(tmp_path / "out", layer="norm", period=3)  # a given layer: its output by default
    assert normalized["where"] == "output" and [r["iteration"] for r in normalized["records"]] == [0, 3, 5]
    assert normalized["records"][0]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert normalized["records"][0]["std"] == pytest.approx(1.0, abs=0.05)


def test_hook_names_a_wrong_layer(tmp_path):
    with pytest.raises(ValueError, match=r"the model has no module 'norms' .*did you mean norm"):
        train_toy(tmp_path, layer="norms")
    train_toy(tmp_path, layer="norm", where="input")
    with pytest.raises(ValueError, match=r"records norm \(input\), not conv \(output\)"):
        train_toy(tmp_path, start_iter=2, layer="conv")


@pytest.mark.parametrize("config", ["mask_rcnn_R_18_FPN_gn.yaml", "mask_rcnn_R_18_FPN_bnstar.yaml"])
def test_default_layer_is_the_last_res5_conv_before_its_norm(config):
    model = build_model(get_gn_cfg(os.path.join(SHAPES, config), ["MODEL.DEVICE", "cpu"]))
    assert default_feature_layer(model) == ("backbone.bottom_up.res5.1.conv2.norm", "input")


def test_feature_stats_tool_trains_with_the_hook_and_plots_runs_side_by_side(tmp_path, capsys):
    root = generate_shapes(str(tmp_path / "shapes"), num_train=6, num_val=2, image_size=128)
    out = tmp_path / "bn"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "feature_stats.py"), "train", "--config-file",
         os.path.join(SHAPES, "mask_rcnn_R_18_FPN_bn.yaml"), "--layer", "backbone.fpn_output3", "--period", "2",
         f"--dataset=tiny={root}/train.json,{root}/train", f"--dataset=tiny_val={root}/val.json,{root}/val",
         "DATASETS.TRAIN", "('tiny',)", "DATASETS.TEST", "('tiny_val',)",
         *SMALL, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = read_feature_stats(str(out))
    assert (stats["layer"], stats["where"]) == ("backbone.fpn_output3", "output")
    assert [r["iteration"] for r in stats["records"]] == [0, 2]
    assert all(r["p1"] < r["p20"] < r["p80"] < r["p99"] for r in stats["records"])

    other = tmp_path / "other"  # a second run, as a sweep cell would leave it
    other.mkdir()
    (other / FEATURE_STATS_FILE).write_text(json.dumps({**stats, "records": [
        {**r, "p1": r["p1"] * 2, "p99": r["p99"] * 2} for r in stats["records"]]}))
    plot = tmp_path / "figure" / "feature_stats.png"
    tool_main("feature_stats.py", "plot", out, other, tmp_path / "shapes", "--out", plot, "--separate-y-axes")
    assert f"wrote {plot} (2 of 3 runs)" in capsys.readouterr().out and plot.stat().st_size > 10_000


def test_feature_stats_plot_rejects_bad_input_in_one_line_before_writing(tmp_path):
    """--columns below 1, a truncated or foreign feature_stats.json and an --out in the way are one-line errors
    naming the option or file, and nothing is written."""
    good, truncated, foreign = (tmp_path / name for name in ("good", "truncated", "foreign"))
    for run in (good, truncated, foreign):
        run.mkdir()
    text = json.dumps({"layer": "x", "where": "input", "percentiles": [1, 20, 80, 99],
                       "records": [{"iteration": 0, "p1": -1, "p20": 0, "p80": 1, "p99": 2, "mean": 0, "std": 1}]})
    (good / FEATURE_STATS_FILE).write_text(text)
    (truncated / FEATURE_STATS_FILE).write_text(text[:40])
    (foreign / FEATURE_STATS_FILE).write_text("[]")
    out = tmp_path / "plots" / "fs.png"
    cases = [((good, "--columns", "0"), "--columns 0 must be >= 1"),
             ((good, truncated), f"feature stats file {truncated / FEATURE_STATS_FILE} is not valid JSON"),
             ((good, foreign), f"feature stats file {foreign / FEATURE_STATS_FILE} lacks layer, where"),
             ((good, "--out", tmp_path), f"--out {tmp_path}: a folder is in the way")]
    for args, expected in cases:
        message = tool_exit_message("feature_stats.py", "plot", "--out", out, *args)
        assert message.startswith(f"feature_stats.py: error: {expected}"), message
    assert not (tmp_path / "plots").exists()
    # the hook continuing a run reads the file through the same checks
    with pytest.raises(InputError, match="is not valid JSON"):
        earlier_feature_stats(str(truncated), "x", "input")
