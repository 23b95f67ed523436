"""Bad input at every boundary, not a case list: every tool that reads a file is given generic corruptions of
it (empty, truncated, random bytes, another file type, a folder where a file belongs, a file where a folder
belongs, unreadable where the machine enforces permissions) and must end in exactly one line
``TOOL: error: ...`` naming the file, with nothing written. Adding a tool is adding a row to ``SLOTS``.

The tools run in-process (their ``main`` under ``sys.argv``), so any exception other than the tool's one-line
exit fails the test with its traceback; ``test_printed_format_per_tool`` checks the printed line of each tool
in a subprocess."""
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("detectron2")

from conftest import CONFIG_DIR, REPO, tool_exit_message  # noqa: E402

GN_YAML = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
GN_PY = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.py")
TINY = ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_dataset_specs):
    """A valid file of each kind a tool reads, to be corrupted: {kind: path}."""
    root = tmp_path_factory.mktemp("originals")
    shapes = tiny_dataset_specs[0].split("=", 2)[2].split(",")
    json_file, image_dir = shapes
    image = os.path.join(image_dir, sorted(os.listdir(image_dir))[0])
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gn_det.config import get_gn_cfg

    DetectionCheckpointer(build_model(get_gn_cfg(GN_YAML, TINY)), str(root)).save("weights")
    weights = root / "weights.pth"
    run = root / "run"
    run.mkdir()
    (run / "results.json").write_text('{"val": {"bbox": {"AP": 1.0}}}')
    return {"yaml": GN_YAML, "py": GN_PY, "pth": str(weights), "json": json_file, "png": image,
            "image_dir": image_dir, "run": str(run)}


# (tool, kind of the file in the slot, whether the slot is a folder, argv builder(path, originals, out))
SLOTS = {
    "train_net config yaml": ("train_net.py", "yaml", False,
                              lambda p, o, out: ["--config-file", p, *TINY, "OUTPUT_DIR", out]),
    "train_net config py": ("train_net.py", "py", False,
                            lambda p, o, out: ["--config-file", p, f"train.output_dir={out}"]),
    "train_net weights": ("train_net.py", "pth", False,
                          lambda p, o, out: ["--config-file", GN_YAML, *TINY, "MODEL.WEIGHTS", p, "OUTPUT_DIR", out]),
    "train_net eval weights": ("train_net.py", "pth", False,
                               lambda p, o, out: ["--config-file", GN_YAML, "--eval-only", *TINY, "MODEL.WEIGHTS", p,
                                                  "OUTPUT_DIR", out]),
    "train_net dataset json": ("train_net.py", "json", False,
                               lambda p, o, out: ["--config-file", GN_YAML, f"--dataset=bad_{abs(hash(p))}={p},"
                                                  f"{o['image_dir']}", *TINY, "OUTPUT_DIR", out]),
    "train_net dataset images": ("train_net.py", "image_dir", True,
                                 lambda p, o, out: ["--config-file", GN_YAML, f"--dataset=bad_{abs(hash(p))}="
                                                    f"{o['json']},{p}", *TINY, "OUTPUT_DIR", out]),
    "predict config": ("predict.py", "yaml", False,
                       lambda p, o, out: ["--config-file", p, "--weights", o["pth"], o["png"], "--out", out]),
    "predict weights": ("predict.py", "pth", False,
                        lambda p, o, out: ["--config-file", GN_YAML, "--weights", p, o["png"], "--out", out,
                                           "--opts", *TINY]),
    "predict image": ("predict.py", "png", False,
                      lambda p, o, out: ["--config-file", GN_YAML, "--weights", o["pth"], p, "--out", out]),
    "predict coco json": ("predict.py", "json", False,
                          lambda p, o, out: ["--config-file", GN_YAML, "--weights", o["pth"], o["png"], "--out", out,
                                             "--coco-json", p]),
    "convert_weights input": ("convert_weights.py", "pth", False,
                              lambda p, o, out: [p, os.path.join(out, "converted.pkl")]),
    "export_model config": ("export_model.py", "yaml", False,
                            lambda p, o, out: ["--config-file", p, "--output", out, "--sample-image", o["png"],
                                               "MODEL.WEIGHTS", o["pth"]]),
    "export_model weights": ("export_model.py", "pth", False,
                             lambda p, o, out: ["--config-file", GN_YAML, "--output", out, "--sample-image",
                                                o["png"], "MODEL.WEIGHTS", p, *TINY]),
    "export_model sample image": ("export_model.py", "png", False,
                                  lambda p, o, out: ["--config-file", GN_YAML, "--output", out, "--sample-image", p,
                                                     "MODEL.WEIGHTS", o["pth"], *TINY]),
    "compare_runs run": ("compare_runs.py", "run", True, lambda p, o, out: [p, "--out", os.path.join(out, "cmp")]),
    "visualize run": ("visualize.py", "run", True, lambda p, o, out: [p, "--out", out]),
}


