"""Run a trained model on one's own images: drawn predictions (one PNG per image) and COCO results JSON.

:func:`load_predictor` is the one place where a config file, weights and overrides become a model ready
for inference; YAML configs go through :func:`gn_det.get_gn_cfg` (gn-det's meta-architectures carry the
``MODEL.PRECISION`` / ``MODEL.CHANNELS_LAST`` switches, so building the model from the config applies them),
Python configs through detectron2's ``LazyConfig``.
"""
import glob
import logging
import os
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, ImageMode
from tqdm import tqdm

import detectron2.data.transforms as T
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer

from gn_det.checkpoint.reader import GNCheckpointer
from gn_det.config import adapt_to_this_machine, get_gn_cfg, load_lazy_config
from gn_det.data import register_datasets  # importing gn_det.data registers shapes_train / shapes_val
from gn_det.errors import InputError
from gn_det.fileio import atomic_write, read_json, write_json_atomically

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
RESULTS_FILE = "predictions.json"
UNLABELLED = "__unlabelled__"  # the metadata of a config that names no dataset

logger = logging.getLogger(__name__)


def adapt_with_warnings(cfg, device=None, keep_precision=False):
    """:func:`gn_det.config.adapt_to_this_machine` (no CUDA: CPU; bf16 on a device without bf16 kernels:
    fp32), each adjustment a warning."""
    for adjustment in adapt_to_this_machine(cfg, device, keep_precision):
        logger.warning(adjustment)


class Predictor:
    """A model in eval mode with its config's test-time augmentation (the resize); call it on an RGB HxWx3 array.

    The call follows detectron2's ``DefaultPredictor.__call__``, which needs a YAML config; this class is
    built from the model and its settings so that LazyConfig models run the same way.
    """

    def __init__(self, model, augmentation, metadata):
        self.model = model.eval()
        self.augmentation = augmentation
        self.metadata = metadata
        self.input_format = model.input_format
        # an exported model (gn_det.deploy.ExportedDetector) has no parameters: it names its device
        self.device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else model.device

    def model_input(self, rgb_image):
        """The model's input dict for one RGB HxWx3 image: the resized CHW float tensor in the model's input
        format, and the image's own height and width."""
        image = rgb_image[:, :, ::-1] if self.input_format == "BGR" else rgb_image
        height, width = image.shape[:2]
        resized = T.AugInput(image)
        self.augmentation(resized)  # transforms resized.image in place
        image = resized.image
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)).astype("float32"), device=self.device)
        return {"image": tensor, "height": height, "width": width}

    def __call__(self, rgb_image):
        """The model's output for one image (a dict with ``"instances"``, in the image's coordinates)."""
        with torch.no_grad():
            return self.model([self.model_input(rgb_image)])[0]


def check_model_files(config_file, weights):
    """The config file and a local weights file must exist (URLs and ``detectron2://`` paths are left to the
    checkpointer)."""
    if not os.path.isfile(config_file):
        raise InputError(f"--config-file: {config_file} is not a file")
    if "://" not in weights and not os.path.isfile(urlparse(weights)._replace(query="").geturl()):
        raise InputError(f"--weights: {weights} is not a file")


def yaml_config(config_file, weights, opts=(), device=None, keep_precision=False):
    """The checked, frozen gn-det config of a YAML file with ``weights`` and ``KEY VALUE`` overrides, its
    precision the one that runs here unless ``keep_precision``."""
    check_model_files(config_file, weights)
    cfg = get_gn_cfg(config_file, list(opts) + ["MODEL.WEIGHTS", weights])
    adapt_with_warnings(cfg, device, keep_precision)
    cfg.freeze()
    return cfg


def model_from_config(cfg):
    """The model of a YAML config, with ``MODEL.WEIGHTS`` loaded, in eval mode."""
    model = build_model(cfg)
    GNCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def dataset_metadata(names):
    """The metadata of the first dataset of ``names`` (with its class names when it is registered)."""
    return MetadataCatalog.get(names[0] if names else UNLABELLED)


BACKENDS = ("torch", "torchscript", "onnxruntime", "openvino")


