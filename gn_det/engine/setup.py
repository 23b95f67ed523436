"""From command-line arguments to a checked, frozen config, and the train/evaluate entry point."""
import logging
import os

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from iopath.common.file_io import PathManager

from gn_det.checkpoint import check_weights_for_model, load_converted
from gn_det.checkpoint.convert import AUTHOR as CONVERTER_AUTHOR
from gn_det.config import get_gn_cfg
from gn_det.data import SHAPES_SPLITS, ensure_shapes, register_datasets
from gn_det.solver import scale_schedule_linearly

from .trainer import GNTrainer

logger = logging.getLogger(__name__)
_files = PathManager()

# Errors gn-det raises for bad input (config, datasets, diverging loss); each message is one line naming
# the offending file, key, layer or value, so tools print it without a traceback.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError)


def argument_parser():
    """detectron2's usual flags plus ``--dataset NAME=JSON,IMAGE_DIR`` (repeatable)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON,IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); use NAME in DATASETS.TRAIN/TEST",
    )
    return parser


def check_datasets(cfg, source):
    """Fail before anything is written when a dataset named by the config is unknown or its files are gone."""
    for key in ("DATASETS.TRAIN", "DATASETS.TEST"):
        for name in cfg.DATASETS[key.split(".")[1]]:
            if name not in DatasetCatalog.list():
                raise ValueError(
                    f"{source}: {key} names dataset {name!r}, which is not registered "
                    "(register it with --dataset NAME=JSON,IMAGE_DIR or DATASETS.REGISTER)"
                )
            if name in (f"shapes_{split}" for split in SHAPES_SPLITS):
                ensure_shapes()  # generated on first use; from here on its files must exist like any other
            meta = MetadataCatalog.get(name)
            for field in ("json_file", "image_root"):
                path = getattr(meta, field, None)
                if path and not _files.exists(path):
                    raise FileNotFoundError(
                        f"{source}: {key} dataset {name!r}: {field} {path} does not exist "
                        "(for COCO, set DETECTRON2_DATASETS to the folder holding coco/)"
                    )


def setup(args):
    """Config from ``args`` with gn-det's keys, datasets registered, schedule scaled, logging set up."""
    source = args.config_file or "config"
    cfg = get_gn_cfg(args.config_file, args.opts)
    # what the command line registered goes into the config too, so the dumped config.yaml is complete
    cfg.DATASETS.REGISTER = list(cfg.DATASETS.REGISTER) + [s for s in args.dataset if s not in cfg.DATASETS.REGISTER]
    register_datasets(cfg.DATASETS.REGISTER)
    check_datasets(cfg, source)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("No CUDA device: running on CPU")
        cfg.MODEL.DEVICE = "cpu"
    scale_schedule_linearly(cfg)
    cfg.freeze()
    default_setup(cfg, args)  # sets up detectron2's and fvcore's loggers
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gn_det", abbrev_name="gn_det")
    return cfg


def check_converted_weights(cfg, model):
    """Weights written by gn-det's converter must fit the model before training starts: a GN file into a BN*
    model (or the reverse), another depth, or input settings other than the weights' (RGB, mean/std, stride)
    would load silently (FrozenBN keeps its defaults for missing statistics) and train a worse model."""
    path = cfg.MODEL.WEIGHTS
    if not (path.endswith(".pkl") and os.path.isfile(path)):
        return
    checkpoint = load_converted(path)
    if isinstance(checkpoint, dict) and checkpoint.get("__author__") == CONVERTER_AUTHOR:
        check_weights_for_model(model, checkpoint, cfg, name=path)


def train_or_evaluate(args, make_trainer=GNTrainer):
    """The body of tools/train_net.py, run in every process by detectron2's ``launch``.

    ``make_trainer(cfg)`` builds the trainer (a GNTrainer subclass for tools that add hooks)."""
    cfg = setup(args)
    if args.eval_only:
        model = GNTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return GNTrainer.test(cfg, model)
    trainer = make_trainer(cfg)
    if not (args.resume and trainer.checkpointer.has_checkpoint()):
        check_converted_weights(cfg, getattr(trainer.model, "module", trainer.model))  # unwrap DDP
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
