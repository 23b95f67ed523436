"""The Python-config (LazyConfig) half of gn-det's one run pipeline (:mod:`gn_det.engine.run`).

It reads a LazyConfig as detectron2's ``tools/lazyconfig_train_net.py`` does (``model``,
``dataloader.{train,test,evaluator}``, ``optimizer``, ``lr_multiplier``, ``train.*``; ``KEY=VALUE`` overrides
through ``LazyConfig.apply_overrides``) into the run plan's settings, and trains or evaluates a plan as that
script's ``do_train`` / ``do_test`` do, built from detectron2's package API, with gn-det's additions: the
optimizer's parameter groups logged as a table, ``results.json`` after every evaluation, a NaN/Inf loss in one
line, CPU processes through gloo.
"""
import logging

import torch

from detectron2.config import instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import OmegaConf

from gn_det.checkpoint.reader import GNCheckpointer
from gn_det.config import adapt_to_this_machine, load_lazy_config
from gn_det.data import register_datasets
from gn_det.errors import InputError
from gn_det.layers import check_norm_sites
from gn_det.lazy import label_group_norm_sites, norm_slots
from gn_det.modeling.meta_arch import check_precision
from gn_det.solver import param_group_table

from .plan import RunSettings
from .trainer import (PeakMemoryHook, ddp_device_arguments, gn_writers, training_errors_in_one_line,
                      write_results)

logger = logging.getLogger(__name__)

# The sections the training body reads (detectron2's configs/common/train.py and data/coco.py layout).
REQUIRED_KEYS = ("model", "train.output_dir", "train.init_checkpoint", "train.max_iter", "train.device")
TRAIN_KEYS = ("dataloader.train", "optimizer", "lr_multiplier", "train.amp.enabled", "train.checkpointer",
              "train.eval_period", "train.log_period")


def check_lazy_config(cfg, source, eval_only):
    """Raise one InputError line naming the first key the run needs that ``cfg`` lacks."""
    needed = REQUIRED_KEYS + (("dataloader.test", "dataloader.evaluator") if eval_only else TRAIN_KEYS)
    for key in needed:
        if OmegaConf.select(cfg, key, default=None) is None:
            raise InputError(f"{source}: no {key} (see detectron2's configs/common for the layout)")


def dataset_names(cfg, split):
    """[(key, name)] of ``dataloader.{split}.dataset.names``."""
    key = f"dataloader.{split}.dataset.names"
    names = OmegaConf.select(cfg, key, default=None)
    return [(key, name) for name in ([names] if isinstance(names, str) else (names or []))]


def predicts_masks(cfg):
    """Whether the LazyConfig's model predicts masks (its ROI heads have a mask head)."""
    return OmegaConf.select(cfg, "model.roi_heads.mask_head", default=None) is not None


def load_lazy_run_config(args):
    """The LazyConfig of ``args`` (``--config-file``, ``--dataset``, ``KEY=VALUE`` overrides) and its
    :class:`~gn_det.engine.run.RunSettings`; CUDA named where there is none becomes the CPU, and bf16 on a
    device without bf16 kernels fp32 (:func:`~gn_det.config.adapt_to_this_machine`)."""
    register_datasets(args.dataset)
    source = args.config_file
    cfg = load_lazy_config(source, args.opts)
    check_lazy_config(cfg, source, args.eval_only)
    adjustments = adapt_to_this_machine(cfg)
    # the test set is read in an evaluation (--eval-only, or do_test's, which needs dataloader.evaluator)
    evaluates = args.eval_only or OmegaConf.select(cfg, "dataloader.evaluator", default=None) is not None
    settings = RunSettings(
        source=source, device=cfg.train.device,
        amp=("train.amp.enabled", bool(OmegaConf.select(cfg, "train.amp.enabled", default=False))),
        batch=("dataloader.train.total_batch_size",
               OmegaConf.select(cfg, "dataloader.train.total_batch_size", default=None)),
        norms={site: parent[name] for parent, name, site in norm_slots(cfg.model) if name in parent},
        train_datasets=[] if args.eval_only else dataset_names(cfg, "train"),
        test_datasets=dataset_names(cfg, "test") if evaluates else [],
        weights=("train.init_checkpoint", cfg.train.init_checkpoint or ""),
        output_dir=cfg.train.output_dir, seed=OmegaConf.select(cfg, "train.seed", default=-1),
        masks=predicts_masks(cfg),
        adjustments=adjustments,
    )
    return cfg, settings


def build_lazy_model(cfg):
    """``cfg.model`` built on ``train.device``; a GN spec that cannot split a layer fails naming the layer and
    the spec's field."""
    label_group_norm_sites(cfg.model)
    model = instantiate(cfg.model)
    check_norm_sites(model)
    model = model.to(cfg.train.device)
    if hasattr(model, "precision"):  # gn-det's meta-architectures: fail at build, as a YAML config does
        check_precision(model.precision, torch.device(cfg.train.device).type, key="model.precision")
    return model


def trains_with_amp(cfg, model):
    """Whether training runs detectron2's AMPTrainer: ``train.amp.enabled``, or a model computing in fp16, which
    trains with AMPTrainer's gradient scaler (as a YAML config with ``MODEL.PRECISION fp16`` does)."""
    return cfg.train.amp.enabled or getattr(model, "precision", "fp32") == "fp16"


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


def do_train(args, cfg, model, preloaded=None):
    """Train ``model`` as detectron2's lazyconfig_train_net.py ``do_train`` does, with gn-det's peak-memory
    metric and the optimizer's parameter groups logged."""
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    logger.info("Optimizer parameter groups:\n%s", param_group_table(model, optimizer))
    train_loader = instantiate(cfg.dataloader.train)

    trainer_class = AMPTrainer if trains_with_amp(cfg, model) else SimpleTrainer
    model = create_ddp_model(model, **ddp_arguments(cfg))
    trainer = trainer_class(model, train_loader, optimizer)
    checkpointer = GNCheckpointer(model, cfg.train.output_dir, trainer=trainer, preloaded=preloaded)
    main = comm.is_main_process()
    trainer.register_hooks([
        hooks.IterationTimer(),
        PeakMemoryHook(cfg.train.device),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(gn_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # the checkpoint holds the iteration that just finished, so training goes on from the next one
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    with training_errors_in_one_line(trainer, cfg.train.output_dir, "lower optimizer.lr"):
        trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def run_lazy(plan, args):
    """Train or evaluate a LazyConfig's :class:`~gn_det.engine.run.RunPlan` (its output folder set up)."""
    cfg, model = plan.cfg, plan.model
    if args.eval_only:  # its weights were loaded by the plan
        return do_test(cfg, create_ddp_model(model, **ddp_arguments(cfg)))
    do_train(args, cfg, model, plan.preloaded)
    return None
