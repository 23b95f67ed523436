"""The synthetic shapes dataset (deterministic, valid COCO, visible-part masks, cached generation) and the
checked registration of COCO datasets (each bad input fails at registration with a one-line message)."""
import collections
import importlib.util
import json
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from conftest import REPO

try:
    from gn_det.data import shapes
except ImportError:
    # gn_det's package __init__ imports detectron2; the generator itself needs only numpy, PIL and
    # pycocotools, so its tests run without detectron2 on the module loaded from its file.
    _spec = importlib.util.spec_from_file_location("shapes", os.path.join(REPO, "gn_det", "data", "shapes.py"))
    shapes = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(shapes)

SMALL = {"num_train": 8, "num_val": 4, "image_size": 128}
FRUITS_NUTS = os.path.join(REPO, "..", "shared", "data", "fruits_nuts")


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory):
    return shapes.generate_shapes(str(tmp_path_factory.mktemp("shapes")), **SMALL)


def tree_bytes(root):
    files = {}
    for folder, _, names in os.walk(root):
        for file_name in names:
            path = os.path.join(folder, file_name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


# --- generator (no detectron2) ---------------------------------------------------------------------------


def test_generation_is_deterministic(tmp_path, small_shapes):
    again = tree_bytes(shapes.generate_shapes(str(tmp_path / "again"), **SMALL))
    assert again == tree_bytes(small_shapes)
    assert sorted(again) == sorted(
        ["train.json", "val.json"] + [f"train/{i:06d}.png" for i in range(8)] + [f"val/{i:06d}.png" for i in range(4)]
    )
    other_seed = tree_bytes(shapes.generate_shapes(str(tmp_path / "seed1"), **SMALL, seed=1))
    assert other_seed["train/000000.png"] != again["train/000000.png"]


@pytest.mark.parametrize("split", shapes.SHAPES_SPLITS)
def test_generated_split_is_valid_coco_with_visible_masks(small_shapes, split):
    from PIL import Image

    coco = COCO(os.path.join(small_shapes, f"{split}.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(shapes.SHAPES_CLASSES)
    assert coco.getCatIds() == [1, 2, 3]
    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    for image_id in coco.getImgIds():
        image = coco.loadImgs(image_id)[0]
        with Image.open(os.path.join(small_shapes, split, image["file_name"])) as pixels:
            assert pixels.size == (image["width"], image["height"]) == (128, 128) and pixels.mode == "RGB"
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert 1 <= len(annotations) <= shapes.MAX_INSTANCES_PER_IMAGE
        covered = np.zeros((128, 128), dtype=np.int64)
        for annotation in annotations:
            mask = coco.annToMask(annotation)
            assert annotation["iscrowd"] == 0
            assert annotation["area"] == mask.sum() >= shapes.MIN_VISIBLE_PIXELS
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
            assert np.allclose(annotation["bbox"], mask_util.toBbox(annotation["segmentation"]))
            covered += mask
        assert covered.max() == 1  # visible parts of one image never overlap


def test_occluded_instances_keep_enough_visible(monkeypatch):
    # Record every candidate shape; the one painted is the last candidate before its colour is chosen.
    candidates, painted = [], []
    shape_mask, contrasting_colour = shapes.shape_mask, shapes.contrasting_colour
    monkeypatch.setattr(shapes, "shape_mask", lambda *args: candidates.append(shape_mask(*args)) or candidates[-1])
    monkeypatch.setattr(shapes, "contrasting_colour",
                        lambda *args: painted.append(candidates[-1].copy()) or contrasting_colour(*args))
    fractions = []
    for seed in range(40):
        painted.clear()
        pixels, instances = shapes.render_image(np.random.default_rng(seed), 96)
        assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8
        assert len(instances) == len(painted)
        for i, ((_, visible), full) in enumerate(zip(instances, painted)):
            later = np.any([np.zeros_like(full), *painted[i + 1:]], axis=0)
            assert (visible == (full & ~later)).all()
            fractions.append(visible.sum() / full.sum())
    assert min(fractions) >= shapes.MIN_VISIBLE_FRACTION
    assert min(fractions) < 0.8  # occlusion does happen


def test_classes_are_roughly_balanced(tmp_path):
    root = shapes.generate_shapes(str(tmp_path), num_train=60, num_val=1, image_size=96)
    with open(os.path.join(root, "train.json")) as f:
        counts = collections.Counter(a["category_id"] for a in json.load(f)["annotations"])
    total = sum(counts.values())
    assert total >= 120
    assert all(0.25 <= counts[c] / total <= 0.42 for c in (1, 2, 3)), counts


def test_shapes_root_follows_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path))
    assert shapes.shapes_root() == os.path.join(str(tmp_path), f"shapes_v{shapes.SHAPES_VERSION}")
    monkeypatch.delenv("GN_DET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert shapes.shapes_root() == os.path.join(str(tmp_path), "home", ".cache", "gn_det",
                                                 f"shapes_v{shapes.SHAPES_VERSION}")


def test_ensure_shapes_generates_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path))
    # A generation that was killed leaves a partial folder: it must not count, and is cleaned up.
    folder = f"shapes_v{shapes.SHAPES_VERSION}"
    stale = tmp_path / f"{folder}.partial-999999"
    (stale / "train").mkdir(parents=True)
    root = shapes.ensure_shapes(num_train=3, num_val=2, image_size=64)
    assert root == shapes.shapes_root() and shapes.is_complete(root)
    assert sorted(os.listdir(tmp_path)) == [folder, f"{folder}.lock"]
    assert len(os.listdir(os.path.join(root, "train"))) == 3
    before = tree_bytes(root)
    assert shapes.ensure_shapes(num_train=5) == root  # already there: not generated again
    assert tree_bytes(root) == before


