"""No weights file runs code when it is read: a pickle whose unpickling would write a marker file is refused in
one line by every reader and every tool that reads weights, and the marker never appears; the weights users
really have (stock detectron2 checkpoints, Detectron's Caffe2 ``.pkl`` blobs, gn-det's converted files) load."""
import os
import pickle
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import CONFIG_DIR, TINY_OPTS, tool_exit_message  # noqa: E402
from gn_det.checkpoint.reader import GNCheckpointer, read_checkpoint, read_weights  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.errors import InputError  # noqa: E402

GN_SHAPES = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")


class WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the reader runs what the pickle names."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def marker_files(tmp_path):
    """(marker path, {suffix: weights file whose unpickling creates the marker})."""
    marker = str(tmp_path / "marker")
    payload = {"model": {"conv.weight": WritesMarker(marker)}, "__author__": "attacker"}
    files = {}
    for suffix in (".pth", ".pkl", ".pyth"):
        path = tmp_path / f"weights{suffix}"
        if suffix == ".pkl":
            path.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, path)
        files[suffix] = str(path)
    assert not os.path.exists(marker)
    return marker, files


@pytest.mark.parametrize("suffix", [".pth", ".pkl", ".pyth"])
def test_readers_refuse_code_and_run_none(marker_files, suffix):
    marker, files = marker_files
    path = files[suffix]
    with pytest.raises(InputError, match=rf"^weights file {path} is refused: it would load .*open") as err:
        read_weights(path)
    assert "\n" not in str(err.value)
    model = torch.nn.Conv2d(3, 8, 3)
    with pytest.raises(InputError, match="is refused"):
        GNCheckpointer(model).load(path)
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_every_tool_that_reads_weights_refuses_code(marker_files, tmp_path, tiny_shapes_runs):
    marker, files = marker_files
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48)).save(images / "a.png")
    out = tmp_path / "out"
    run_without_predictions = tmp_path / "run"  # visualize then evaluates the run's --weights first
    run_without_predictions.mkdir()
    shutil.copy(os.path.join(tiny_shapes_runs["gn"], "config.yaml"), run_without_predictions)
    cases = [
        ("train_net.py", ["--config-file", GN_SHAPES, *TINY_OPTS, "MODEL.WEIGHTS", files[".pkl"],
                          "OUTPUT_DIR", str(out)]),
        ("train_net.py", ["--config-file", GN_SHAPES, "--eval-only", *TINY_OPTS, "MODEL.WEIGHTS", files[".pth"],
                          "OUTPUT_DIR", str(out)]),
        ("predict.py", ["--config-file", GN_SHAPES, "--weights", files[".pkl"], str(images), "--out", str(out)]),
        ("visualize.py", [str(run_without_predictions), "--weights", files[".pth"], "--out", str(out)]),
        ("convert_weights.py", [files[".pth"], str(tmp_path / "converted.pkl")]),
    ]
    for tool, args in cases:  # in this process; tests/test_boundaries.py checks each tool's printed line
        line = tool_exit_message(tool, *args)
        assert line.startswith(f"{tool}: error: ") and "weights" in line and "is refused" in line, (tool, line)
        assert not os.path.exists(marker), tool
        assert not out.exists(), tool  # nothing written before the weights were read


