"""Nothing is lost when the disk fills: files are written whole or not at all, a full disk while checkpointing
ends the run in one line naming the file and the space it needs, ``last_checkpoint`` still names a complete
checkpoint, and ``--resume`` continues from it once there is space. The full disk is an ``OSError(ENOSPC)``
raised by the file half way through a checkpoint (mounting a small filesystem needs privileges a test
cannot count on)."""
import errno
import json
import os

import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402

from conftest import CONFIG_DIR  # noqa: E402
from gn_det.errors import InputError  # noqa: E402
from gn_det.fileio import atomic_write, write_json_atomically  # noqa: E402

GN_YAML = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2",
         "SOLVER.WARMUP_ITERS", "1", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
         "32", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TRAIN", "('shared_train',)",
         "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"]


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


class FillsAfter:
    """A file whose disk fills after ``room`` more bytes."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            disk_full()
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_json_write_that_fills_the_disk_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomically(str(path), {"AP": 1.0})
    monkeypatch.setattr(json, "dump", lambda data, f, **kw: (f.write('{"AP": 2'), disk_full()))
    with pytest.raises(InputError, match=rf"^{path}: no space left on the device \(\S+ MiB free\)"):
        write_json_atomically(str(path), {"AP": 2.0})
    assert json.loads(path.read_text()) == {"AP": 1.0}
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_an_interrupted_write_leaves_nothing_half_written(tmp_path):
    path = tmp_path / "predictions.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(str(path)) as f:
            f.write("[{")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def write_half_then_fill_the_disk(*paths):
    """A writer that puts half a file at each of ``paths`` (a call's positional or keyword arguments may name
    them) and then finds the disk full."""
    for path in paths:
        with open(path, "wb") as f:
            f.write(b"half a file")
    disk_full()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "openvino"])
def test_an_export_that_fills_the_disk_is_one_line_and_keeps_the_previous_files(tmp_path, monkeypatch, fmt):
    """Each exporter writes through temporary names renamed last: the files of an earlier export stay whole."""
    from test_export import FP32, images, tiny_model

    from gn_det.deploy import export_model
    from gn_det.deploy.export import FILE_NAMES

    if fmt == "torchscript":
        monkeypatch.setattr(torch.jit, "save", lambda module, path, **kw: write_half_then_fill_the_disk(path))
        previous = ["model.ts"]
    elif fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        monkeypatch.setattr(onnx, "save", lambda model, path, *a, **kw: write_half_then_fill_the_disk(path))
        previous = ["model.onnx"]
    else:
        openvino = pytest.importorskip("openvino")
        monkeypatch.setattr(openvino, "save_model", lambda model, xml, **kw: write_half_then_fill_the_disk(
            xml, os.path.splitext(xml)[0] + ".bin"))
        previous = ["model.xml", "model.bin"]
    for name in previous:
        (tmp_path / name).write_bytes(b"the previous export of " + name.encode())
    model, _ = tiny_model(opts=FP32)
    path = tmp_path / FILE_NAMES[fmt]
    with pytest.raises(InputError, match=rf"^{path}: no space left on the device \(\S+ MiB free\)") as error:
        export_model(model, images(1)[0], fmt, str(tmp_path))
    assert "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == sorted(previous)  # no temporary file left, no dump beside it
    for name in previous:
        assert (tmp_path / name).read_bytes() == b"the previous export of " + name.encode()


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_ends_in_one_line_and_resume_continues(tmp_path, tiny_dataset_specs,
                                                                                monkeypatch):
    from gn_det.engine import argument_parser, train_or_evaluate

    out = tmp_path / "run"

    def args(*extra):
        return argument_parser().parse_args(["--config-file", GN_YAML, *extra, *tiny_dataset_specs, *SMALL,
                                             "OUTPUT_DIR", str(out)])

    real_save = torch.save
    saves = []

    def fills_the_disk_on_the_second_checkpoint(obj, f, *a, **kw):
        saves.append(f)
        # torch's own zip writer meets the full disk (and reports it as a RuntimeError of its own)
        return real_save(obj, FillsAfter(f, 4096) if len(saves) == 2 else f, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_the_disk_on_the_second_checkpoint)
    with pytest.raises(InputError) as err:
        train_or_evaluate(args())
    message = str(err.value)
    assert "\n" not in message
    assert f"{out}/model_0000001.pth: no space left on the device" in message, message
    assert "checkpoint model_0000001.pth needs about" in message and "--resume" in message
    assert f"last_checkpoint still names {out}/model_0000000.pth" in message
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"
    assert not (out / "model_0000001.pth").exists()
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # no temporary file left behind

    monkeypatch.setattr(torch, "save", real_save)  # space again
    train_or_evaluate(args("--resume"))
    assert (out / "model_final.pth").exists() and (out / "last_checkpoint").read_text() == "model_final.pth"
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").read_text().splitlines()]
    assert iterations[-1] == 2


def test_metrics_json_appends_whole_lines_or_none(tmp_path, monkeypatch):
    """metrics.json (detectron2's JSONWriter, gn-det's file handle): a flush that fills the disk leaves the
    lines written before, and the next flush with space writes the lines of both."""
    from detectron2.utils.events import EventStorage

    from gn_det.engine.trainer import AtomicJSONWriter

    path = tmp_path / "metrics.json"
    writer = AtomicJSONWriter(str(path))
    with EventStorage(0) as storage:
        storage.put_scalar("total_loss", 1.0, smoothing_hint=False)
        writer.write()
        storage.iter = 1
        storage.put_scalar("total_loss", 0.5, smoothing_hint=False)
        with monkeypatch.context() as patched:
            patched.setattr(os, "fsync", disk_full)
            with pytest.raises(InputError, match=rf"^{path}: no space left on the device"):
                writer.write()
        assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0]
        storage.iter = 2
        storage.put_scalar("total_loss", 0.25, smoothing_hint=False)
        writer.write()
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 1, 2]
