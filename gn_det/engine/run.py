"""One run pipeline for both of detectron2's config systems: the body of tools/train_net.py.

A YAML config (``get_cfg`` + gn-det's keys) and a Python config (LazyConfig: ``model``, ``dataloader``,
``optimizer``, ``train.*``) each become one :class:`RunPlan`: the settings the checks read, named by the config
system's own keys (:class:`RunSettings`), the model, built once and checked, and the weights the run loads
first, read once. One check list (:func:`check_run`, :func:`check_datasets`) validates every plan, so both
systems give the same answer to the same mistake; one runner (:func:`execute`) writes the output folder and
trains or evaluates.

Everything is checked before anything is written into the output folder, in this order: the config file and
keys, the device (CUDA named but absent: CPU), the settings against the device and the number of processes
(fp16 AMP and SyncBN need CUDA; the batch splits evenly), the datasets the run reads, the model (every layer's
channels against the group setting, the precision against the device), the weights it loads (readable, nothing
in them runs; for evaluation and resuming every parameter fitting the model, as loaded; converted weights
fitting the model). A failed check is an :class:`~gn_det.errors.InputError`
and leaves an earlier run's output folder as it was.
"""
import logging
import random

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, default_setup
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from gn_det.checkpoint import check_weights_for_model
from gn_det.checkpoint.convert import AUTHOR as CONVERTER_AUTHOR
from gn_det.checkpoint.reader import GNCheckpointer, local_weights_path, read_checkpoint
from gn_det.config import NORM_SITE_KEYS, adapt_to_this_machine, get_gn_cfg, is_lazy_config, select
from gn_det.data import SHAPES_SPLITS, ensure_shapes, register_datasets
from gn_det.data.register import check_segmentations
from gn_det.errors import InputError
from gn_det.fileio import check_output_location
from gn_det.solver import scale_schedule_linearly

from . import lazy_train
from .plan import RunPlan, RunSettings
from .trainer import GNTrainer

logger = logging.getLogger(__name__)

REGISTER_HINT = "--dataset NAME=JSON,IMAGE_DIR or DATASETS.REGISTER"