def test_stock_detectron2_checkpoint_with_trainer_state_loads(tmp_path):
    """What detectron2's trainer saves (model, optimizer, scheduler, iteration) reads with weights_only."""
    from detectron2.solver import build_lr_scheduler, build_optimizer

    cfg = get_gn_cfg(GN_SHAPES, TINY_OPTS)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    DetectionCheckpointer(model, str(tmp_path), optimizer=optimizer, scheduler=scheduler).save("model_0000009",
                                                                                              iteration=9)
    other = build_model(cfg)
    checkpointer = GNCheckpointer(other, str(tmp_path), optimizer=build_optimizer(cfg, other),
                                  scheduler=build_lr_scheduler(cfg, optimizer))
    extra = checkpointer.resume_or_load("", resume=True)
    assert extra["iteration"] == 9
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_caffe2_blobs_and_model_zoo_pkl_load(tmp_path, protocol):
    """Detectron's GN ImageNet ``.pkl`` (numpy blobs, maybe under "blobs") and detectron2's model-zoo ``.pkl``
    (``{"model": arrays, "__author__": ...}``) load through the restricted unpickler."""
    cfg = get_gn_cfg(GN_SHAPES, TINY_OPTS)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.state_dict().items()
             if v.is_floating_point()}
    zoo = tmp_path / "zoo.pkl"
    zoo.write_bytes(pickle.dumps({"model": state, "__author__": "Detectron2 Model Zoo"}, protocol=protocol))
    GNCheckpointer(model).load(str(zoo))
    for name, value in state.items():
        np.testing.assert_array_equal(model.state_dict()[name].numpy(), value, err_msg=name)
    stem = {"conv1_w": state["backbone.bottom_up.stem.conv1.weight"] * 2,
            "conv1_gn_s": np.full(64, 3.0, np.float32), "conv1_gn_b": np.full(64, -1.0, np.float32)}
    caffe2 = tmp_path / "R-18-GN.pkl"
    caffe2.write_bytes(pickle.dumps({"blobs": stem}, protocol=protocol))
    GNCheckpointer(model).load(str(caffe2))
    loaded = model.backbone.bottom_up.stem.conv1
    np.testing.assert_array_equal(loaded.weight.detach().numpy(), stem["conv1_w"])
    assert torch.all(loaded.norm.weight == 3.0) and torch.all(loaded.norm.bias == -1.0)


@pytest.mark.parametrize("content", [b"", b"\x80\x04not a pickle", b"PK\x03\x04 truncated zip"])
def test_unreadable_weights_are_one_line(tmp_path, content):
    for suffix in (".pth", ".pkl", ".safetensors"):
        path = tmp_path / f"w{suffix}"
        path.write_bytes(content)
        with pytest.raises(InputError, match=rf"^weights file {path} ") as err:
            read_weights(str(path))
        assert "\n" not in str(err.value)


class RunsSystem:
    """Unpickling this calls ``os.system``, which torch's weights_only reader names as a blocked module."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_refused_file_is_named_by_the_global_it_would_load(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": {"conv.weight": RunsSystem(tmp_path / "marker")}}, path)
    with pytest.raises(InputError, match=rf"is refused: it would load {os.system.__module__}\.system, which"):
        read_weights(str(path))
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("suffix, content, problem", [
    (".pth", {"model": "resnet50", "state_dict": {}}, "its 'model' entry is a str, not a state dict"),
    (".pth", {"model": {1: torch.zeros(1)}}, "its 'model' entry has the key 1, not a parameter name"),
    (".pth", {"conv.weight": torch.zeros(1), "epoch": 3}, ": epoch is not a tensor or a numeric array (int)"),
    (".pkl", {"model": {"w": np.array(["a", None], dtype=object)}, "__author__": "x"},
     "its 'model' entry: w is not a tensor or a numeric array (numpy object)"),
    (".pkl", {"blobs": [np.zeros(1)]}, "its 'blobs' entry is a list, not a state dict"),
    (".pyth", {"model_state": [torch.zeros(1)]}, "its 'model_state' entry is a list, not a state dict"),
])
def test_a_readable_file_that_is_not_a_state_dict_is_one_line(tmp_path, suffix, content, problem):
    """What detectron2's checkpointer would load into the model is checked when the file is read."""
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path)
    for load in (read_checkpoint, GNCheckpointer(torch.nn.Conv2d(3, 8, 3)).load):
        with pytest.raises(InputError) as err:
            load(str(path))
        assert str(err.value).startswith(f"weights file {path}") and problem in str(err.value), str(err.value)


def test_detectron2s_matching_heuristics_suffix_is_read(tmp_path):
    from gn_det.predict import check_model_files

    model = torch.nn.Conv2d(3, 8, 3)
    path = str(tmp_path / "weights.pth")
    torch.save({"model": {"weight": torch.ones_like(model.weight), "bias": torch.ones(8)}}, path)
    with_query = path + "?matching_heuristics=True"
    assert torch.equal(read_checkpoint(with_query)["model"]["bias"], torch.ones(8))
    GNCheckpointer(model).load(with_query)
    assert torch.equal(model.bias.detach(), torch.ones(8))
    check_model_files(GN_SHAPES, with_query)