def test_ensure_shapes_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "shapes" / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"shapes exists but is not a complete shapes dataset"):
        shapes.ensure_shapes(str(tmp_path / "shapes"), num_train=1, num_val=1, image_size=64)


def test_ensure_shapes_from_concurrent_processes(tmp_path):
    # Both processes generate or wait; the result is one complete dataset and no partial folder.
    code = (
        "import sys; sys.path.insert(0, sys.argv[2]); import shapes; "
        "shapes.ensure_shapes(sys.argv[1], num_train=20, num_val=2, image_size=64)"
    )
    root = str(tmp_path / "shapes")
    workers = [
        subprocess.Popen([sys.executable, "-c", code, root, os.path.join(REPO, "gn_det", "data")]) for _ in range(2)
    ]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    assert sorted(os.listdir(tmp_path)) == ["shapes", "shapes.lock"]
    assert tree_bytes(root) == tree_bytes(shapes.generate_shapes(str(tmp_path / "ref"), 20, 2, 64))


# --- detectron2 registration ------------------------------------------------------------------------------


@pytest.fixture
def catalogs(d2):
    """detectron2's catalogs; datasets a test registers under ``unique_name`` are removed afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    before = set(DatasetCatalog.list())
    yield DatasetCatalog, MetadataCatalog
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def unique_name():
    return f"test_{uuid.uuid4().hex[:8]}"


def write_coco(tmp_path, coco, file_name="bad.json"):
    path = tmp_path / file_name
    path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
    return str(path)


@pytest.fixture
def good_coco(small_shapes):
    with open(os.path.join(small_shapes, "val.json")) as f:
        return json.load(f)


def test_registered_copy_loads_with_segmentation(catalogs, small_shapes):
    from gn_det.data import register_coco_dataset

    DatasetCatalog, MetadataCatalog = catalogs
    name = unique_name()
    register_coco_dataset(name, os.path.join(small_shapes, "train.json"), os.path.join(small_shapes, "train"))
    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == ["circle", "rectangle", "triangle"]
    assert metadata.evaluator_type == "coco"
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 8
    for record in dicts:
        assert os.path.isfile(record["file_name"]) and record["height"] == record["width"] == 128
        for annotation in record["annotations"]:
            assert isinstance(annotation["segmentation"], dict)  # RLE: needs INPUT.MASK_FORMAT "bitmask"
            assert annotation["category_id"] in (0, 1, 2)
            assert mask_util.area(annotation["segmentation"]) > 0


def test_registering_again_is_a_noop_unless_paths_differ(catalogs, small_shapes):
    from gn_det.data import register_coco_dataset

    name = unique_name()
    json_file, image_dir = os.path.join(small_shapes, "val.json"), os.path.join(small_shapes, "val")
    register_coco_dataset(name, json_file, image_dir)
    register_coco_dataset(name, os.path.relpath(json_file), image_dir)  # the same file: no-op
    already = rf"dataset '{name}' is already registered \(json_file=.*val\.json.*train\.json"
    with pytest.raises(ValueError, match=already):
        register_coco_dataset(name, os.path.join(small_shapes, "train.json"), image_dir)


def test_parse_dataset_spec(d2):
    from gn_det.data import parse_dataset_spec

    assert parse_dataset_spec("mine=/data/a.json,/data/images") == ("mine", "/data/a.json", "/data/images")
    assert parse_dataset_spec(" mine = a.json , images ") == ("mine", "a.json", "images")
    for bad in ("mine", "mine=a.json", "=a.json,images", "mine=,images", "mine=a.json,", "mine=a.json,im,ages"):
        with pytest.raises(ValueError, match=rf"^dataset spec '{bad}' is not NAME=JSON_FILE,IMAGE_DIR$"):
            parse_dataset_spec(bad)


def test_register_datasets_from_specs(catalogs, small_shapes):
    from gn_det.data import register_datasets

    DatasetCatalog, _ = catalogs
    train, val = unique_name(), unique_name()
    specs = [
        f"{train}={small_shapes}/train.json,{small_shapes}/train",
        f"{val}={small_shapes}/val.json,{small_shapes}/val",
        f"{val}={small_shapes}/val.json,{small_shapes}/val",  # repeated flag: no-op
    ]
    assert register_datasets(specs) == [train, val, val]
    assert len(DatasetCatalog.get(val)) == 4
    with pytest.raises(ValueError, match="is not NAME=JSON_FILE,IMAGE_DIR"):
        register_datasets(["broken"])


def test_register_datasets_from_config_key(catalogs, small_shapes):
    from gn_det.config import get_gn_cfg
    from gn_det.data import register_datasets

    name = unique_name()
    cfg = get_gn_cfg(opts=["DATASETS.REGISTER", f"['{name}={small_shapes}/val.json,{small_shapes}/val']"])
    assert register_datasets(cfg.DATASETS.REGISTER) == [name]


def bad_input_cases(tmp_path, small_shapes, coco):
    """(description, json_file, image_dir, exception, message regex) for every input the check rejects."""
    from gn_det.errors import InputError

    val_dir = os.path.join(small_shapes, "val")
    missing_image = dict(coco, images=coco["images"] + [dict(coco["images"][0], id=99, file_name="nowhere.png")])
    unknown_category = dict(coco, annotations=[dict(coco["annotations"][0], id=7, category_id=42)])
    unknown_image = dict(coco, annotations=[dict(coco["annotations"][0], id=7, image_id=1234)])
    repeated_id = dict(coco, annotations=[coco["annotations"][0], dict(coco["annotations"][1], id=1)])
    return [
        ("missing json", str(tmp_path / "none.json"), val_dir, InputError,
         r"annotation file .*none\.json does not exist"),
        ("missing image folder", os.path.join(small_shapes, "val.json"), str(tmp_path / "nodir"), InputError,
         r"image folder .*nodir does not exist"),
        ("missing image file", write_coco(tmp_path, missing_image), val_dir, InputError,
         r"bad\.json: image 99 file 'nowhere\.png' is not in .*val"),
        ("unknown category", write_coco(tmp_path, unknown_category, "cat.json"), val_dir, InputError,
         r"cat\.json: annotation 7 has category_id 42, which is not in 'categories' \(ids 1, 2, 3\)"),
        ("unknown image", write_coco(tmp_path, unknown_image, "img.json"), val_dir, InputError,
         r"img\.json: annotation 7 refers to image id 1234, which is not in 'images'"),
        ("repeated annotation id", write_coco(tmp_path, repeated_id, "rep.json"), val_dir, InputError,
         r"rep\.json: annotation id 1 appears more than once"),
        ("no images", write_coco(tmp_path, dict(coco, images=[]), "noimg.json"), val_dir, InputError,
         r"noimg\.json has no images: the dataset is empty"),
        ("no annotations", write_coco(tmp_path, dict(coco, annotations=[]), "noann.json"), val_dir, InputError,
         r"noann\.json has no annotations: the dataset is empty"),
        ("not coco", write_coco(tmp_path, {"images": []}, "notcoco.json"), val_dir, InputError,
         r"notcoco\.json is not a COCO instances file: no 'annotations' list"),
        ("malformed json", write_coco(tmp_path, '{"images": [', "broken.json"), val_dir, InputError,
         r"broken\.json is not valid JSON: Expecting value: line 1"),
        ("annotation without category", write_coco(tmp_path, dict(coco, annotations=[{"id": 3, "image_id": 1}]),
                                                   "nocat.json"), val_dir, InputError,
         r"nocat\.json: annotation 3 .* has no 'category_id'"),
    ]


def test_bad_inputs_fail_at_registration_in_one_line(catalogs, tmp_path, small_shapes, good_coco):
    from gn_det.data import register_coco_dataset

    DatasetCatalog, _ = catalogs
    for description, json_file, image_dir, error, message in bad_input_cases(tmp_path, small_shapes, good_coco):
        name = unique_name()
        with pytest.raises(error, match=rf"^dataset '{name}': .*{message}") as raised:
            register_coco_dataset(name, json_file, image_dir)
        assert "\n" not in str(raised.value), description
        assert name not in DatasetCatalog.list(), description


# A change to a good COCO file (shapes val: categories 1-3, image 1 holding annotation 1) -> what the check says
MALFORMED_ENTRIES = {
    "repeated category id": (lambda c: c["categories"].append(dict(c["categories"][0], name="again")),
                             r"category id 1 appears more than once"),
    "image without height": (lambda c: c["images"][0].pop("height"), r"image 1 \{.*\} has no 'height'"),
    "image without width": (lambda c: c["images"][0].pop("width"), r"image 1 \{.*\} has no 'width'"),
    "annotation without bbox": (lambda c: c["annotations"][0].pop("bbox"), r"annotation 1 \{.* has no 'bbox'"),
    "bbox of a string": (lambda c: c["annotations"][0].update(bbox=["1", 2, 3, 4]),
                         r'annotation 1 has bbox \["1", 2, 3, 4\], not a list of 4 numbers'),
    "bbox of 3 numbers": (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]),
                          r"annotation 1 has bbox \[1, 2, 3\], not a list of 4 numbers"),
    "string category_id": (lambda c: c["annotations"][0].update(category_id="1"),
                           r"annotation 1 has category_id '1', which is not in 'categories' \(ids 1, 2, 3\)"),
    "list as image id": (lambda c: c["images"][0].update(id=[1]),
                         r"image \{.*\} has 'id' \[1\], not a number or string"),
    "list as image_id": (lambda c: c["annotations"][0].update(image_id=[1]),
                         r"annotation 1 \{.* has 'image_id' \[1\], not a number or string"),
    "file_name not a string": (lambda c: c["images"][0].update(file_name=5), r"image 1 has file_name 5, not a string"),
    "category ids of numbers and strings": (lambda c: c["categories"].append({"id": "4", "name": "x"}),
                                            r"the category ids mix numbers and strings"),
}


@pytest.mark.parametrize("case", MALFORMED_ENTRIES)
def test_malformed_entries_fail_at_registration_in_one_line(catalogs, tmp_path, small_shapes, good_coco, case):
    from gn_det.data import register_coco_dataset
    from gn_det.errors import InputError

    DatasetCatalog, _ = catalogs
    change, message = MALFORMED_ENTRIES[case]
    change(good_coco)
    name, json_file = unique_name(), write_coco(tmp_path, good_coco)
    with pytest.raises(InputError, match=rf"^dataset '{name}': {json_file}: {message}") as raised:
        register_coco_dataset(name, json_file, os.path.join(small_shapes, "val"))
    assert "\n" not in str(raised.value)
    assert name not in DatasetCatalog.list()


def test_annotations_without_segmentation_are_recorded_and_refused_to_a_mask_model(catalogs, monkeypatch, tmp_path,
                                                                                   small_shapes, good_coco):
    """A box-only model needs no segmentation: the dataset registers, and the check of a run with masks refuses it
    naming the first non-crowd annotation without one, from a cached verdict too."""
    from gn_det.data.register import check_segmentations, register_coco_dataset
    from gn_det.errors import InputError

    monkeypatch.setenv("GN_DET_CACHE", str(tmp_path / "cache"))
    annotations = good_coco["annotations"]
    annotations[0].update(iscrowd=1, segmentation=None)  # a crowd annotation trains nothing: none needed
    annotations[2].update(segmentation=[])  # load_coco_json keeps it, without a segmentation
    del annotations[3]["segmentation"]
    json_file, image_dir = write_coco(tmp_path, good_coco), os.path.join(small_shapes, "val")
    for name in (unique_name(), unique_name()):  # the second from the verdict the first cached
        register_coco_dataset(name, json_file, image_dir)
        with pytest.raises(InputError, match=rf"^DATASETS.TRAIN dataset '{name}': {json_file}: annotation 3 has no "
                                             "segmentation, which a model predicting masks needs"):
            check_segmentations(name, "DATASETS.TRAIN")
    assert len(os.listdir(tmp_path / "cache" / "checks")) == 1
    good = unique_name()
    register_coco_dataset(good, os.path.join(small_shapes, "val.json"), image_dir)
    check_segmentations(good, "DATASETS.TRAIN")
    check_segmentations("shapes_val", "DATASETS.TEST")  # registered without a check: nothing recorded


@pytest.mark.slow  # a fresh interpreter importing detectron2
def test_shapes_are_registered_lazily_at_import(d2, tmp_path):
    # A fresh interpreter: importing gn_det.data registers both splits and generates nothing.
    code = (
        "import os, sys, gn_det.data; from detectron2.data import DatasetCatalog, MetadataCatalog; "
        "assert {'shapes_train', 'shapes_val'} <= set(DatasetCatalog.list()); "
        f"assert MetadataCatalog.get('shapes_val').json_file == os.path.join(sys.argv[1], "
        f"'shapes_v{shapes.SHAPES_VERSION}', 'val.json'); "
        "assert os.listdir(sys.argv[1]) == []"
    )
    env = dict(os.environ, GN_DET_CACHE=str(tmp_path))
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, check=True, timeout=300)


def test_shapes_are_generated_on_first_get(catalogs, monkeypatch, tmp_path):
    from gn_det.data import register_shapes

    DatasetCatalog, MetadataCatalog = catalogs
    for name in ("shapes_train", "shapes_val"):  # swap the import-time registration for one in tmp_path
        monkeypatch.delitem(DatasetCatalog.data, name)
        monkeypatch.delitem(MetadataCatalog.data, name)
    original = shapes.generate_shapes
    monkeypatch.setattr(shapes, "generate_shapes", lambda root: original(root, **SMALL))
    root = str(tmp_path / "shapes")
    register_shapes(root)
    register_shapes(root)  # again, as a re-import would: no-op
    assert not os.path.exists(root)
    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == 4 and shapes.is_complete(root)
    assert MetadataCatalog.get("shapes_val").json_file == os.path.join(root, "val.json")
    assert len(DatasetCatalog.get("shapes_train")) == 8


@pytest.mark.skipif(not os.path.isfile(os.path.join(FRUITS_NUTS, "trainval.json")),
                    reason="fruits_nuts data (../shared/data/fruits_nuts) not present")
def test_real_coco_dataset_is_accepted(catalogs):
    from gn_det.data import register_coco_dataset

    DatasetCatalog, MetadataCatalog = catalogs
    name = unique_name()
    register_coco_dataset(name, os.path.join(FRUITS_NUTS, "trainval.json"), os.path.join(FRUITS_NUTS, "images"))
    assert MetadataCatalog.get(name).thing_classes == ["date", "fig", "hazelnut"]
    assert len(DatasetCatalog.get(name)) == 18


def test_an_image_of_another_size_than_its_json_entry_is_bad_input_or_skipped(tmp_path):
    """Like an undecodable image: one line naming the image and dataset, or skipped under the config key."""
    pytest.importorskip("detectron2")
    from PIL import Image

    from gn_det.config import get_gn_cfg
    from gn_det.data import CheckedDatasetMapper, generate_shapes
    from gn_det.errors import InputError
    from detectron2.data.datasets import load_coco_json

    generate_shapes(str(tmp_path), num_train=2, num_val=1, image_size=64)
    records = load_coco_json(str(tmp_path / "train.json"), str(tmp_path / "train"), "resized")
    Image.open(records[0]["file_name"]).resize((80, 64)).save(records[0]["file_name"])
    cfg = get_gn_cfg(None, ["INPUT.MASK_FORMAT", "bitmask"])
    mapper = CheckedDatasetMapper(cfg, is_train=True, dataset_names=["resized"])
    with pytest.raises(InputError, match=rf"^image {records[0]['file_name']} of dataset 'resized' is 80x64 px, but "
                                         r"the dataset says 64x64; replace the file"):
        mapper(dict(records[0]))
    skipping = CheckedDatasetMapper(cfg, is_train=True, dataset_names=["resized"], skip_undecodable=True)
    assert skipping(dict(records[0])) is None and skipping.skipped == 1
    assert skipping(dict(records[1])) is not None and skipping.skipped == 1
