import contextlib
import io
import os
import runpy
import shutil
import sys

import pytest

# pytest-xdist (pyproject's addopts) runs the suite in one worker process per core. Each worker, and every tool
# subprocess its tests start, gets its share of the cores: without this each would start one thread per core,
# and the workers' threads would compete for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
GN_FPN = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_gn.yaml")
BNSTAR_FPN = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_bnstar.yaml")
# Small enough for a 2-core CPU: R-18, no pretrained weights, CPU.
TINY_OPTS = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18",
             "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


def tool_main(tool, *args):
    """Run ``tools/TOOL`` in this process (its ``main`` under ``sys.argv``) for a run that must succeed; what it
    prints goes to pytest's capture (``capsys``)."""
    argv = sys.argv
    sys.argv = [tool, *map(str, args)]
    try:
        runpy.run_path(os.path.join(REPO, "tools", tool), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code in (None, 0), exit_.code
    finally:
        sys.argv = argv


def tool_exit_message(tool, *args):
    """Run ``tools/TOOL`` in this process (its ``main`` under ``sys.argv``) and return its exit message: the
    ``TOOL: error: ...`` line of a bad input. Any other exception propagates with its traceback, and a tool
    that does not exit fails the test. Faster than a subprocess; each tool's printed format is checked in one
    subprocess test (tests/test_boundaries.py)."""
    argv = sys.argv
    sys.argv = [tool, *map(str, args)]
    stderr = io.StringIO()
    try:
        with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(stderr):
            runpy.run_path(os.path.join(REPO, "tools", tool), run_name="__main__")
    finally:
        sys.argv = argv
    message = exit_.value.code
    if message == 2:  # argparse's own error: its usage, then "TOOL: error: ..."
        message = stderr.getvalue().strip().splitlines()[-1]
    assert isinstance(message, str) and message.startswith(f"{tool}: error: ") and "\n" not in message, message
    return message


@contextlib.contextmanager
def session_lock(tmp_path_factory, name):
    """A file lock shared by the pytest-xdist workers of this test session; nothing to lock without workers."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    from filelock import FileLock  # torch's own dependency

    with FileLock(str(tmp_path_factory.getbasetemp().parent / f"{name}.lock")):  # the session's folder
        yield


def made_once(tmp_path_factory, name, make):
    """A folder ``name`` filled by ``make(folder)`` once per test session and shared by all its pytest-xdist
    workers: the first worker to ask makes it while the others wait on the session lock."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's
    with session_lock(tmp_path_factory, name):
        if not (folder / ".made").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / ".made").touch()
    return folder


@pytest.fixture
def one_launch_at_a_time(tmp_path_factory):
    """Held by tests that start several processes meeting at a rendezvous port: such a port is picked free and
    bound later by the processes, so two pytest-xdist workers launching at once could pick the same one."""
    with session_lock(tmp_path_factory, "launch"):
        yield


@pytest.fixture(scope="session")
def d2():
    return pytest.importorskip("detectron2")


@pytest.fixture(scope="session")
def tiny_dataset_specs(d2, tmp_path_factory):
    """train_net's ``--dataset`` flags of a tiny generated shapes dataset (8 train, 4 val images at 128 px),
    registered as ``shared_train`` / ``shared_val``, shared by every test that needs a dataset."""
    from gn_det.data import generate_shapes

    root = made_once(tmp_path_factory, "shared_shapes",
                     lambda folder: generate_shapes(str(folder), num_train=8, num_val=4, image_size=128))
    return [f"--dataset=shared_train={root}/train.json,{root}/train",
            f"--dataset=shared_val={root}/val.json,{root}/val"]


@pytest.fixture(scope="session")
def tiny_shapes_runs(d2, tmp_path_factory):
    """Two finished runs, GN and BN*, of 3 iterations on 4 val images at 128 px, evaluated (so each has
    results.json and inference/vis_val/instances_predictions.pth) with every detection kept (score >= 0):
    ``{"gn": dir, "bnstar": dir, "shapes": dir of the generated dataset}``."""
    from gn_det.data import generate_shapes

    def train_both(root):
        data = root / "shapes"
        generate_shapes(str(data), num_train=4, num_val=4, image_size=128)
        for norm in ("gn", "bnstar"):  # in this process: a tool subprocess would add ~5 s of imports each
            tool_main("train_net.py", "--config-file",
                      os.path.join(CONFIG_DIR, "shapes", f"mask_rcnn_R_18_FPN_{norm}.yaml"),
                      f"--dataset=vis_train={data}/train.json,{data}/train",
                      f"--dataset=vis_val={data}/val.json,{data}/val", "DATASETS.TRAIN", "('vis_train',)",
                      "DATASETS.TEST", "('vis_val',)", "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
                      "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2",
                      "SOLVER.WARMUP_ITERS", "1", "SOLVER.MAX_ITER", "3", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
                      "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
                      "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", root / norm)

    root = made_once(tmp_path_factory, "tiny_shapes_runs", train_both)
    return {"shapes": str(root / "shapes"), "gn": str(root / "gn"), "bnstar": str(root / "bnstar")}
