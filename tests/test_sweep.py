"""tools/sweep.py: grid expansion and cell naming, per-cell options, cells started with other options (with a
stand-in trainer), and a real two-cell sweep run twice."""
import csv
import json
import os
import sys

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

from conftest import CONFIG_DIR, tool_exit_message, tool_main  # noqa: E402
from gn_det.analysis.sweep import (  # noqa: E402
    Cell,
    check_feature_stats_options,
    check_sweep_options,
    expand_grid,
    norm_label,
    read_results,
    run_sweep,
    sweep_markdown,
    write_sweep_csv,
)
from gn_det.errors import InputError  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.data import generate_shapes  # noqa: E402
from gn_det.solver import scale_schedule_linearly  # noqa: E402

GN_SHAPES = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "128",
         "INPUT.MAX_SIZE_TEST", "128", "SOLVER.WARMUP_ITERS", "1", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
         "TEST.DETECTIONS_PER_IMAGE", "10", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0"]


def test_grid_expands_group_settings_for_grouped_norms_only():
    cells = expand_grid(["GN", "BNstar", "GN+WS"], [1, 2], groups=[8, 32], dims_per_group=[16])
    assert [c.name for c in cells[:6]] == [
        "norm=GN,G=8,ims=1", "norm=GN,G=8,ims=2", "norm=GN,G=32,ims=1", "norm=GN,G=32,ims=2",
        "norm=GN,C_per_G=16,ims=1", "norm=GN,C_per_G=16,ims=2"]
    assert [c.name for c in cells[6:8]] == ["norm=BNstar,ims=1", "norm=BNstar,ims=2"]
    assert len(cells) == 6 + 2 + 6 and cells[-1].name == "norm=GN+WS,C_per_G=16,ims=2"
    assert cells[4].row_label == "GN (C/G=16)" and cells[6].row_label == "BN*"
    # G=32 when no group setting is given; repeated values count once; labels or slugs, any case
    assert [c.name for c in expand_grid(["gn", "bn*", "BN"], [4, 4])] == [
        "norm=GN,G=32,ims=4", "norm=BNstar,ims=4", "norm=BN,ims=4"]
    with pytest.raises(ValueError, match="norm 'LN' is not one of GN, GN\\+WS, BN, BN\\*, SyncBN"):
        norm_label("LN")
    with pytest.raises(ValueError, match="images per batch must be >= 1, got 0"):
        expand_grid(["GN"], [0])


def cfg_of(cell):
    cfg = get_gn_cfg(GN_SHAPES, cell.opts())
    return scale_schedule_linearly(cfg)


def test_cell_options_set_every_norm_site_and_scale_the_schedule():
    bnstar = cfg_of(Cell("BN*", 2))
    assert (bnstar.MODEL.RESNETS.NORM, bnstar.MODEL.FPN.NORM, bnstar.MODEL.ROI_BOX_HEAD.NORM,
            bnstar.MODEL.ROI_MASK_HEAD.NORM, bnstar.MODEL.GN.WS) == ("FrozenBN", "", "", "", False)
    ws = cfg_of(Cell("GN+WS", 1, num_groups=8))
    assert ws.MODEL.GN.WS and ws.MODEL.GN.NUM_GROUPS == 8 and ws.MODEL.FPN.NORM == "GN"
    # the shapes schedule is for 4 images per batch: 1 image gets LR / 4 and 4x the iterations
    base = get_gn_cfg(GN_SHAPES)
    assert ws.SOLVER.IMS_PER_BATCH == 1 and ws.SOLVER.MAX_ITER == 4 * base.SOLVER.MAX_ITER
    assert ws.SOLVER.BASE_LR == pytest.approx(base.SOLVER.BASE_LR / 4)
    assert cfg_of(Cell("GN", 4, dim_per_group=16)).MODEL.GN.DIM_PER_GROUP == 16

    sync = Cell("SyncBN", 2)
    assert sync.processes == 2 and cfg_of(sync).MODEL.FPN.NORM == "naiveSyncBN"  # CPU: gloo all-reduce
    assert get_gn_cfg(GN_SHAPES, sync.opts(cuda_devices=2)).MODEL.FPN.NORM == "SyncBN"
    assert "cannot be split 2 ways" in Cell("SyncBN", 1).unsupported_reason()
    assert Cell("BN", 1).unsupported_reason() is None


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = generate_shapes(str(tmp_path_factory.mktemp("shapes")), num_train=8, num_val=2, image_size=128)
    register = f"['tiny_train={root}/train.json,{root}/train', 'tiny_val={root}/val.json,{root}/val']"
    return ["DATASETS.REGISTER", register, "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)"]


@pytest.fixture
def sweep(capsys):
    """Run tools/sweep.py in this process (each cell still trains in its own subprocess); returns its output."""
    def run(*args):
        capsys.readouterr()
        tool_main("sweep.py", *args)
        return capsys.readouterr().out
    return run


def snapshot(folder):
    """path -> (mtime_ns, size) of everything under ``folder``, the folder itself included."""
    entries = {folder: os.stat(folder).st_mtime_ns}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            entries[path] = (os.stat(path).st_mtime_ns, os.stat(path).st_size)
    return entries