def corrupt(kind, original, is_folder, target):
    """Write corruption ``kind`` of ``original`` at ``target``; returns the path to pass (or None: skip)."""
    if is_folder:
        if kind == "file_for_folder":
            target.write_bytes(b"not a folder")
        elif kind == "empty":
            target.mkdir()
        elif kind == "random" and os.path.isfile(os.path.join(original, "results.json")):
            # a run folder whose files hold random bytes (images are decoded while training, not up front)
            shutil.copytree(original, target)
            for name in os.listdir(target):
                if os.path.isfile(target / name):
                    (target / name).write_bytes(os.urandom(64))
        else:
            return None
        return str(target)
    data = open(original, "rb").read()
    if kind == "empty":
        target.write_bytes(b"")
    elif kind == "truncated":
        target.write_bytes(data[: max(1, len(data) // 3)])
    elif kind == "random":
        target.write_bytes(os.urandom(512))
    elif kind == "other_type":  # a file of another kind under this name: an image for a config, else a config
        is_config = original.endswith((".yaml", ".py"))
        target.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64) if is_config else open(GN_YAML, "rb").read())
    elif kind == "folder":
        target.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:  # root reads anything: permissions are not enforced here
            return None
        target.write_bytes(data)
        target.chmod(0)
    else:
        return None
    return str(target)


KINDS = ["empty", "truncated", "random", "other_type", "folder", "file_for_folder", "unreadable"]


@pytest.mark.slow
@pytest.mark.parametrize("slot", list(SLOTS))
def test_every_file_a_tool_reads_is_checked_at_its_boundary(slot, originals, tmp_path):
    tool, kind_of_file, is_folder, argv = SLOTS[slot]
    original = originals[kind_of_file]
    suffix = "" if is_folder else os.path.splitext(original)[1]
    checked = 0
    for kind in KINDS:
        target = tmp_path / f"{kind}{suffix}"
        path = corrupt(kind, original, is_folder, target)
        if path is None:
            continue
        out = tmp_path / f"out_{kind}"
        message = tool_exit_message(tool, *argv(path, originals, str(out)))
        assert path in message, (slot, kind, message)
        assert not out.exists(), (slot, kind, "wrote output")
        checked += 1
    assert checked >= 2


@pytest.mark.slow
@pytest.mark.parametrize("tool", sorted({tool for tool, *_ in SLOTS.values()}))
def test_printed_format_per_tool(tool, originals, tmp_path):
    slot = next(name for name, (t, *_rest) in SLOTS.items() if t == tool)
    _tool, kind_of_file, is_folder, argv = SLOTS[slot]
    path = corrupt("file_for_folder" if is_folder else "empty", originals[kind_of_file], is_folder,
                   tmp_path / ("x" if is_folder else "x" + os.path.splitext(originals[kind_of_file])[1]))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", tool), *argv(path, originals, str(tmp_path /
                                                                                                         "out"))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith(f"{tool}: error: ")]
    assert len(lines) == 1 and proc.stderr.strip().splitlines()[-1] == lines[0] and path in lines[0], proc.stderr


@pytest.mark.slow
def test_an_output_location_in_the_way_is_one_line_before_anything_runs(originals, tmp_path):
    """A file where an output folder belongs (or a folder where an output file belongs, or a file where a parent
    folder belongs) is one line naming it, and the file in the way is left as it was."""
    in_the_way = tmp_path / "in_the_way"
    in_the_way.write_text("an earlier result")
    rows = [
        ("train_net.py", ["--config-file", GN_YAML, *TINY, "OUTPUT_DIR", str(in_the_way)], str(in_the_way)),
        ("predict.py", ["--config-file", GN_YAML, "--weights", originals["pth"], originals["png"], "--out",
                        str(in_the_way)], str(in_the_way)),
        ("visualize.py", [originals["run"], "--out", str(in_the_way / "pictures")], str(in_the_way)),
        ("compare_runs.py", [originals["run"], "--out", str(in_the_way / "cmp")], str(in_the_way)),
        ("convert_weights.py", [originals["pth"], str(tmp_path / "folder.pkl")], "a folder is in the way"),
    ]
    (tmp_path / "folder.pkl").mkdir()
    for tool, args, named in rows:
        message = tool_exit_message(tool, *args)
        assert named in message, (tool, message)
    assert in_the_way.read_text() == "an earlier result"
