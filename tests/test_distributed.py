"""Training across two machines, on one host: detectron2's ``launch`` over torch.distributed (gloo on CPU),
one process per "machine", each started as its own train_net command as on real machines."""
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs

from conftest import REPO  # noqa: E402
from test_train import GN_SHAPES, SMALL, tiny_shapes  # noqa: E402,F401  (tiny_shapes: a fixture)

SAVING_TRAIN_NET = os.path.join(REPO, "tests", "train_net_saving_weights.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.usefixtures("one_launch_at_a_time")
def test_two_machines_train_to_identical_weights_and_rank_0_alone_writes_checkpoints(tmp_path, tiny_shapes):
    dist_url = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, GN_DET_TEST_WEIGHTS=str(tmp_path / "weights"))
    procs = []
    for rank in (0, 1):
        command = [sys.executable, SAVING_TRAIN_NET, "--config-file", GN_SHAPES, "--num-gpus", "1",
                   "--num-machines", "2", "--machine-rank", str(rank), "--dist-url", dist_url, *tiny_shapes, *SMALL,
                   "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2",
                   "OUTPUT_DIR", str(tmp_path / f"machine{rank}")]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [proc.communicate(timeout=900)[0] for proc in procs]
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    assert "Starting training from iteration 0" in logs[0]

    machine0, machine1 = tmp_path / "machine0", tmp_path / "machine1"
    assert sorted(p.name for p in machine0.glob("*.pth")) == ["model_0000001.pth", "model_final.pth"]
    assert (machine0 / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert "World size: 2" in (machine0 / "log.txt").read_text()
    # rank 1 writes only its own log (log.txt.rank1), no checkpoint and no config.yaml
    assert not list(machine1.glob("*.pth")) and not (machine1 / "last_checkpoint").exists()
    assert not (machine1 / "config.yaml").exists()

    rank0 = torch.load(tmp_path / "weights.0.pth")
    rank1 = torch.load(tmp_path / "weights.1.pth")
    final = torch.load(machine0 / "model_final.pth", weights_only=True)
    assert final["iteration"] == 2
    assert rank0.keys() == rank1.keys() == final["model"].keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], final["model"][name]), name
