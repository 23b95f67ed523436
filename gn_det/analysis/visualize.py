"""Predictions drawn on images: the ground truth beside each run's predictions, one PNG per image.

Each run's predictions are the ones ``COCOEvaluator`` saved in ``RUN_DIR/inference/<dataset>/
instances_predictions.pth`` during training, so nothing is re-run; a run without them can be evaluated
first from a config and weights (:func:`evaluate_run`). Panels are drawn with detectron2's ``Visualizer``
and the dataset's ``MetadataCatalog`` entry, titled with the run's label and its box / mask AP.
"""
import collections
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode, Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from gn_det.checkpoint.reader import read_weights
from gn_det.errors import InputError
from gn_det.fileio import atomic_write

from .runs import Run, distinct_tails, run_labels

PREDICTIONS_FILE = "instances_predictions.pth"
MATCH_IOU = 0.5  # a ground-truth mask counts as found by a same-class prediction with this mask IoU
TITLE_LINE = 15  # pixels per line of the two-line title above each panel
SELECTIONS = ("differ", "even")


def predictions_path(run_dir, dataset):
    return os.path.join(run_dir, "inference", dataset, PREDICTIONS_FILE)


def run_dataset(run_dir):
    """The first ``DATASETS.TEST`` of the run's ``config.yaml`` (its ``DATASETS.REGISTER`` registered), or
    None without one."""
    from gn_det.config import get_gn_cfg
    from gn_det.data import register_datasets

    config = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config):
        return None
    cfg = get_gn_cfg(config)
    register_datasets(cfg.DATASETS.REGISTER)
    return cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None


def load_run_model(dataset, config_file, weights, out_dir):
    """(config, model) to evaluate ``weights`` on ``dataset`` like ``train_net.py --eval-only`` with
    ``OUTPUT_DIR`` ``out_dir``; the weights are read (and checked) here, before anything is written."""
    from gn_det.predict import model_from_config, yaml_config

    cfg = yaml_config(config_file, weights, ["OUTPUT_DIR", out_dir])
    cfg.defrost()
    cfg.DATASETS.TEST = (dataset,)
    cfg.freeze()
    return cfg, model_from_config(cfg)


def evaluate_run(cfg, model):
    """Evaluate ``model`` (:func:`load_run_model`), so its ``OUTPUT_DIR`` becomes a run folder with
    results.json and the saved predictions; returns that folder."""
    from gn_det.engine import GNTrainer

    GNTrainer.test(cfg, model)
    return cfg.OUTPUT_DIR


def load_predictions(run_dir, dataset):
    """{image_id: [COCO result dicts]} that COCOEvaluator saved for ``dataset`` in ``run_dir``, read by the checked
    reader (nothing in the file runs); an InputError naming the file when it is not such a list."""
    path = predictions_path(run_dir, dataset)
    saved = read_weights(path, "saved predictions")
    if not (isinstance(saved, list) and all(isinstance(p, dict) and "image_id" in p for p in saved)):
        raise InputError(f"saved predictions {path} are not COCOEvaluator's list of per-image predictions")
    return {p["image_id"]: p.get("instances", []) for p in saved}


def to_rle(segmentation, height, width):
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as one compressed RLE."""
    if isinstance(segmentation, list):
        return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_util.frPyObjects(segmentation, height, width)
    return segmentation


def instances_from_results(results, height, width, score_threshold):
    """detectron2 ``Instances`` (what ``Visualizer.draw_instance_predictions`` draws) of COCO results
    scoring at least ``score_threshold``.

    The results are those of ``COCOEvaluator``'s ``instances_predictions.pth``, whose ``category_id`` is still
    the model's contiguous class index (``instances_to_coco_json`` runs before the evaluator maps ids back to
    the dataset's), the index ``metadata.thing_classes`` is read with."""
    kept = [r for r in results if r["score"] >= score_threshold]
    instances = Instances((height, width))
    boxes = np.array([r["bbox"] for r in kept], dtype=np.float32).reshape(-1, 4)
    instances.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    instances.scores = torch.tensor([r["score"] for r in kept], dtype=torch.float32)
    instances.pred_classes = torch.tensor([r["category_id"] for r in kept], dtype=torch.int64)
    if kept and "segmentation" in kept[0]:
        masks = [mask_util.decode(to_rle(r["segmentation"], height, width)) for r in kept]
        instances.pred_masks = torch.from_numpy(np.stack(masks).astype(bool))
    return instances


