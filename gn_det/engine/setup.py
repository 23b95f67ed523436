"""From command-line arguments to a checked, frozen config, and the train/evaluate entry point.

Everything that can be checked is checked before ``default_setup`` writes ``config.yaml`` and ``log.txt`` into
``OUTPUT_DIR``, in this order: the config file and keys, the settings against the device and the number of
processes, the datasets, the model (every layer's channels against the group setting), the weights to load. A
failed check is an :class:`~gn_det.errors.InputError` and leaves an earlier run's ``OUTPUT_DIR`` as it was.
"""
import logging
from urllib.parse import urlparse

import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from gn_det.checkpoint import check_weights_for_model
from gn_det.checkpoint.convert import AUTHOR as CONVERTER_AUTHOR
from gn_det.checkpoint.reader import GNCheckpointer
from gn_det.checkpoint.reader import read_checkpoint as read_weights_checkpoint
from gn_det.config import NORM_SITE_KEYS, get_gn_cfg, select
from gn_det.data import SHAPES_SPLITS, ensure_shapes, register_datasets
from gn_det.errors import InputError
from gn_det.solver import scale_schedule_linearly

from .trainer import GNTrainer

logger = logging.getLogger(__name__)


def argument_parser():
    """detectron2's usual flags plus ``--dataset NAME=JSON,IMAGE_DIR`` (repeatable)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON,IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); use NAME in DATASETS.TRAIN/TEST",
    )
    return parser


def available_device(device):
    """``device``, or "cpu" where it names CUDA and there is no CUDA device (the tools then run on CPU)."""
    return "cpu" if str(device).startswith("cuda") and not torch.cuda.is_available() else device


def check_run_settings(cfg, source, world_size, training):
    """Settings that depend on the device and the number of processes: AMP and SyncBN need CUDA, and the
    batch splits evenly over the processes."""
    on_cpu = cfg.MODEL.DEVICE.startswith("cpu")
    if on_cpu and cfg.SOLVER.AMP.ENABLED:
        raise InputError(
            f"{source}: SOLVER.AMP.ENABLED=True needs CUDA (detectron2's AMPTrainer); on CPU use MODEL.PRECISION bf16"
        )
    if on_cpu and world_size > 1:
        for key in NORM_SITE_KEYS:
            if select(cfg, key) == "SyncBN":
                raise InputError(
                    f"{source}: {key}='SyncBN' needs CUDA with {world_size} processes (torch's SyncBatchNorm has "
                    "no CPU kernel); use 'naiveSyncBN' (detectron2's all-reduce SyncBN) on CPU"
                )
    batch = cfg.SOLVER.IMS_PER_BATCH
    if training and (batch < 1 or batch % world_size):
        raise InputError(
            f"{source}: SOLVER.IMS_PER_BATCH={batch} must be a positive multiple of the number of processes "
            f"({world_size})"
        )


def check_dataset(name, key, source, register_hint="--dataset NAME=JSON,IMAGE_DIR or DATASETS.REGISTER"):
    """Fail before anything is written when dataset ``name`` (read from config key ``key``) is unknown or its
    files are gone."""
    if name not in DatasetCatalog.list():
        raise InputError(
            f"{source}: {key} names dataset {name!r}, which is not registered (register it with {register_hint})"
        )
    if name in (f"shapes_{split}" for split in SHAPES_SPLITS):
        ensure_shapes()  # generated on first use; from here on its files must exist like any other
    meta = MetadataCatalog.get(name)
    for field in ("json_file", "image_root"):
        path = getattr(meta, field, None)
        if path and not PathManager.exists(path):
            raise InputError(
                f"{source}: {key} dataset {name!r}: {field} {path} does not exist "
                "(for COCO, set DETECTRON2_DATASETS to the folder holding coco/)"
            )


def check_datasets(cfg, source, training=True):
    """:func:`check_dataset` for every dataset the run reads: ``DATASETS.TEST`` (evaluated after training too),
    and ``DATASETS.TRAIN`` when ``training``."""
    for key in ("DATASETS.TRAIN", "DATASETS.TEST") if training else ("DATASETS.TEST",):
        for name in cfg.DATASETS[key.split(".")[1]]:
            check_dataset(name, key, source)


def weights_to_load(output_dir, weights, resume, weights_key="MODEL.WEIGHTS"):
    """(what, path) of the file training or evaluation loads first: with ``resume``, the checkpoint that
    ``output_dir/last_checkpoint`` names, when there is one; else ``weights`` (None when empty), called by its
    config key ``weights_key``."""
    checkpointer = GNCheckpointer(None, save_dir=output_dir)
    if resume and checkpointer.has_checkpoint():
        return "the last checkpoint", checkpointer.get_checkpoint_file()
    return weights_key, weights or None


def read_checkpoint(path, what):
    """The checkpoint dict at ``path`` (a path or a URL detectron2 resolves), read as GNCheckpointer reads it
    (nothing in it runs: :mod:`gn_det.checkpoint.reader`); an InputError naming the file when it is missing or
    not a checkpoint."""
    return read_weights_checkpoint(urlparse(path)._replace(query="").geturl(), what)


def check_model_and_weights(cfg, resume, check_model=None):
    """Build the model on ``MODEL.DEVICE`` (which checks every norm site's channels against the group setting
    and the precision against the device) and read the weights it would load.

    Weights written by gn-det's converter must also fit the model: a GN file into a BN* model (or the reverse),
    another depth, or input settings other than the weights' (RGB, mean/std, stride) would load silently
    (FrozenBN keeps its defaults for missing statistics) and train a worse model.

    ``check_model(cfg, model)``: a tool's own checks of the model (e.g. that a layer it hooks exists).
    """
    model = build_model(cfg)
    if check_model is not None:
        check_model(cfg, model)
    what, path = weights_to_load(cfg.OUTPUT_DIR, cfg.MODEL.WEIGHTS, resume)
    if path is None:
        return
    checkpoint = read_checkpoint(path, what)
    if checkpoint.get("__author__") == CONVERTER_AUTHOR:
        check_weights_for_model(model, checkpoint, cfg, name=path)


def setup(args, check_model=None):
    """Config from ``args`` with gn-det's keys, datasets registered, everything checked (module docstring;
    ``check_model`` as in :func:`check_model_and_weights`), schedule scaled, then detectron2's ``default_setup``
    (output folder, config.yaml, logging)."""
    source = args.config_file or "config"
    cfg = get_gn_cfg(args.config_file, args.opts)
    # what the command line registered goes into the config too, so the dumped config.yaml is complete
    cfg.DATASETS.REGISTER = list(cfg.DATASETS.REGISTER) + [s for s in args.dataset if s not in cfg.DATASETS.REGISTER]
    if available_device(cfg.MODEL.DEVICE) != cfg.MODEL.DEVICE:
        logger.info("No CUDA device: running on CPU")
        cfg.MODEL.DEVICE = "cpu"
    check_run_settings(cfg, source, comm.get_world_size(), training=not args.eval_only)
    register_datasets(cfg.DATASETS.REGISTER)
    check_datasets(cfg, source, training=not args.eval_only)
    scale_schedule_linearly(cfg)
    cfg.freeze()
    check_model_and_weights(cfg, args.resume, check_model)
    default_setup(cfg, args)  # writes OUTPUT_DIR/config.yaml; sets up detectron2's and fvcore's loggers
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gn_det", abbrev_name="gn_det")
    return cfg


def train_or_evaluate(args, make_trainer=GNTrainer, check_model=None):
    """The body of tools/train_net.py, run in every process by detectron2's ``launch``.

    ``make_trainer(cfg)`` builds the trainer (a GNTrainer subclass for tools that add hooks); ``check_model``
    goes to :func:`setup`."""
    cfg = setup(args, check_model)
    if args.eval_only:
        model = GNTrainer.build_model(cfg)
        GNCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        return GNTrainer.test(cfg, model)
    trainer = make_trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
