"""Register COCO-format datasets with detectron2, checked at registration.

detectron2 loads a registered dataset lazily, when training or evaluation first asks for it, so a wrong path
or a broken annotation file would otherwise surface only after the model is built and the output folder
written. :func:`register_coco_dataset` reads the JSON and checks every referenced file up front and fails
with one line naming the offender. ``DATASETS.REGISTER`` and train_net's ``--dataset`` flag both go through
:func:`register_datasets`.

At COCO scale the check costs about what detectron2's own parse of the JSON costs, so it is done once
(:func:`check_coco_dataset_once`): by process 0 of a distributed run for all of them, and not again while the
JSON and the image folders are unchanged (the verdict is cached in gn-det's cache folder).
"""
import contextlib
import functools
import gc
import itertools
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from gn_det.errors import InputError
from gn_det.fileio import read_json

from . import verdict
from .shapes import SHAPES_CLASSES, SHAPES_SPLITS, ensure_shapes, shapes_root

logger = logging.getLogger(__name__)

DATASET_SPEC_SYNTAX = "NAME=JSON_FILE,IMAGE_DIR"
# Part of a cached verdict's key: bump whenever the check checks more, so that a dataset passed by an older check
# is checked again rather than let through by its old verdict.
COCO_CHECK_VERSION = 2
# The metadata key of a registered dataset's first non-crowd annotation without a segmentation (its id; None: none)
WITHOUT_SEGMENTATION = "annotation_without_segmentation"
NUMBER_TYPES = {int, float}  # what json makes of a number, by type() (true and false are bool)
ID_TYPES = NUMBER_TYPES | {str}
# A verdict is cached only when the dataset's images lie in at most this many folders (each is stat-ed at start)
MAX_FINGERPRINTED_FOLDERS = 1000


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
    result = checked_coco_dataset(json_file, image_dir, name)
    metadata = {"thing_classes": result["thing_classes"], WITHOUT_SEGMENTATION: result["without_segmentation"]}
    register_coco_instances(name, metadata, json_file, image_dir)
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


def check_coco_dataset_once(json_file, image_dir, name="dataset"):
    """:func:`check_coco_dataset`, once per version of the files for every process and every start.

    A passed check is cached (:mod:`gn_det.data.verdict`) under the JSON's absolute path, device, inode, size,
    mtime and ctime (ns), the image folder and the check's version (:data:`COCO_CHECK_VERSION`); the cached
    verdict holds for as long as every folder that holds the dataset's images has the device, inode, mtime and
    ctime it had when checked (adding, removing or renaming a file changes its folder's mtime and ctime). A
    check that relied on anything else (an image that is a symlink, or found other than by listing its folder)
    is not cached. In a distributed run process 0 checks, or reads the verdict, for all processes. A failed
    check is never cached: it fails with the same InputError every time.
    """
    return checked_coco_dataset(json_file, image_dir, name)["thing_classes"]


def checked_coco_dataset(json_file, image_dir, name="dataset"):
    """:func:`check_coco_dataset_once`'s whole verdict (:func:`check_coco_dataset_verdict`'s result)."""
    json_file, image_dir = os.path.abspath(json_file), os.path.abspath(image_dir)

    def check_or_reuse():
        check_paths(json_file, image_dir, name)
        try:
            key = {"json_file": json_file, "json": fingerprint(json_file), "image_dir": image_dir,
                   "check": COCO_CHECK_VERSION}
        except OSError:  # the file went away since check_paths: the check says so
            return check_coco_dataset_verdict(json_file, image_dir, name)[0]
        return verdict.cached(key, lambda: check_coco_dataset_verdict(json_file, image_dir, name),
                              still_valid=folders_unchanged)

    return verdict.shared(check_or_reuse, f"the check of dataset {name!r}")


def fingerprint(path):
    """What changes when the file or folder at ``path`` is replaced or its content (a folder's: its entries)
    changes: device, inode, size, mtime and ctime in ns (a copy that keeps the mtime still gets a new ctime)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def folders_unchanged(result):
    """Whether the image folders of a cached verdict are as they were when it was checked."""
    try:
        return all(fingerprint(folder) == list(then) for folder, then in result["image_folders"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


def check_paths(json_file, image_dir, name):
    """The annotation file and the image folder exist."""
    where = f"dataset {name!r}"
    if not os.path.isfile(json_file):
        raise InputError(f"{where}: annotation file {json_file} does not exist")
    if not os.path.isdir(image_dir):
        raise InputError(f"{where}: image folder {image_dir} does not exist")


def check_coco_dataset(json_file, image_dir, name="dataset"):
    """Check a COCO instances file and its images; return the class names in category-id order.

    Raises InputError for a missing JSON, image folder or image file, malformed JSON, not a COCO instances
    file, no images or annotations, an image without an id, file_name (a string), height or width, an annotation
    without a bbox (a list of 4 numbers) or pointing at an unknown image or category, an id that is not a
    number or string, a repeated id, or category or image ids mixing numbers and strings, in one line naming the
    dataset, the file and the offending entry. An annotation without a segmentation passes (a box-only model
    needs none): the verdict records the first non-crowd one, and :func:`check_segmentations` refuses the dataset
    to a model that predicts masks.
    """
    return check_coco_dataset_verdict(json_file, image_dir, name)[0]["thing_classes"]


def check_coco_dataset_verdict(json_file, image_dir, name="dataset"):
    """:func:`check_coco_dataset` as ``({"thing_classes": [...], "without_segmentation": id or None,
    "image_folders": [[folder, fingerprint], ...]}, cacheable)``: the id of the first non-crowd annotation without
    a segmentation, the folders that hold the images, fingerprinted before they were listed, and whether the
    verdict rests on those folders' listings alone."""
    with gc_paused():  # the parsed JSON is freed when the check returns, before the collector runs again
        return check_parsed_coco(json_file, image_dir, name)