def found_masks(record, results, score_threshold):
    """How many ground-truth masks of the dataset dict ``record`` a same-class prediction (scoring at least
    ``score_threshold``) overlaps with mask IoU >= MATCH_IOU."""
    height, width = record["height"], record["width"]
    truth = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0) and "segmentation" in a]
    predicted = [r for r in results if r["score"] >= score_threshold and "segmentation" in r]
    if not truth or not predicted:
        return 0
    ious = mask_util.iou([to_rle(r["segmentation"], height, width) for r in predicted],
                         [to_rle(a["segmentation"], height, width) for a in truth], [0] * len(truth))
    same_class = (np.array([r["category_id"] for r in predicted])[:, None]
                  == np.array([a["category_id"] for a in truth])[None, :])
    return int(((np.asarray(ious) >= MATCH_IOU) & same_class).any(axis=0).sum())


def choose_images(records, predictions, count, selection, score_threshold):
    """``count`` dataset dicts, deterministically.

    ``"differ"``: those where the runs' numbers of found ground-truth masks differ most, then those with
    most masks missed by all runs together, then dataset order. ``"even"``: evenly spaced in dataset order.
    """
    count = min(count, len(records))
    if selection == "even":
        return [records[i] for i in np.linspace(0, len(records) - 1, count).round().astype(int)]
    ranked = []
    for position, record in enumerate(records):
        found = [found_masks(record, p.get(record["image_id"], []), score_threshold)
                 for p in predictions]
        missed = len(record.get("annotations", [])) * len(found) - sum(found)
        ranked.append((-(max(found) - min(found)), -missed, position))
    return [records[position] for *_, position in sorted(ranked)[:count]]


def ap_title(run, dataset=None):
    """"LABEL" over "box AP 66.3 mask AP 71.8" (the run's final results on ``dataset``, by default its first
    test set; "–" where it has none, NaN when the evaluation found no prediction)."""
    return (run.name, f"box AP {_ap(run.metric('bbox/AP', dataset))}  mask AP {_ap(run.metric('segm/AP', dataset))}")


def _ap(value):
    return "–" if value is None else f"{value:.1f}"


def titled(panel, lines):
    """``panel`` (HxWx3 uint8) under a white strip holding two ``lines`` of title."""
    height, width = panel.shape[:2]
    image = Image.new("RGB", (width, height + 2 * TITLE_LINE), "white")
    image.paste(Image.fromarray(panel), (0, 2 * TITLE_LINE))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=TITLE_LINE - 3)
    for row, line in enumerate(lines):
        draw.text((3, 1 + row * TITLE_LINE), line, fill="black", font=font)
    return np.asarray(image)


def draw_panels(record, runs, predictions, metadata, score_threshold, scale, dataset=None):
    """One row: the ground truth, then each run's predictions (titled with its AP on ``dataset``), as an HxWx3
    uint8 array."""
    rgb = read_image(record["file_name"], format="RGB")
    height, width = rgb.shape[:2]
    # Visualizer picks instance colours with numpy's global generator: the same seed for every panel makes
    # the pictures reproducible
    np.random.seed(0)
    panels = [titled(Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(record).get_image(),
                     ("ground truth", os.path.basename(record["file_name"])))]
    for run, run_predictions in zip(runs, predictions):
        instances = instances_from_results(run_predictions.get(record["image_id"], []), height, width,
                                           score_threshold)
        np.random.seed(0)
        drawn = Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(instances).get_image()
        panels.append(titled(drawn, ap_title(run, dataset)))
    return np.concatenate(panels, axis=1)


def plan_runs(run_dirs, labels, dataset, weights, config_file, out_dir):
    """``(runs, {position: (config, weights, evaluation folder)})``: per run folder, in order, its :class:`Run`
    when its predictions of ``dataset`` are saved (else None), and how to evaluate each other one into
    ``out_dir/inference/<position>_<label>`` (see :func:`visualize_runs`)."""
    runs, to_evaluate = [], {}
    for position, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        if os.path.isfile(predictions_path(run_dir, dataset)):
            runs.append(Run(run_dir, label))  # its results.json / metrics.json give the AP of the title
            continue
        runs.append(None)
        if not weights:
            raise InputError(f"{run_dir}: no {os.path.join('inference', dataset, PREDICTIONS_FILE)} and no "
                             "--weights to compute it")
        run_weights = weights if os.path.isfile(weights) else os.path.join(run_dir, weights)
        run_config = config_file or os.path.join(run_dir, "config.yaml")
        for flag, path in (("--weights", run_weights), ("--config-file", run_config)):
            if not os.path.isfile(path):
                raise InputError(f"{run_dir}: {flag} {path} is not a file")
        # a label such as "BN*" or "a/b" as one plain folder name; the position keeps labels that become the same
        # name ("BN*", "BN?") apart
        folder = f"{position + 1}_" + re.sub(r"[^\w.+-]", "_", label)
        to_evaluate[position] = (run_config, run_weights, os.path.join(out_dir, "inference", folder))
    return runs, to_evaluate