def argument_parser():
    """detectron2's usual flags plus ``--dataset NAME=JSON,IMAGE_DIR`` (repeatable)."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", action="append", default=[], metavar="NAME=JSON,IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); use NAME in DATASETS.TRAIN/TEST",
    )
    return parser


def yaml_settings(cfg, source):
    """:class:`RunSettings` of a YAML config."""
    return RunSettings(
        source=source, device=cfg.MODEL.DEVICE, amp=("SOLVER.AMP.ENABLED", cfg.SOLVER.AMP.ENABLED),
        batch=("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH),
        norms={key: select(cfg, key) for key in NORM_SITE_KEYS},
        train_datasets=[("DATASETS.TRAIN", name) for name in cfg.DATASETS.TRAIN],
        test_datasets=[("DATASETS.TEST", name) for name in cfg.DATASETS.TEST],
        weights=("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS), output_dir=cfg.OUTPUT_DIR, seed=cfg.SEED,
        masks=cfg.MODEL.MASK_ON,
    )


def load_yaml_config(args):
    """The checked gn-det config of ``args`` (``--config-file``, ``--dataset``, trailing overrides) and its
    settings; CUDA named where there is none becomes the CPU, and bf16 on a device without bf16 kernels fp32
    (:func:`~gn_det.config.adapt_to_this_machine`)."""
    cfg = get_gn_cfg(args.config_file, args.opts)
    # what the command line registered goes into the config too, so the dumped config.yaml is complete
    cfg.DATASETS.REGISTER = list(cfg.DATASETS.REGISTER) + [s for s in args.dataset if s not in cfg.DATASETS.REGISTER]
    adjustments = adapt_to_this_machine(cfg)
    register_datasets(cfg.DATASETS.REGISTER)
    settings = yaml_settings(cfg, args.config_file or "config")
    settings.adjustments = adjustments
    return cfg, settings


def check_run(settings, world_size, training):
    """The settings against the device and the number of processes, the same for both config systems: fp16
    AMP and (with several processes) SyncBN need CUDA; the training batch splits evenly over the processes."""
    source = settings.source
    on_cpu = torch.device(settings.device).type == "cpu"
    key, amp = settings.amp
    if on_cpu and amp:
        raise InputError(f"{source}: {key}=True needs CUDA (detectron2's AMPTrainer, fp16); on CPU switch it off "
                         "(bf16 autocast is gn-det's MODEL.PRECISION bf16)")
    if on_cpu and world_size > 1:
        for key, norm in settings.norms.items():
            if norm in ("SyncBN", "nnSyncBN"):  # detectron2's names of torch's nn.SyncBatchNorm
                raise InputError(
                    f"{source}: {key}={norm!r} needs CUDA with {world_size} processes (torch's SyncBatchNorm has "
                    "no CPU kernel); use 'naiveSyncBN' (detectron2's all-reduce SyncBN) on CPU"
                )
    key, batch = settings.batch
    if training and batch is not None and (batch < 1 or batch % world_size):
        raise InputError(
            f"{source}: {key}={batch} must be a positive multiple of the number of processes ({world_size})"
        )


def check_dataset(name, key, source, register_hint=REGISTER_HINT, masks=False):
    """Fail before anything is written when dataset ``name`` (read from config key ``key``) is unknown or its
    files are gone, or, for a model that predicts masks (``masks``), lacks a segmentation."""
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
    if masks:
        check_segmentations(name, f"{source}: {key}")


def check_datasets(settings, training=True):
    """:func:`check_dataset` for every dataset the run reads: the test sets (evaluated after training too),
    and the training sets when ``training``."""
    for key, name in (settings.train_datasets if training else []) + settings.test_datasets:
        check_dataset(name, key, settings.source, masks=settings.masks)


def weights_to_load(output_dir, weights, resume, weights_key="MODEL.WEIGHTS"):
    """(what, path) of the file training or evaluation loads first: with ``resume``, the checkpoint that
    ``output_dir/last_checkpoint`` names, when there is one; else ``weights`` (None when empty), called by its
    config key ``weights_key``."""
    checkpointer = GNCheckpointer(None, save_dir=output_dir)
    if resume and checkpointer.has_checkpoint():
        return "the last checkpoint", checkpointer.get_checkpoint_file()
    return weights_key, weights or None


def rng_state():
    return (torch.get_rng_state(), np.random.get_state(), random.getstate(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch_state, numpy_state, python_state, cuda_state = state
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)


def plan_run(args, check_model=None):
    """The checked :class:`RunPlan` of train_net's ``args``, for a YAML or a Python config; nothing is written.

    The model is built after seeding the RNGs as detectron2's ``default_setup`` does, and the RNG state after
    the build is kept for :func:`execute`, so initial weights and every random draw afterwards follow
    detectron2's own sequence. ``check_model(cfg, model)``: a tool's own checks of the model.
    """
    training = not args.eval_only
    lazy = is_lazy_config(args.config_file)
    if lazy:
        cfg, settings = lazy_train.load_lazy_run_config(args)
    else:
        cfg, settings = load_yaml_config(args)
    check_run(settings, comm.get_world_size(), training)
    check_output_location(settings.output_dir, "output folder")
    check_datasets(settings, training)
    if not lazy:
        scale_schedule_linearly(cfg)
        cfg.freeze()
    seed_all_rng(None if settings.seed < 0 else settings.seed + comm.get_rank())
    model = lazy_train.build_lazy_model(cfg) if lazy else build_model(cfg)
    state = rng_state()
    if check_model is not None:
        check_model(cfg, model)
    what, path = weights_to_load(settings.output_dir, settings.weights[1], args.resume, settings.weights[0])
    preloaded = {}
    if path is not None:
        checkpoint = read_checkpoint(path, what)
        preloaded[local_weights_path(path)] = checkpoint
        if args.eval_only or what == "the last checkpoint":
            # weights that must fit: loaded now, so a mismatch is one line before anything is written
            GNCheckpointer(model, strict=True, preloaded=preloaded).load(path, checkpointables=[])
        elif checkpoint.get("__author__") == CONVERTER_AUTHOR:
            # Converted ImageNet weights must fit: a GN file into a BN* model (or the reverse), another depth, or
            # other input settings (RGB, mean/std, stride) would load silently and train a worse model.
            check_weights_for_model(model, checkpoint, name=path)
    return RunPlan(cfg, settings, model, preloaded, state, args.eval_only, args.resume, lazy)


def execute(plan, args, make_trainer=GNTrainer):
    """Run a :class:`RunPlan`: detectron2's ``default_setup`` (output folder, config.yaml, logging), then
    training or evaluation. ``make_trainer(cfg, model, preloaded)`` builds a YAML run's trainer."""
    default_setup(plan.cfg, args)  # writes config.yaml; seeds the RNGs, whose post-build state is restored next
    set_rng_state(plan.rng_state)
    setup_logger(plan.settings.output_dir, distributed_rank=comm.get_rank(), name="gn_det", abbrev_name="gn_det")
    for adjustment in plan.settings.adjustments:
        logger.info(adjustment)
    logger.info("Model:\n%s", plan.model)
    if plan.lazy:
        return lazy_train.run_lazy(plan, args)
    if plan.eval_only:
        return GNTrainer.test(plan.cfg, plan.model)  # its weights were loaded by plan_run
    trainer = make_trainer(plan.cfg, plan.model, plan.preloaded)
    plan.preloaded = {}  # the trainer's checkpointer holds the content until it loads it
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def train_or_evaluate(args, make_trainer=GNTrainer, check_model=None):
    """tools/train_net.py's body, run in every process by detectron2's ``launch``."""
    return execute(plan_run(args, check_model), args, make_trainer)
