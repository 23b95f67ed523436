"""Training and evaluation from a LazyConfig (Python config): tools/train_net.py's path for a ``.py`` file.

It follows detectron2's ``tools/lazyconfig_train_net.py`` (``do_test``, ``do_train``, ``main``), built from
detectron2's package API. The config is read the same way: ``model``, ``dataloader.{train,test,evaluator}``,
``optimizer``, ``lr_multiplier`` and ``train.*``. ``KEY=VALUE`` overrides go through
``LazyConfig.apply_overrides``. On top of that it does what gn-det's YAML path does:

- without CUDA it runs on CPU (``train.device``) and switches off fp16 AMP, which needs CUDA;
- bad input (missing file or section, override under a missing section, dataset or its files, group setting,
  ``train.init_checkpoint`` or the ``--resume`` checkpoint) stops with one :class:`gn_det.InputError` line
  before anything is written to ``train.output_dir``; a NaN/Inf loss stops with one line naming the iteration;
- the optimizer's parameter groups are logged as a table (``gn_det.solver.param_group_table``);
- every evaluation writes ``results.json`` (``gn_det.engine.trainer.write_results``);
- ``--resume``, ``--num-gpus`` (also on CPU, through gloo) and ``--eval-only`` work as for YAML configs.
"""
import logging
import os

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from omegaconf import OmegaConf

from gn_det.checkpoint.reader import GNCheckpointer
from gn_det.data import register_datasets
from gn_det.errors import InputError
from gn_det.lazy import label_group_norm_sites
from gn_det.solver import param_group_table

from .setup import available_device, check_dataset, read_checkpoint, weights_to_load
from .trainer import PeakMemoryHook, ddp_device_arguments, training_errors_in_one_line, write_results

logger = logging.getLogger(__name__)

# The sections the training body reads (detectron2's configs/common/train.py and data/coco.py layout).
REQUIRED_KEYS = ("model", "train.output_dir", "train.init_checkpoint", "train.max_iter", "train.device")
TRAIN_KEYS = ("dataloader.train", "optimizer", "lr_multiplier", "train.amp.enabled", "train.checkpointer",
              "train.eval_period", "train.log_period")


def is_lazy_config(path):
    """Whether ``path`` is a LazyConfig (Python) file rather than a YAML config."""
    return bool(path) and path.endswith(".py")


def load_lazy_config(path, overrides=()):
    """``path`` loaded with ``KEY=VALUE`` ``overrides`` applied. An override must lie under a section that
    exists (``train.max_iter=10`` needs ``train``; its leaf may be new, as detectron2 allows)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: config file does not exist")
    cfg = LazyConfig.load(path)
    for override in overrides:
        key, sep, _value = override.partition("=")
        if not sep:
            raise InputError(f"command line: {override!r} is not KEY=VALUE")
        parent = key.rpartition(".")[0]
        if parent and not OmegaConf.is_config(OmegaConf.select(cfg, parent, default=None)):
            raise InputError(f"command line: {override}: {path} has no section {parent}")
    return LazyConfig.apply_overrides(cfg, list(overrides))


def check_lazy_config(cfg, source, eval_only):
    """Raise one InputError line naming the first key the run needs that ``cfg`` lacks, or a dataset the run
    reads that is unknown or whose files are gone (:func:`gn_det.engine.setup.check_dataset`)."""
    needed = REQUIRED_KEYS + (("dataloader.test", "dataloader.evaluator") if eval_only else TRAIN_KEYS)
    for key in needed:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise InputError(f"{source}: no {key} (see detectron2's configs/common for the layout)")
    # the datasets the run reads: the training set unless --eval-only, the test set in an evaluation
    # (--eval-only, or do_test's, which needs dataloader.evaluator)
    splits = [] if eval_only else ["train"]
    if eval_only or OmegaConf.select(cfg, "dataloader.evaluator", default=None) is not None:
        splits.append("test")
    for split in splits:
        names = OmegaConf.select(cfg, f"dataloader.{split}.dataset.names", default=None)
        for name in [names] if isinstance(names, str) else (names or []):
            check_dataset(name, f"dataloader.{split}.dataset.names", source,
                          register_hint="--dataset NAME=JSON,IMAGE_DIR")


def use_available_device(cfg):
    """``train.device`` cuda without a CUDA device becomes cpu, and fp16 AMP (CUDA only) is switched off.
    Returns what changed, for the log."""
    if available_device(cfg.train.device) == cfg.train.device:
        return ""
    cfg.train.device = "cpu"
    if OmegaConf.select(cfg, "train.amp.enabled", default=False):
        cfg.train.amp.enabled = False
        return "No CUDA device: running on CPU, in float32 (train.amp.enabled needs CUDA)"
    return "No CUDA device: running on CPU"


def build_lazy_model(cfg):
    """``cfg.model`` built on ``train.device``; a GN spec that cannot split a layer fails naming its field."""
    label_group_norm_sites(cfg.model)
    return instantiate(cfg.model).to(cfg.train.device)


def evaluated_dataset_name(cfg):
    """The key of results.json: the test dataset's name (names joined by commas for several)."""
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names", default="test")
    return names if isinstance(names, str) else ",".join(names)