def test_two_cell_sweep_trains_once_then_only_reprints_tables_and_resumes_what_is_unfinished(tmp_path, tiny_shapes,
                                                                                              sweep):
    out = tmp_path / "sweep"
    # the shapes schedule is for 4 images per batch; with the reference at 2, MAX_ITER 2 is 2 iterations
    opts = [*tiny_shapes, *SMALL, "SOLVER.REFERENCE_IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2"]
    args = ["--norms", "GN", "BN*", "--ims", "2", "--out", str(out), "--feature-stats", "--feature-period", "1", *opts]
    first = sweep(*args)
    cells = ["norm=GN,G=32,ims=2", "norm=BNstar,ims=2"]
    for cell in cells:
        assert f"{cell}: training" in first and f"{cell}: trained in" in first
        assert (out / cell / "results.json").exists() and (out / cell / "feature_stats.json").exists()
    table = (out / "sweep.md").read_text()
    assert "| norm" in table and "2 img/batch" in table
    assert "| GN (G=32)" in table and "| BN*" in table
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["cell"], r["norm"], r["num_groups"], r["ims"]) for r in rows] == [
        ("norm=GN,G=32,ims=2", "GN", "32", "2"), ("norm=BNstar,ims=2", "BN*", "", "2")]
    assert all(r["bbox/AP"] and r["segm/AP"] and float(r["peak MB"]) > 0 for r in rows)  # NaN after 2 iterations
    assert (out / "sweep.png").stat().st_size > 10_000 and (out / "sweep_feature_stats.png").stat().st_size > 10_000

    before = {cell: snapshot(str(out / cell)) for cell in cells}
    second = sweep(*args)
    assert all(f"{cell}: finished" in second and f"{cell}: training" not in second for cell in cells)
    assert table.strip() in second  # the same tables, printed again
    assert (out / "sweep.md").read_text() == table
    assert {cell: snapshot(str(out / cell)) for cell in cells} == before  # no cell was touched

    # a cell killed during its final evaluation resumes from its last checkpoint and only evaluates
    (out / cells[1] / "results.json").unlink()
    assert "norm=BNstar,ims=2: interrupted" in sweep("--dry-run", *args)
    third = sweep(*args)
    assert f"{cells[1]}: training (resuming from its last checkpoint)" in third and f"{cells[0]}: finished" in third
    assert "Starting training from iteration 2" in (out / cells[1] / "log.txt").read_text()
    assert (out / cells[1] / "results.json").exists() and snapshot(str(out / cells[0])) == before[cells[0]]

    listing = sweep("--dry-run", "--norms", "GN", "BN*", "SyncBN", "--ims", "1", "2", "--out", str(out), *opts)
    assert "norm=GN,G=32,ims=2: finished" in listing and "norm=GN,G=32,ims=1: to train" in listing
    assert "norm=SyncBN,ims=1: unsupported" in listing


def test_options_for_every_cell_may_not_set_what_each_cell_sets(tmp_path):
    cells = expand_grid(["GN"], [1, 2, 4], groups=[8, 32])
    for key, value in [("SOLVER.IMS_PER_BATCH", "2"), ("MODEL.GN.NUM_GROUPS", "16"), ("MODEL.FPN.NORM", "BN"),
                       ("SOLVER.LINEAR_LR_SCALING", "False"), ("MODEL.GN", "{}")]:
        with pytest.raises(InputError, match=f"^command line: {key} is set by each cell of the sweep"):
            check_sweep_options(cells, GN_SHAPES, ["SOLVER.BASE_LR", "0.1", key, value])
    check_sweep_options(cells, GN_SHAPES, ["MODEL.GN.EPS", "0.0001", "SOLVER.REFERENCE_IMS_PER_BATCH", "2"])
    # the feature-stats options are checked in every cell's model before any cell trains
    check_feature_stats_options(cells, GN_SHAPES, None, 1)
    with pytest.raises(InputError, match=r"^feature stats period=0 must be >= 1$"):
        check_feature_stats_options(cells, GN_SHAPES, None, 0)
    layer = "roi_heads.box_head.conv1.norm"  # a head norm: in GN cells, not in BN* cells (no head norm)
    check_feature_stats_options(expand_grid(["GN"], [2]), GN_SHAPES, layer, 1)
    with pytest.raises(InputError, match=rf"^--feature-layer in cell norm=BNstar,ims=2: the model has no module "
                                         rf"'{layer}' to record features of"):
        check_feature_stats_options(expand_grid(["GN", "BN*"], [2]), GN_SHAPES, layer, 1)
    # a norm at a site no cell sets would be the same in every cell, BN* cells included
    with pytest.raises(InputError, match=r"^command line: MODEL\.RPN\.NORM='GN': a sweep sets the norm of the backbone, "):
        check_sweep_options(expand_grid(["BN*"], [2]), GN_SHAPES, ["MODEL.RPN.NORM", "GN"])
    out = tmp_path / "sweep"
    message = tool_exit_message("sweep.py", "--norms", "GN", "--groups", "8", "--ims", "1", "--out", out,
                                "SOLVER.IMS_PER_BATCH", "2", "MODEL.GN.NUM_GROUPS", "16")
    assert "SOLVER.IMS_PER_BATCH is set by each cell" in message and not out.exists()