def image_names(records):
    """A distinct PNG name per dataset dict: the image's file name without its extension, parent folders
    prefixed (``a_0001``, ``b_0001``) where names repeat, and ``_<image_id>`` appended where even the paths do."""
    names = ["_".join(tail) for tail in distinct_tails([os.path.splitext(r["file_name"])[0] for r in records])]
    counts = collections.Counter(names)
    return [f"{name}_{record['image_id']}" if counts[name] > 1 else name for name, record in zip(names, records)]


def stack_rows(rows):
    """The rows (HxWx3 uint8 arrays, of any sizes) one under another, left-aligned on white, as a PIL image."""
    sheet = Image.new("RGB", (max(row.shape[1] for row in rows), sum(row.shape[0] for row in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(Image.fromarray(row), (0, top))
        top += row.shape[0]
    return sheet


def save_png(image, path, **options):
    """Write the PIL ``image`` as a PNG through :func:`atomic_write`."""
    with atomic_write(path, "wb") as f:
        image.save(f, format="PNG", **options)


def visualize_runs(run_dirs, out_dir, labels=None, dataset=None, num_images=4, selection="differ",
                   score_threshold=0.5, scale=1.0, config_file=None, weights=None, sheet=None):
    """Write ``out_dir/<image>.png`` for ``num_images`` images of ``dataset`` (names from :func:`image_names`):
    ground truth and each run's predictions side by side, each titled with the run's AP on ``dataset`` (and, with
    ``sheet``, all rows stacked into that one PNG, narrower ones padded with white). Returns the paths.

    ``dataset`` defaults to the ``DATASETS.TEST`` of the first run's config.yaml. A run without saved
    predictions is evaluated first from ``weights`` (a file, or a file name inside each run folder such as
    ``model_final.pth``) and ``config_file`` (default: the run's config.yaml), into
    ``out_dir/inference/<position>_<label>/``. Labels default to the folder names (:func:`run_labels`). Every input
    is checked before anything is written.
    """
    if selection not in SELECTIONS:
        raise InputError(f"--select: {selection!r} is not one of {', '.join(SELECTIONS)}")
    if num_images < 1 or scale <= 0:
        raise InputError(f"--images {num_images} / --scale {scale}: both must be positive")
    for run_dir in run_dirs:
        if not os.path.isdir(run_dir):
            raise InputError(f"{run_dir}: not a folder")
    run_datasets = [run_dataset(d) for d in run_dirs]  # registers what each run registered
    dataset = dataset or run_datasets[0]
    if dataset is None:
        raise InputError(f"{run_dirs[0]}: no config.yaml naming DATASETS.TEST; give --dataset")
    from gn_det.engine import check_dataset

    check_dataset(dataset, "--dataset", "command line",
                  register_hint="a run's DATASETS.REGISTER; gn-det registers shapes_train and shapes_val")
    labels = run_labels(run_dirs, labels)
    runs, to_evaluate = plan_runs(run_dirs, labels, dataset, weights, config_file, out_dir)
    records = DatasetCatalog.get(dataset)
    metadata = MetadataCatalog.get(dataset)

    loaded = {position: load_run_model(dataset, *plan) for position, plan in to_evaluate.items()}
    saved = {position: load_predictions(run.output_dir, dataset) for position, run in enumerate(runs)
             if position not in to_evaluate}  # read, and checked, before out_dir is made
    os.makedirs(out_dir, exist_ok=True)
    for position, (cfg, model) in loaded.items():
        runs[position] = Run(evaluate_run(cfg, model), labels[position])
        saved[position] = load_predictions(runs[position].output_dir, dataset)
    predictions = [saved[position] for position in range(len(runs))]
    chosen = choose_images(records, predictions, num_images, selection, score_threshold)
    rows, paths = [], []
    for record, name in zip(chosen, image_names(chosen)):
        row = draw_panels(record, runs, predictions, metadata, score_threshold, scale, dataset)
        paths.append(os.path.join(out_dir, name + ".png"))
        save_png(Image.fromarray(row), paths[-1])
        rows.append(row)
    if sheet:
        # a palette of 256 colours keeps the sheet small enough to commit; the per-image PNGs stay full colour
        save_png(stack_rows(rows).quantize(256), sheet, optimize=True)
        paths.append(sheet)
    return paths