def do_test(cfg, model):
    """Evaluate ``model`` on ``dataloader.test`` with ``dataloader.evaluator``; the main process writes
    ``results.json`` as ``{test dataset: results}``. (detectron2's lazyconfig_train_net.py ``do_test``.)"""
    if "evaluator" not in cfg.dataloader:
        return None
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
        write_results(cfg.train.output_dir, {evaluated_dataset_name(cfg): results})
    return results


def ddp_arguments(cfg):
    """``train.ddp`` for ``create_ddp_model``, with the device's ``device_ids`` (:func:`ddp_device_arguments`)."""
    arguments = dict(OmegaConf.select(cfg, "train.ddp", default={}) or {})
    return {**arguments, **ddp_device_arguments(cfg.train.device)}


def do_train(args, cfg, model):
    """Train ``model`` as detectron2's lazyconfig_train_net.py ``do_train`` does, with gn-det's peak-memory
    metric and the optimizer's parameter groups logged."""
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    logger.info("Optimizer parameter groups:\n%s", param_group_table(model, optimizer))
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **ddp_arguments(cfg))
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = GNCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        PeakMemoryHook(cfg.train.device),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # the checkpoint holds the iteration that just finished, so training goes on from the next one
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    with training_errors_in_one_line(trainer, cfg.train.output_dir, "lower optimizer.lr"):
        trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def train_or_evaluate_lazy(args):
    """tools/train_net.py's body for a LazyConfig, run in every process by detectron2's ``launch``."""
    register_datasets(args.dataset)
    cfg = load_lazy_config(args.config_file, args.opts)
    check_lazy_config(cfg, args.config_file, args.eval_only)
    device_change = use_available_device(cfg)
    # the model is built before default_setup writes config.yaml, so a bad group setting leaves an earlier
    # run's files as they were; default_setup's seeding, done first for the same initial weights
    seed = OmegaConf.select(cfg, "train.seed", default=-1)
    seed_all_rng(None if seed < 0 else seed + comm.get_rank())
    model = build_lazy_model(cfg)
    what, path = weights_to_load(cfg.train.output_dir, cfg.train.init_checkpoint, args.resume,
                                 "train.init_checkpoint")
    if path is not None:
        read_checkpoint(path, what)  # a missing or unreadable file is one line, before anything is written
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="gn_det", abbrev_name="gn_det")
    if device_change:
        logger.info(device_change)
    logger.info("Model:\n%s", model)
    if args.eval_only:
        GNCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
            cfg.train.init_checkpoint, resume=args.resume
        )
        return do_test(cfg, create_ddp_model(model, **ddp_arguments(cfg)))
    do_train(args, cfg, model)
    return None