def check_parsed_coco(json_file, image_dir, name):
    check_paths(json_file, image_dir, name)
    coco = read_json(json_file, f"dataset {name!r}: annotation file")
    where = f"dataset {name!r}: {json_file}"
    if not isinstance(coco, dict):
        raise InputError(f"{where} is not a COCO instances file: the top level is not an object")
    keys = ("images", "annotations", "categories")
    for key in keys:
        if not isinstance(coco.get(key), list):
            raise InputError(f"{where} is not a COCO instances file: no {key!r} list")
    for key in keys:
        if not coco[key]:
            raise InputError(f"{where} has no {key}: the dataset is empty")

    class_names = {}
    for category in coco["categories"]:
        category_id = entry_id(category, "id", where, "category")
        if category_id in class_names:  # load_coco_json would keep the last one's name, silently
            raise InputError(f"{where}: category id {category_id!r} appears more than once")
        class_names[category_id] = entry_field(category, "name", where, f"category {category_id!r}")
    category_ids = sorted_ids(class_names, where, "category")
    file_names = {}
    for image in coco["images"]:
        image_id = entry_id(image, "id", where, "image")
        if image_id in file_names:
            raise InputError(f"{where}: image id {image_id!r} appears more than once")
        file_name = entry_field(image, "file_name", where, f"image {image_id!r}")
        if not isinstance(file_name, str):
            raise InputError(f"{where}: image {image_id!r} has file_name {file_name!r}, not a string")
        for key in ("height", "width"):  # detectron2's dataset dicts carry them, and its mapper checks the image
            entry_field(image, key, where, f"image {image_id!r}")
        file_names[image_id] = file_name
    sorted_ids(file_names, where, "image")  # load_coco_json sorts them
    if annotations_are_sound(coco["annotations"], file_names, class_names):
        annotations = ()  # nothing for the loop below to find
    else:
        annotations = coco["annotations"]
    annotation_ids = set()
    for annotation in annotations:  # the first offender, named
        annotation_id = entry_id(annotation, "id", where, "annotation")
        if annotation_id in annotation_ids:  # load_coco_json would assert this only when training starts
            raise InputError(f"{where}: annotation id {annotation_id!r} appears more than once")
        annotation_ids.add(annotation_id)
        what = f"annotation {annotation_id!r}"
        image_id = entry_id(annotation, "image_id", where, what)
        if image_id not in file_names:
            raise InputError(f"{where}: {what} refers to image id {image_id!r}, which is not in 'images'")
        category_id = entry_id(annotation, "category_id", where, what)
        if category_id not in class_names:
            raise InputError(f"{where}: {what} has category_id {category_id!r}, which is not in 'categories' "
                             f"(ids {', '.join(map(repr, category_ids))})")
        bbox = entry_field(annotation, "bbox", where, what)
        if not is_box(bbox):
            raise InputError(f"{where}: {what} has bbox {json.dumps(bbox)[:80]}, not a list of 4 numbers "
                             "[x, y, width, height]")
    # Not an error here: a box-only model needs no masks (detectron2 drops crowd annotations from training)
    without_segmentation = next((a["id"] for a in coco["annotations"]
                                 if not a.get("segmentation") and not a.get("iscrowd", 0)), None)
    # detectron2 reads every listed image, annotated or not (unannotated ones are test images or negatives).
    folders, cacheable = {}, True
    for image_id, file_name in file_names.items():
        path = os.path.join(image_dir, file_name)
        folder, base = os.path.split(path)
        if folder not in folders:
            folders[folder] = list_folder(folder)
        entry = folders[folder][1].get(base) if folders[folder] else None
        if entry is None:  # not found by the listing: os.path.isfile decides, and the verdict is not cached
            present, cacheable = os.path.isfile(path), False
        else:  # DirEntry.is_file() is os.path.isfile (it follows a symlink; the target is not fingerprinted)
            present, cacheable = entry.is_file(), cacheable and not entry.is_symlink()
        if not present:
            raise InputError(f"{where}: image {image_id!r} file {file_name!r} is not in {image_dir}")
    image_folders = [[folder, listed[0]] for folder, listed in folders.items() if listed]
    cacheable = cacheable and len(image_folders) <= MAX_FINGERPRINTED_FOLDERS
    # The order load_coco_json gives thing_classes (by category id), so the two agree.
    return {"thing_classes": [class_names[i] for i in category_ids], "without_segmentation": without_segmentation,
            "image_folders": image_folders}, cacheable