def load_predictor(config_file, weights, opts=(), device=None, backend="torch", keep_precision=False):
    """config file + weights + overrides -> :class:`Predictor` (model, test-time resize, class metadata).

    ``opts`` are ``KEY VALUE`` pairs for a YAML config and ``key=value`` strings for a Python (LazyConfig)
    one; ``device`` overrides the config's device (CUDA falls back to CPU where there is none). With another
    ``backend`` than "torch", ``weights`` is a file exported by ``tools/export_model.py`` and runs in that
    backend on the CPU (``gn_det.deploy``); the config gives the resize and the class names. The model computes
    in the config's precision, except bf16 on a device without bf16 kernels, which runs in fp32 with a
    warning, unless ``keep_precision`` (an export, built for the machine that serves it).
    """
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if config_file.endswith(".py"):
        return _lazy_predictor(config_file, weights, opts, device, backend, keep_precision)
    cfg = yaml_config(config_file, weights, opts, "cpu" if backend != "torch" else device, keep_precision)
    register_datasets(cfg.DATASETS.REGISTER)  # the class names of the config's own datasets
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    model = model_from_config(cfg) if backend == "torch" else exported_model(weights, backend)
    return Predictor(model, resize, dataset_metadata(cfg.DATASETS.TEST or cfg.DATASETS.TRAIN))


def exported_model(path, backend):
    """The exported file ``path`` run by ``backend`` (gn_det.deploy: TorchScript, ONNX Runtime, OpenVINO)."""
    from gn_det.deploy.runtimes import load_exported

    return load_exported(path, backend)


def _lazy_predictor(config_file, weights, opts, device, backend="torch", keep_precision=False):
    """A LazyConfig's ``model``, device ``train.device``, resize and dataset of ``dataloader.test``, as
    detectron2's ``tools/lazyconfig_train_net.py`` reads them."""
    check_model_files(config_file, weights)
    cfg = load_lazy_config(config_file, opts)
    if backend != "torch":
        model = exported_model(weights, backend)
    elif "model" not in cfg:
        raise InputError(f"{config_file}: a Python config needs a 'model' to predict with")
    else:
        adapt_with_warnings(cfg, device, keep_precision)
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        GNCheckpointer(model, strict=True).load(weights)
    test_loader = cfg.get("dataloader", {}).get("test", {})
    augmentations = test_loader.get("mapper", {}).get("augmentations")
    # detectron2's default test resize (LazyConfig common/data/coco.py) when the config names none
    resize = T.AugmentationList(instantiate(augmentations)) if augmentations else T.ResizeShortestEdge(800, 1333)
    names = test_loader.get("dataset", {}).get("names")
    return Predictor(model, resize, dataset_metadata([names] if isinstance(names, str) else list(names or [])))


