"""tools/predict.py: a trained model on a folder of images -> one drawn PNG per image and COCO results."""
import json
import os

import pytest

pytest.importorskip("detectron2")
pytest.importorskip("cv2")  # detectron2's Visualizer imports it

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from PIL import Image  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402

from gn_det import InputError  # noqa: E402
from gn_det.data import ensure_shapes, register_shapes  # noqa: E402
from gn_det.predict import expand_inputs, load_predictor, predict_images  # noqa: E402

from conftest import CONFIG_DIR, tool_exit_message, tool_main  # noqa: E402

SHAPES_GN = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")

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


@pytest.mark.slow  # trains (tiny_shapes_runs)
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


@pytest.mark.slow  # trains (tiny_shapes_runs)
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


@pytest.mark.slow  # trains (tiny_shapes_runs)
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


class OneOfEachClass:
    """predict_images' predictor without a model: a box of each of 3 classes on every image."""

    def __init__(self, metadata):
        self.metadata = metadata

    def __call__(self, rgb):
        return {"instances": Instances(rgb.shape[:2], pred_boxes=Boxes(torch.tensor([[1.0, 1.0, 8.0, 8.0]] * 3)),
                                       scores=torch.tensor([0.9, 0.8, 0.7]), pred_classes=torch.tensor([0, 1, 2]))}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    Image.new("RGB", (16, 16), "gray").save(path)
    return str(path)


def test_predictions_name_the_shapes_category_ids_before_and_after_it_is_generated(monkeypatch, tmp_path, image):
    for name in ("shapes_train", "shapes_val"):  # registered in an empty cache, as in a fresh GN_DET_CACHE
        monkeypatch.delitem(DatasetCatalog.data, name)
        monkeypatch.delitem(MetadataCatalog.data, name)
    root = tmp_path / "shapes"
    register_shapes(str(root))
    predicted = []
    for out in ("before", "after"):
        json_path = predict_images(OneOfEachClass(MetadataCatalog.get("shapes_val")), [image], str(tmp_path / out))
        predicted.append([(r["category_id"], r["category_name"]) for r in json.loads(open(json_path).read())])
        if not root.exists():
            ensure_shapes(str(root), num_train=1, num_val=1, image_size=32)
            DatasetCatalog.get("shapes_val")  # load_coco_json sets the id map again: the same one, or it asserts
    assert predicted == [[(1, "circle"), (2, "rectangle"), (3, "triangle")]] * 2


def test_predictions_without_the_datasets_category_ids_are_refused_before_writing(tmp_path, image):
    for metadata, what in ((MetadataCatalog.get("__unlabelled__"), "the config names no dataset"),
                           (MetadataCatalog.get("test_predict_unregistered"),
                            "dataset 'test_predict_unregistered' has no category id map or COCO file")):
        with pytest.raises(InputError, match=rf"^predictions\.json needs the dataset's category ids, but {what}: "):
            predict_images(OneOfEachClass(metadata), [image], str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def deep_images(tmp_path):
    """(path, PIL mode) of images of more than 8 bits per channel."""
    ramp = np.arange(16 * 16).reshape(16, 16)
    Image.fromarray((ramp * 200).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray((ramp / 255).astype(np.float32)).save(tmp_path / "float.tif")
    return [(tmp_path / "deep.png", "I;16"), (tmp_path / "float.tif", "F")]


def test_a_truncated_or_deep_image_is_one_line_naming_it_before_out_is_created(tmp_path):
    """Checked when the inputs are expanded, before the model (so no weights needed here) and --out."""
    full, cut = tmp_path / "full.jpg", tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    cases = [(cut, f"{cut}: not a readable image (image file is truncated")]
    cases += [(path, f"{path}: image mode {mode} has more than 8 bits per channel") for path, mode in
              deep_images(tmp_path)]
    for path, message in cases:
        line = tool_exit_message("predict.py", "--config-file", SHAPES_GN, "--weights", tmp_path / "unused.pth",
                                 path, "--out", tmp_path / "out")
        assert line.startswith(f"predict.py: error: {message}"), line
        assert not (tmp_path / "out").exists()
    assert expand_inputs([str(full)]) == [str(full)]
