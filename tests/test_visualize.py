"""tools/visualize.py: ground truth beside each run's saved predictions, drawn on the evaluation images."""
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytest.importorskip("cv2")  # detectron2's Visualizer imports it

import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from gn_det import InputError  # noqa: E402
from gn_det.fileio import atomic_write  # noqa: E402
from gn_det.analysis import visualize  # noqa: E402
from gn_det.analysis.runs import Run  # noqa: E402
from gn_det.analysis.visualize import (TITLE_LINE, ap_title, choose_images, found_masks, plan_runs,  # noqa: E402
                                       visualize_runs)

from conftest import tool_exit_message  # noqa: E402

IMAGE_SIZE = 128  # the tiny runs' images


def rle(box, size=16):
    mask = np.zeros((size, size), dtype=np.uint8, order="F")
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 1
    encoded = mask_util.encode(mask)
    encoded["counts"] = encoded["counts"].decode()
    return encoded


def record(image_id, boxes_and_classes):
    return {"image_id": image_id, "height": 16, "width": 16, "file_name": f"{image_id}.png",
            "annotations": [{"segmentation": rle(b), "category_id": c, "iscrowd": 0} for b, c in boxes_and_classes]}


def result(image_id, box, category_id, score=0.9):
    return {"image_id": image_id, "segmentation": rle(box), "category_id": category_id, "score": score,
            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}


def test_found_masks_needs_the_class_an_iou_of_one_half_and_the_score():
    truth = record(1, [((0, 0, 8, 8), 0), ((8, 8, 16, 16), 1)])
    # COCOEvaluator's saved results carry contiguous class indices, as the dataset dicts do
    assert found_masks(truth, [result(1, (0, 0, 8, 8), 0), result(1, (8, 8, 16, 16), 1)], 0.5) == 2
    assert found_masks(truth, [result(1, (0, 0, 8, 8), 1)], 0.5) == 0  # wrong class
    assert found_masks(truth, [result(1, (0, 0, 8, 3), 0)], 0.5) == 0  # IoU 3/8
    assert found_masks(truth, [result(1, (0, 0, 8, 8), 0, score=0.4)], 0.5) == 0


def test_images_where_runs_differ_most_come_first_and_even_spacing_is_by_dataset_order():
    records = [record(i, [((0, 0, 8, 8), 0)]) for i in range(1, 6)]
    both = {i: [result(i, (0, 0, 8, 8), 0)] for i in range(1, 6)}
    one = {i: both[i] for i in (1, 2, 5)}  # misses images 3 and 4, which the other run finds
    chosen = choose_images(records, [both, one], 3, "differ", 0.5)
    assert [r["image_id"] for r in chosen] == [3, 4, 1]
    assert [r["image_id"] for r in choose_images(records, [both, one], 3, "even", 0.5)] == [1, 3, 5]


@pytest.mark.slow  # trains the tiny runs
def test_visualize_writes_a_png_per_image_with_ground_truth_and_each_run(tiny_shapes_runs, tmp_path):
    runs = [tiny_shapes_runs["gn"], tiny_shapes_runs["bnstar"]]
    out, sheet = tmp_path / "pictures", tmp_path / "sheet.png"
    paths = visualize_runs(runs, str(out), labels=["GN", "BN*"], num_images=2, score_threshold=0.0, sheet=str(sheet))
    assert paths[-1] == str(sheet) and len(paths) == 3
    rows = [np.asarray(Image.open(p).convert("RGB")) for p in paths[:2]]
    for row in rows:
        # three panels of the image's size (scale 1) under a two-line title
        assert row.shape == (IMAGE_SIZE + 2 * TITLE_LINE, 3 * IMAGE_SIZE, 3)
        truth, gn, bnstar = (row[2 * TITLE_LINE:, i * IMAGE_SIZE:(i + 1) * IMAGE_SIZE] for i in range(3))
        assert (gn != bnstar).any(), "the two runs' predictions are drawn alike"
        assert (truth != gn).any()
    assert Image.open(sheet).size == (3 * IMAGE_SIZE, 2 * (IMAGE_SIZE + 2 * TITLE_LINE))
    gn_run = Run(runs[0], "GN")
    assert ap_title(gn_run) == ("GN", f"box AP {gn_run.metric('bbox/AP'):.1f}  mask AP {gn_run.metric('segm/AP'):.1f}")


