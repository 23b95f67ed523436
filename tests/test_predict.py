"""tools/predict.py: a trained model on a folder of images -> one drawn PNG per image and COCO results."""
import json
import os

import pytest

pytest.importorskip("detectron2")
pytestmark = pytest.mark.slow  # tool subprocesses and training runs
pytest.importorskip("cv2")  # detectron2's Visualizer imports it

from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from gn_det import InputError  # noqa: E402
from gn_det.predict import expand_inputs, load_predictor, predict_images  # noqa: E402

from conftest import tool_exit_message, tool_main  # noqa: E402

# A LazyConfig model small enough for a test: detectron2's Mask R-CNN FPN config with R-18 stages.
LAZY_CONFIG = """
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

model = get_config("common/models/mask_rcnn_fpn.py").model
model.backbone.bottom_up.stages.depth = 18
del model.backbone.bottom_up.stages.stride_in_1x1  # BasicBlock has no such argument
model.roi_heads.num_classes = 3
model.roi_heads.box_predictor.test_score_thresh = 0.0
dataloader = dict(test=dict(mapper=dict(augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=128)]),
                            dataset=dict(names="vis_val")))
train = dict(device="cpu")
"""


def test_predict_on_a_folder_writes_a_png_per_image_and_coco_results(tiny_shapes_runs, tmp_path, capsys):
    run, val = tiny_shapes_runs["gn"], os.path.join(tiny_shapes_runs["shapes"], "val")
    out, val_json = tmp_path / "predictions", os.path.join(tiny_shapes_runs["shapes"], "val.json")
    capsys.readouterr()
    tool_main("predict.py", "--config-file", os.path.join(run, "config.yaml"), "--weights",
              os.path.join(run, "model_final.pth"), val, "--out", out, "--coco-json", val_json, "--scale", "2")
    stderr = capsys.readouterr().err
    images = sorted(os.listdir(val))
    assert sorted(os.listdir(out)) == sorted([os.path.splitext(f)[0] + ".png" for f in images] + ["predictions.json"])
    for name in images:
        width, height = Image.open(os.path.join(val, name)).size
        assert Image.open(out / (os.path.splitext(name)[0] + ".png")).size == (2 * width, 2 * height)
    results = json.loads((out / "predictions.json").read_text())
    assert results, "a model keeping every detection (SCORE_THRESH_TEST 0) predicted nothing"
    truth = COCO(val_json)
    loaded = truth.loadRes(str(out / "predictions.json"))
    assert len(loaded.getAnnIds()) == len(results)
    names = {c["id"]: c["name"] for c in truth.dataset["categories"]}
    assert all(r["category_name"] == names[r["category_id"]] for r in results)
    assert {r["image_id"] for r in results} <= set(truth.getImgIds())
    assert "predict: 100%" in stderr  # tqdm's progress bar


def test_python_config_predicts_like_a_yaml_one(tiny_shapes_runs, tmp_path):
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    from gn_det.data import register_coco_dataset

    shapes = tiny_shapes_runs["shapes"]
    register_coco_dataset("vis_val", os.path.join(shapes, "val.json"), os.path.join(shapes, "val"))  # as the runs did
    config = tmp_path / "mask_rcnn_R_18_FPN.py"
    config.write_text(LAZY_CONFIG)
    torch.manual_seed(0)
    DetectionCheckpointer(instantiate(LazyConfig.load(str(config)).model), save_dir=str(tmp_path)).save("random")
    predictor = load_predictor(str(config), str(tmp_path / "random.pth"),
                               ["model.roi_heads.box_predictor.test_topk_per_image=5"])
    image = os.path.join(shapes, "val", sorted(os.listdir(os.path.join(shapes, "val")))[0])
    json_path = predict_images(predictor, expand_inputs([image]), str(tmp_path / "out"), score_threshold=0.0)
    results = json.loads(open(json_path).read())
    assert 0 < len(results) <= 5  # the override reached the model
    assert {r["category_name"] for r in results} <= {"circle", "rectangle", "triangle"}  # vis_val's classes
    assert Image.open(tmp_path / "out" / (os.path.splitext(os.path.basename(image))[0] + ".png")).size == (128, 128)


def test_bad_input_is_one_line_and_writes_nothing(tiny_shapes_runs, tmp_path):
    val = os.path.join(tiny_shapes_runs["shapes"], "val")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    for inputs, message in (([val, str(broken)], "broken.png: not a readable image"),
                            ([str(tmp_path / "*.jpg")], r"\*.jpg matches no file"),
                            ([str(tmp_path / "missing.png")], "missing.png is not a file or folder")):
        with pytest.raises(InputError, match=message) as err:
            expand_inputs(inputs)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="--weights: .*nothing.pth is not a file"):
        load_predictor(os.path.join(tiny_shapes_runs["gn"], "config.yaml"), str(tmp_path / "nothing.pth"))
    line = tool_exit_message("predict.py", "--config-file", os.path.join(tiny_shapes_runs["gn"], "config.yaml"),
                             "--weights", os.path.join(tiny_shapes_runs["gn"], "model_final.pth"), val, broken,
                             "--out", tmp_path / "out")
    assert line.startswith(f"predict.py: error: {broken}: not a readable image")
    assert not (tmp_path / "out").exists()
