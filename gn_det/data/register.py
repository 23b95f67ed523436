"""Register COCO-format datasets with detectron2, checked at registration.

detectron2 loads a registered dataset lazily, when training or evaluation first asks for it, so a wrong path
or a broken annotation file would otherwise surface only after the model is built and the output folder
written. :func:`register_coco_dataset` reads the JSON and checks every referenced file up front and fails
with one line naming the offender. ``DATASETS.REGISTER`` and train_net's ``--dataset`` flag both go through
:func:`register_datasets`.
"""
import functools
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from gn_det.errors import InputError
from gn_det.fileio import read_json

from .shapes import SHAPES_CLASSES, SHAPES_SPLITS, ensure_shapes, shapes_root

logger = logging.getLogger(__name__)

DATASET_SPEC_SYNTAX = "NAME=JSON_FILE,IMAGE_DIR"


def parse_dataset_spec(spec):
    """``"NAME=JSON_FILE,IMAGE_DIR"`` -> ``(name, json_file, image_dir)``."""
    name, equals, paths = spec.partition("=")
    json_file, comma, image_dir = paths.partition(",")
    name, json_file, image_dir = name.strip(), json_file.strip(), image_dir.strip()
    if not (equals and comma and name and json_file and image_dir) or "," in image_dir:
        raise InputError(f"dataset spec {spec!r} is not {DATASET_SPEC_SYNTAX}")
    return name, json_file, image_dir


def register_datasets(specs):
    """Register every ``"NAME=JSON_FILE,IMAGE_DIR"`` of ``specs`` (one spec string or a list); returns the names."""
    if isinstance(specs, str):
        specs = [specs]
    names = []
    for spec in specs:
        name, json_file, image_dir = parse_dataset_spec(spec)
        register_coco_dataset(name, json_file, image_dir)
        names.append(name)
    return names


def register_coco_dataset(name, json_file, image_dir):
    """detectron2's ``register_coco_instances``, after :func:`check_coco_dataset`.

    Registering a name again with the same paths does nothing (so modules that register at import can be
    imported again, e.g. by detectron2's launch in worker processes); with different paths it is an error.
    """
    json_file, image_dir = os.path.abspath(json_file), os.path.abspath(image_dir)
    if already_registered(name, json_file, image_dir):
        return
    thing_classes = check_coco_dataset(json_file, image_dir, name)
    register_coco_instances(name, {"thing_classes": thing_classes}, json_file, image_dir)
    logger.info("Registered dataset %r: %s, images in %s", name, json_file, image_dir)


def already_registered(name, json_file, image_dir):
    """True if ``name`` is registered with these paths; raises InputError if it is registered otherwise."""
    if name not in DatasetCatalog.list():
        return False
    metadata = MetadataCatalog.get(name)
    registered = (metadata.get("json_file"), metadata.get("image_root"))
    if registered != (json_file, image_dir):
        raise InputError(
            f"dataset {name!r} is already registered (json_file={registered[0]}, image_root={registered[1]}); "
            f"cannot register it again with json_file={json_file}, image_root={image_dir}"
        )
    return True


def check_coco_dataset(json_file, image_dir, name="dataset"):
    """Check a COCO instances file and its images; return the class names in category-id order.

    Raises InputError for a missing JSON, image folder or image file, malformed JSON, not a
    COCO instances file, no images or annotations, an annotation pointing at an unknown image or category,
    a repeated id), in one line naming the dataset, the file and the offending entry.
    """
    where = f"dataset {name!r}"
    if not os.path.isfile(json_file):
        raise InputError(f"{where}: annotation file {json_file} does not exist")
    if not os.path.isdir(image_dir):
        raise InputError(f"{where}: image folder {image_dir} does not exist")
    coco = read_json(json_file, f"{where}: annotation file")
    where = f"{where}: {json_file}"
    if not isinstance(coco, dict):
        raise InputError(f"{where} is not a COCO instances file: the top level is not an object")
    keys = ("images", "annotations", "categories")
    for key in keys:
        if not isinstance(coco.get(key), list):
            raise InputError(f"{where} is not a COCO instances file: no {key!r} list")
    for key in keys:
        if not coco[key]:
            raise InputError(f"{where} has no {key}: the dataset is empty")

    categories = {entry_field(c, "id", where, "category"): c for c in coco["categories"]}
    for category_id, category in categories.items():
        entry_field(category, "name", where, f"category {category_id}")
    file_names = {}
    for image in coco["images"]:
        image_id = entry_field(image, "id", where, "image")
        if image_id in file_names:
            raise InputError(f"{where}: image id {image_id} appears more than once")
        file_names[image_id] = entry_field(image, "file_name", where, f"image {image_id}")
    annotation_ids = set()
    for annotation in coco["annotations"]:
        annotation_id = entry_field(annotation, "id", where, "annotation")
        if annotation_id in annotation_ids:  # load_coco_json would assert this only when training starts
            raise InputError(f"{where}: annotation id {annotation_id} appears more than once")
        annotation_ids.add(annotation_id)
        image_id = entry_field(annotation, "image_id", where, f"annotation {annotation_id}")
        if image_id not in file_names:
            raise InputError(
                f"{where}: annotation {annotation_id} refers to image id {image_id}, which is not in 'images'"
            )
        category_id = entry_field(annotation, "category_id", where, f"annotation {annotation_id}")
        if category_id not in categories:
            raise InputError(
                f"{where}: annotation {annotation_id} has category_id {category_id}, which is not in 'categories' "
                f"(ids {', '.join(map(str, sorted(categories)))})"
            )
    # detectron2 reads every listed image, annotated or not (unannotated ones are test images or negatives).
    for image_id, file_name in file_names.items():
        if not os.path.isfile(os.path.join(image_dir, file_name)):
            raise InputError(f"{where}: image {image_id} file {file_name!r} is not in {image_dir}")
    # The order load_coco_json gives thing_classes (by category id), so the two agree.
    return [categories[i]["name"] for i in sorted(categories)]


def entry_field(entry, key, where, what):
    """``entry[key]``, or an InputError naming the entry that lacks it."""
    if not isinstance(entry, dict) or key not in entry:
        raise InputError(f"{where}: {what} {json.dumps(entry)[:80]} has no {key!r}")
    return entry[key]


def register_shapes(root=None):
    """Register ``shapes_train`` and ``shapes_val``: the synthetic dataset of :mod:`gn_det.data.shapes`.

    Nothing is generated here: the dataset is generated into ``root`` (default ``shapes_root()``) the first
    time detectron2 asks for either split. Metadata names the files the generation will write, for
    COCOEvaluator. Registering again with the same root does nothing.
    """
    root = os.path.abspath(root or shapes_root())
    for split in SHAPES_SPLITS:
        name = f"shapes_{split}"
        json_file, image_dir = os.path.join(root, f"{split}.json"), os.path.join(root, split)
        if already_registered(name, json_file, image_dir):
            continue
        DatasetCatalog.register(name, functools.partial(load_shapes, root, split, name))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES), json_file=json_file, image_root=image_dir, evaluator_type="coco"
        )


def load_shapes(root, split, name):
    """The dataset dicts of one split, generating the dataset first if it is not there yet."""
    ensure_shapes(root)
    return load_coco_json(os.path.join(root, f"{split}.json"), os.path.join(root, split), name)