def expand_inputs(inputs):
    """Image paths of ``inputs`` (files, folders, globs) in order, each checked readable; duplicates once."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            where = f"folder {item} holds no image ({', '.join(IMAGE_EXTENSIONS)})"
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
            where = f"{item} matches no file"
        else:
            found = [item] if os.path.isfile(item) else []
            where = f"{item} is not a file or folder"
        if not found:
            raise InputError(f"input: {where}")
        paths += [p for p in found if p not in paths]
    for path in paths:
        check_image(path)
    return paths


def check_image(path):
    """Raise :class:`InputError` unless PIL decodes all of ``path`` as an image of 8 bits per channel.

    The whole image is decoded: a truncated file opens and fails only when its pixels are read. An image of more
    bits per channel (PIL mode I;16, I or F: a 16-bit PNG or TIFF, a float TIFF) is refused, not scaled:
    detectron2's ``read_image`` clips its values at 255 (a 16-bit photo turns white), and which of its values
    are black and white (a 12-bit sensor's range, a float image's) only its maker knows; convert it to 8 bits.
    """
    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for a missing, unknown or cut file
        raise InputError(f"{path}: not a readable image ({' '.join(str(err).split())})") from None
    if ImageMode.getmode(image.mode).typestr[1:] not in ("u1", "b1"):  # 8-bit channels, or 1-bit
        raise InputError(f"{path}: image mode {image.mode} has more than 8 bits per channel, and the model reads "
                         "8-bit images; convert it to 8 bits (values 0-255) first")


def output_names(paths):
    """PNG file name of each image (its stem); two images with the same stem are an error."""
    names = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0] + ".png"
        if name in names:
            raise InputError(f"input: {names[name]} and {path} would both be drawn to {name}; predict them apart")
        names[name] = path
    return list(names)


def coco_ids(paths, coco_json, metadata):
    """Image id of each image and the dataset category id of each class index.

    With ``coco_json`` (a COCO instances file listing the images), image ids are its ids, matched by file
    name; without, images are numbered 1, 2, ... Category ids are those of ``coco_json``, else those of the
    metadata's dataset (its id map, else its COCO file), mapped in the order detectron2's ``load_coco_json``
    uses; a dataset that gives neither is an InputError.
    """
    if coco_json and not os.path.isfile(coco_json):
        raise InputError(f"--coco-json {coco_json} is not a file")
    if metadata.get("thing_dataset_id_to_contiguous_id") and not coco_json:
        return list(range(1, len(paths) + 1)), {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    annotations = coco_json or metadata.get("json_file")
    if not (annotations and os.path.isfile(annotations)):
        # Refused rather than guessed (the class index, or index + 1): ids are the dataset's own (COCO's run
        # 1-90 with gaps), and COCOeval scores a result under a wrong id against another class, silently.
        what = "the config names no dataset" if metadata.name == UNLABELLED else \
            f"dataset {metadata.name!r} has no category id map or COCO file"
        raise InputError(f"{RESULTS_FILE} needs the dataset's category ids, but {what}: name the model's "
                         "registered dataset in the config, or give --coco-json FILE")
    coco = read_json(annotations, "--coco-json" if coco_json else "COCO file")
    try:
        to_dataset_id = dict(enumerate(sorted(c["id"] for c in coco["categories"])))
        file_names = {os.path.basename(image["file_name"]): image["id"] for image in coco["images"]}
    except (KeyError, TypeError) as err:
        raise InputError(f"{annotations}: not a COCO instances file ({type(err).__name__}: {err})") from None
    if not coco_json:
        return list(range(1, len(paths) + 1)), to_dataset_id
    missing = [p for p in paths if os.path.basename(p) not in file_names]
    if missing:
        raise InputError(f"--coco-json: {coco_json} lists no image named {os.path.basename(missing[0])}")
    return [file_names[os.path.basename(p)] for p in paths], to_dataset_id


def coco_results(instances, image_id, file_name, to_dataset_id, class_names):
    """COCO results of one image's instances (detectron2's ``instances_to_coco_json``) with dataset category
    ids, category names and ``file_name``, the image's path as given."""
    results = instances_to_coco_json(instances, image_id)
    for result in results:
        contiguous_id = result["category_id"]
        result["category_id"] = to_dataset_id.get(contiguous_id, contiguous_id)
        result["category_name"] = class_names[contiguous_id] if contiguous_id < len(class_names) else str(contiguous_id)
        result["file_name"] = file_name
    return results


def predict_images(predictor, paths, out_dir, score_threshold=0.5, scale=1.0, coco_json=None):
    """Predict every image of ``paths`` (from :func:`expand_inputs`); write ``out_dir/<stem>.png`` (predictions
    scoring at least ``score_threshold`` drawn with detectron2's ``Visualizer``) and ``out_dir/predictions.json``
    (COCO results of every prediction the model returns). All inputs are checked before ``out_dir`` is created.
    Returns the path of the JSON file."""
    names = output_names(paths)
    image_ids, to_dataset_id = coco_ids(paths, coco_json, predictor.metadata)
    class_names = predictor.metadata.get("thing_classes", [])
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for path, name, image_id in tqdm(list(zip(paths, names, image_ids)), desc="predict", unit="image"):
        rgb = read_image(path, format="RGB")
        instances = predictor(rgb)["instances"].to("cpu")
        drawn = Visualizer(rgb, predictor.metadata, scale=scale)
        picture = drawn.draw_instance_predictions(instances[instances.scores >= score_threshold]).get_image()
        with atomic_write(os.path.join(out_dir, name), "wb") as f:
            Image.fromarray(picture).save(f, format="PNG")
        results += coco_results(instances, image_id, path, to_dataset_id, class_names)
    json_path = os.path.join(out_dir, RESULTS_FILE)
    write_json_atomically(json_path, results)
    return json_path