def annotations_are_sound(annotations, file_names, class_names):
    """Whether every annotation is an object with an id (a number or string), an image_id in ``file_names``, a
    category_id in ``class_names`` and a bbox of 4 numbers, the ids unique: the loop of
    :func:`check_parsed_coco` at a fraction of its cost, as a few passes over all annotations; when it says no
    (or meets an entry it cannot read), the loop finds and names the first offender."""
    try:
        ids = [annotation["id"] for annotation in annotations]
        image_ids = {annotation["image_id"] for annotation in annotations}
        category_ids = {annotation["category_id"] for annotation in annotations}
        boxes = [annotation["bbox"] for annotation in annotations]
        return (len(set(ids)) == len(ids) and set(map(type, ids)) <= ID_TYPES
                and image_ids <= file_names.keys() and category_ids <= class_names.keys()
                and set(map(type, boxes)) == {list} and set(map(len, boxes)) == {4}
                and set(map(type, itertools.chain.from_iterable(boxes))) <= NUMBER_TYPES)
    except (KeyError, TypeError):  # an entry that is not an object or lacks a field, an unhashable id
        return False


def is_box(value):
    """Whether ``value`` is a COCO bbox: a list of 4 numbers."""
    return type(value) is list and len(value) == 4 and {type(v) for v in value} <= NUMBER_TYPES


def check_segmentations(name, where):
    """Raise InputError when dataset ``name`` has a non-crowd annotation without a segmentation, which a model that
    predicts masks trains on (and is evaluated against); ``where``: the config key naming the dataset. A dataset
    registered here records its first such annotation (:data:`WITHOUT_SEGMENTATION`); others record none."""
    metadata = MetadataCatalog.get(name)
    annotation_id = metadata.get(WITHOUT_SEGMENTATION)
    if annotation_id is not None:
        raise InputError(f"{where} dataset {name!r}: {metadata.json_file}: annotation {annotation_id!r} has no "
                         "segmentation, which a model predicting masks needs; give it one, or train a box-only model")


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off (as it was before, afterwards): parsing COCO's JSON creates millions
    of dicts and lists, none in a cycle, and collections triggered by their allocation double the parse time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def list_folder(folder):
    """``(fingerprint, {name: os.DirEntry})`` of ``folder``, fingerprinted before it is listed; None when it cannot
    be listed and searched (its images are then looked up one by one)."""
    try:
        if not os.access(folder, os.X_OK):
            return None
        before = fingerprint(folder)
        with os.scandir(folder) as entries:
            return before, {entry.name: entry for entry in entries}
    except OSError:
        return None


def entry_field(entry, key, where, what):
    """``entry[key]``, or an InputError naming the entry that lacks it."""
    if not isinstance(entry, dict) or key not in entry:
        raise InputError(f"{where}: {what} {json.dumps(entry)[:80]} has no {key!r}")
    return entry[key]


def entry_id(entry, key, where, what):
    """``entry[key]`` (:func:`entry_field`), which must be an id: a number or a string."""
    value = entry_field(entry, key, where, what)
    if type(value) not in ID_TYPES:
        raise InputError(f"{where}: {what} {json.dumps(entry)[:80]} has {key!r} {json.dumps(value)[:40]}, "
                         "not a number or string")
    return value


def sorted_ids(ids, where, kind):
    """``ids`` in order, as detectron2's load_coco_json sorts them; an InputError when they mix numbers and
    strings (which do not sort)."""
    try:
        return sorted(ids)
    except TypeError:
        number, text = (next(i for i in ids if isinstance(i, str) == is_text) for is_text in (False, True))
        raise InputError(f"{where}: the {kind} ids mix numbers and strings (such as {number!r} and {text!r})") \
            from None


def register_shapes(root=None):
    """Register ``shapes_train`` and ``shapes_val``: the synthetic dataset of :mod:`gn_det.data.shapes`.

    Nothing is generated here: the dataset is generated into ``root`` (default ``shapes_root()``) the first
    time detectron2 asks for either split. Metadata names the files the generation will write, for
    COCOEvaluator, and the category ids. Registering again with the same root does nothing.
    """
    root = os.path.abspath(root or shapes_root())
    for split in SHAPES_SPLITS:
        name = f"shapes_{split}"
        json_file, image_dir = os.path.join(root, f"{split}.json"), os.path.join(root, split)
        if already_registered(name, json_file, image_dir):
            continue
        DatasetCatalog.register(name, functools.partial(load_shapes, root, split, name))
        # The category ids (generate_shapes numbers the classes from 1) are known before the dataset is
        # generated, and load_coco_json sets the same map: predictions name the dataset's ids either way.
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES), json_file=json_file, image_root=image_dir, evaluator_type="coco",
            thing_dataset_id_to_contiguous_id={index + 1: index for index in range(len(SHAPES_CLASSES))},
        )


def load_shapes(root, split, name):
    """The dataset dicts of one split, generating the dataset first if it is not there yet."""
    ensure_shapes(root)
    return load_coco_json(os.path.join(root, f"{split}.json"), os.path.join(root, split), name)