# Stands in for tools/train_net.py: the first call leaves a checkpoint and fails (an interrupted run), the
# second finishes with results.
FAKE_TRAIN = """
import json, os, sys
out = sys.argv[sys.argv.index("OUTPUT_DIR") + 1]
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if not os.path.exists(os.path.join(out, "last_checkpoint")):
    open(os.path.join(out, "last_checkpoint"), "w").write("model_0000099.pth")
    sys.exit("interrupted")
open(os.path.join(out, "model_final.pth"), "w").write("x")
json.dump({"shapes_val": {"bbox": {"AP": 50.0}, "segm": {"AP": 40.0}}}, open(os.path.join(out, "results.json"), "w"))
"""
SHORT = ["SOLVER.MAX_ITER", "150", "SOLVER.STEPS", "(120,140)"]


@pytest.fixture
def fake_train(tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    return [sys.executable, str(script)]


def statuses(reports):
    return [(r.cell.name, r.status) for r in reports]


def test_a_cell_interrupted_with_other_options_is_not_resumed_and_keeps_its_record(tmp_path, fake_train, sweep):
    out, cells = tmp_path / "sweep", expand_grid(["GN"], [4])
    run_dir = out / cells[0].name
    assert statuses(run_sweep(cells, str(out), GN_SHAPES, fake_train, SHORT))[-1] == (cells[0].name, "failed")
    record = (run_dir / "sweep_cell.json").read_text()

    reports = list(run_sweep(cells, str(out), GN_SHAPES, fake_train, []))
    assert statuses(reports) == [(cells[0].name, "other options")]
    assert "interrupted run started with other options" in reports[0].detail and "not resumed" in reports[0].detail
    assert len((run_dir / "calls.jsonl").read_text().splitlines()) == 1 and not (run_dir / "results.json").exists()
    assert (run_dir / "sweep_cell.json").read_text() == record
    listing = sweep("--dry-run", "--norms", "GN", "--ims", "4", "--out", out)
    assert f"{cells[0].name}: not trained: interrupted run started with other options" in listing

    # with its own options it resumes as before
    assert statuses(run_sweep(cells, str(out), GN_SHAPES, fake_train, SHORT)) == [
        (cells[0].name, "started"), (cells[0].name, "trained")]
    assert json.loads((run_dir / "calls.jsonl").read_text().splitlines()[-1])[-len(SHORT) - 2:-2] == SHORT

    # a record that is not one is one line naming it
    dry_run = ["--dry-run", "--norms", "GN", "--ims", "4", "--out", out]
    (run_dir / "sweep_cell.json").write_text('{"opts": ')
    assert tool_exit_message("sweep.py", *dry_run).startswith(
        f"sweep.py: error: sweep cell record {run_dir}/sweep_cell.json is not valid JSON: ")
    (run_dir / "sweep_cell.json").write_text('{"cell": "GN"}')
    assert tool_exit_message("sweep.py", *dry_run) == (
        f"sweep.py: error: sweep cell record {run_dir}/sweep_cell.json holds no list of options ('opts'); delete it "
        "with its folder")


def test_a_cell_finished_with_other_options_stays_out_of_the_tables(tmp_path, fake_train, sweep):
    out = tmp_path / "sweep"
    for _ in range(2):  # the stand-in finishes on its second call
        list(run_sweep(expand_grid(["GN"], [4]), str(out), GN_SHAPES, fake_train, SHORT))
    cells = expand_grid(["GN", "GN+WS"], [4])
    for _ in range(2):
        reports = list(run_sweep(cells, str(out), GN_SHAPES, fake_train, []))
    assert statuses(reports) == [("norm=GN,G=32,ims=4", "other options"), ("norm=GN+WS,G=32,ims=4", "started"),
                                 ("norm=GN+WS,G=32,ims=4", "trained")]
    results = read_results(cells, str(out), GN_SHAPES, [])
    table = sweep_markdown(results, reports)
    assert "| GN (G=32)    | – / –" in table and "| GN+WS (G=32) | 50.0 / 40.0" in table
    assert "- norm=GN,G=32,ims=4: finished run started with other options" in table
    write_sweep_csv(results, str(tmp_path / "sweep.csv"))
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert [(r["cell"], r["bbox/AP"]) for r in rows] == [("norm=GN,G=32,ims=4", ""), ("norm=GN+WS,G=32,ims=4", "50.0")]
    # the sweep it was trained in still reads it
    assert read_results(cells[:1], str(out), GN_SHAPES, SHORT)[0].metric("bbox/AP") == 50.0

    # tools/sweep.py: nothing left to train; the cell is named as not trained and kept out of the tables
    printed = sweep("--norms", "GN", "--ims", "4", "--out", out, "--name", "full")
    assert "norm=GN,G=32,ims=4: not trained: finished run started with other options" in printed
    assert "| GN (G=32) | – / –" in (out / "full.md").read_text()