@pytest.mark.slow  # trains the tiny runs
def test_runs_without_predictions_are_evaluated_from_weights_each_into_its_own_folder(tiny_shapes_runs, tmp_path):
    # two runs whose folders have the same name: each is evaluated into a folder of its own
    run_dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for norm, run in zip(("gn", "bnstar"), run_dirs):
        shutil.copytree(tiny_shapes_runs[norm], run, ignore=shutil.ignore_patterns("inference", "results.json"))
    out = tmp_path / "pictures"
    paths = visualize_runs([str(d) for d in run_dirs], str(out), num_images=1, score_threshold=0.0,
                           weights="model_final.pth")
    assert len(paths) == 1 and os.path.isfile(paths[0])
    for norm, folder in (("gn", "1_a_run"), ("bnstar", "2_b_run")):
        assert os.path.isfile(out / "inference" / folder / "inference" / "vis_val" / "instances_predictions.pth")
        # the evaluation gives the numbers of the run's own (tests/test_train.py)
        assert Run(str(out / "inference" / folder)).final == Run(tiny_shapes_runs[norm]).final
    for run in run_dirs:
        assert not os.path.exists(run / "inference")  # the run folder is left as it was


@pytest.mark.slow  # trains the tiny runs
def test_bad_input_is_one_line_and_writes_nothing(tiny_shapes_runs, tmp_path):
    no_predictions = tmp_path / "no_predictions"
    shutil.copytree(tiny_shapes_runs["gn"], no_predictions, ignore=shutil.ignore_patterns("inference"))
    out = tmp_path / "pictures"
    cases = [
        (dict(run_dirs=[str(no_predictions)]), "no inference/vis_val/instances_predictions.pth and no --weights"),
        (dict(run_dirs=[tiny_shapes_runs["gn"]], dataset="no_such_dataset"),
         "names dataset 'no_such_dataset', which is not registered"),
        (dict(run_dirs=[tiny_shapes_runs["gn"]], weights="x.pth", dataset="vis_val", labels=["a", "b"]),
         "2 labels"),
        (dict(run_dirs=[str(tmp_path / "missing")], dataset="vis_val"), "missing: not a folder"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message) as err:
            visualize_runs(out_dir=str(out), **kwargs)
        assert "\n" not in str(err.value)
        assert not out.exists()


@pytest.mark.slow  # trains the tiny runs
def test_tool_ends_bad_input_in_one_line(tiny_shapes_runs, tmp_path):
    line = tool_exit_message("visualize.py", tiny_shapes_runs["gn"], "--dataset", "no_such_dataset", "--out",
                             tmp_path / "pictures")
    assert line.startswith(
        "visualize.py: error: command line: --dataset names dataset 'no_such_dataset', which is not registered")
    assert not (tmp_path / "pictures").exists()


def test_each_run_to_evaluate_gets_its_own_folder(tmp_path):
    run_dirs = []
    for parent in ("a", "b"):
        run = tmp_path / "vis" / parent / "run"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        (run / "model_final.pth").write_bytes(b"")
        run_dirs.append(str(run))
    for labels in (visualize.run_labels(run_dirs), ["BN*", "BN?"]):  # the folder names; labels alike as folders
        _, to_evaluate = plan_runs(run_dirs, labels, "vis_val", "model_final.pth", None, "out")
        folders = [folder for _, _, folder in to_evaluate.values()]
        assert len(set(folders)) == 2, folders
    assert folders == [os.path.join("out", "inference", "1_BN_"), os.path.join("out", "inference", "2_BN_")]


@pytest.fixture
def fake_runs(tmp_path):
    """Two runs with saved predictions of a registered dataset "fake_<tmp_path name>" of two images of different
    sizes with the same file name in two folders: ``(dataset, [run dirs])``. The runs' results.json hold AP on
    "other" first (their first test set), then on the fake dataset."""
    images = [(tmp_path / "images" / "a" / "0001.png", (40, 30)), (tmp_path / "images" / "b" / "0001.png", (64, 48))]
    records = []
    for image_id, (path, (width, height)) in enumerate(images, 1):
        path.parent.mkdir(parents=True)
        Image.new("RGB", (width, height), "gray").save(path)
        records.append({"file_name": str(path), "image_id": image_id, "height": height, "width": width,
                        "annotations": [{"bbox": [2, 2, 20, 20], "bbox_mode": 1, "category_id": 0, "iscrowd": 0,
                                         "segmentation": [[2, 2, 20, 2, 20, 20, 2, 20]]}]})
    dataset = f"fake_{tmp_path.name}"
    DatasetCatalog.register(dataset, lambda: records)
    MetadataCatalog.get(dataset).set(thing_classes=["square"])
    run_dirs = []
    for name, ap in (("gn", 40.0), ("bnstar", 30.0)):
        run = tmp_path / name
        (run / "inference" / dataset).mkdir(parents=True)
        predictions = [{"image_id": r["image_id"], "instances": [
            {"image_id": r["image_id"], "category_id": 0, "bbox": [2.0, 2.0, 18.0, 18.0], "score": 0.9}]}
            for r in records]
        torch.save(predictions, run / "inference" / dataset / "instances_predictions.pth")
        (run / "results.json").write_text(json.dumps({"other": {"bbox": {"AP": 1.0}, "segm": {"AP": 2.0}},
                                                      dataset: {"bbox": {"AP": ap}, "segm": {"AP": ap + 1}}}))
        run_dirs.append(str(run))
    yield dataset, run_dirs
    DatasetCatalog.remove(dataset)
    MetadataCatalog.remove(dataset)


def test_sheet_pads_images_of_different_sizes_and_every_png_is_written_whole(fake_runs, tmp_path, monkeypatch):
    dataset, run_dirs = fake_runs
    written = []

    def recording_atomic_write(path, mode="w"):
        written.append(path)
        return atomic_write(path, mode)

    monkeypatch.setattr(visualize, "atomic_write", recording_atomic_write, raising=False)
    out, sheet = tmp_path / "pictures", tmp_path / "sheets" / "sheet.png"
    paths = visualize_runs(run_dirs, str(out), dataset=dataset, num_images=2, selection="even", sheet=str(sheet))
    # the two images are both named 0001.png: their folder names keep the PNGs apart
    assert paths == [str(out / "a_0001.png"), str(out / "b_0001.png"), str(sheet)]
    assert written == paths  # each through atomic_write: a reader never sees half a PNG
    sizes = [Image.open(p).size for p in paths[:2]]
    assert sizes == [(3 * 40, 30 + 2 * TITLE_LINE), (3 * 64, 48 + 2 * TITLE_LINE)]
    stacked = np.asarray(Image.open(sheet).convert("RGB"))
    assert stacked.shape == (30 + 48 + 4 * TITLE_LINE, 3 * 64, 3)
    assert (stacked[:30 + 2 * TITLE_LINE, 3 * 40:] == 255).all()  # the narrower row padded with white
    assert not [name for name in os.listdir(out) if name.endswith(".tmp.png")]


@pytest.mark.parametrize("content, message", [
    (b"not a pickle", ""),  # what the weights reader says of a file it cannot read or refuses
    (None, "are not COCOEvaluator's list of per-image predictions"),
], ids=["not_a_torch_file", "not_predictions"])
def test_saved_predictions_that_are_not_are_one_line_naming_the_file(fake_runs, tmp_path, content, message):
    dataset, run_dirs = fake_runs
    path = os.path.join(run_dirs[1], "inference", dataset, "instances_predictions.pth")
    if content is None:
        torch.save({"not": "a list"}, path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    line = tool_exit_message("visualize.py", *run_dirs, "--dataset", dataset, "--out", tmp_path / "pictures")
    assert line.startswith(f"visualize.py: error: saved predictions {path} ") and message in line
    assert not (tmp_path / "pictures").exists()


def test_panel_titles_give_the_ap_of_the_dataset_drawn(fake_runs, tmp_path, monkeypatch):
    dataset, run_dirs = fake_runs
    titles, titled = [], visualize.titled

    def recording_titled(panel, lines):
        titles.append(tuple(lines))
        return titled(panel, lines)

    monkeypatch.setattr(visualize, "titled", recording_titled)
    visualize_runs(run_dirs, str(tmp_path / "pictures"), labels=["GN", "BN*"], dataset=dataset, num_images=1)
    assert titles[1:] == [("GN", "box AP 40.0  mask AP 41.0"), ("BN*", "box AP 30.0  mask AP 31.0")]
    assert ap_title(Run(run_dirs[0], "GN")) == ("GN", "box AP 1.0  mask AP 2.0")  # by default its first test set
