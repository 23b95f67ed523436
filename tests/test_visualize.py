"""tools/visualize.py: ground truth beside each run's saved predictions, drawn on the evaluation images."""
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs
pytest.importorskip("cv2")  # detectron2's Visualizer imports it

from PIL import Image  # noqa: E402
from pycocotools import mask as mask_util  # noqa: E402

from gn_det import InputError  # noqa: E402
from gn_det.analysis.runs import Run  # noqa: E402
from gn_det.analysis.visualize import TITLE_LINE, ap_title, choose_images, found_masks, visualize_runs  # noqa: E402

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


def test_a_run_without_predictions_is_evaluated_from_weights(tiny_shapes_runs, tmp_path):
    run = tmp_path / "gn_no_predictions"
    shutil.copytree(tiny_shapes_runs["gn"], run, ignore=shutil.ignore_patterns("inference", "results.json"))
    out = tmp_path / "pictures"
    paths = visualize_runs([str(run)], str(out), labels=["GN"], num_images=1, score_threshold=0.0,
                           weights="model_final.pth")
    assert len(paths) == 1 and os.path.isfile(paths[0])
    assert os.path.isfile(out / "inference" / "GN" / "inference" / "vis_val" / "instances_predictions.pth")
    assert Run(str(out / "inference" / "GN")).metric("bbox/AP") is not None
    assert not os.path.exists(run / "inference")  # the run folder is left as it was


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


def test_tool_ends_bad_input_in_one_line(tiny_shapes_runs, tmp_path):
    line = tool_exit_message("visualize.py", tiny_shapes_runs["gn"], "--dataset", "no_such_dataset", "--out",
                             tmp_path / "pictures")
    assert line.startswith(
        "visualize.py: error: command line: --dataset names dataset 'no_such_dataset', which is not registered")
    assert not (tmp_path / "pictures").exists()
