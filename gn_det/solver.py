"""Optimizer recipe: parameter groups as the paper fine-tunes (no decay on norm γ/β) and linear LR scaling."""
import logging

from tabulate import tabulate
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver import build_optimizer
from detectron2.solver.build import maybe_add_gradient_clipping

from .cpu import cpu_fast_path, fused_sgd, sgd_keeping_its_step

logger = logging.getLogger(__name__)

# Module types whose affine parameters detectron2's get_default_optimizer_params treats as norm parameters
# (it tests nn.modules.batchnorm._BatchNorm, GroupNorm, InstanceNorm, LayerNorm, LocalResponseNorm).
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LayerNorm, nn.LocalResponseNorm, FrozenBatchNorm2d)


def parameter_kinds(model):
    """Map id(parameter) -> "<NormType> γ/β", "bias" or "weight"."""
    kinds = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, _NORM_TYPES):
                kinds[id(param)] = f"{type(module).__name__} γ/β"
            else:
                kinds[id(param)] = "bias" if name == "bias" else "weight"
    return kinds


def param_group_table(model, optimizer):
    """A table of the optimizer's groups: what they hold, tensor and parameter counts, lr, weight decay."""
    kinds = parameter_kinds(model)
    rows = []
    for group in optimizer.param_groups:
        held = sorted({kinds.get(id(p), "other") for p in group["params"]})
        rows.append([", ".join(held), len(group["params"]), sum(p.numel() for p in group["params"]),
                     group["lr"], group["weight_decay"]])
    return tabulate(rows, headers=["holds", "tensors", "parameters", "lr", "weight decay"], tablefmt="pipe")


def build_gn_optimizer(cfg, model):
    """detectron2's SGD with ``get_default_optimizer_params``: norm γ/β decay by ``SOLVER.WEIGHT_DECAY_NORM``
    (0 in gn-det's configs, the paper's fine-tuning recipe), biases by ``SOLVER.WEIGHT_DECAY_BIAS`` (None:
    as weights), everything else by ``SOLVER.WEIGHT_DECAY``. With ``MODEL.CPU_FAST_PATH`` and the model's
    parameters on the CPU its step runs fused (:func:`gn_det.cpu.fused_sgd`). Either keeps its step when a
    checkpoint's optimizer state is loaded (:class:`gn_det.cpu.sgd.SGDKeepingItsStep`). Logs the resulting groups."""
    optimizer = build_optimizer(cfg, model)
    if cpu_fast_path(cfg) and next(model.parameters()).device.type == "cpu":
        # Not on CUDA: detectron2's AMPTrainer unscales gradients before its gradient-clipping step, which a
        # fused step (it unscales inside) would skip.
        optimizer = maybe_add_gradient_clipping(cfg, fused_sgd(optimizer))
    else:  # detectron2's step, also when resumed from a fused checkpoint
        optimizer = maybe_add_gradient_clipping(cfg, sgd_keeping_its_step(optimizer))
    logger.info("Optimizer parameter groups:\n%s", param_group_table(model, optimizer))
    return optimizer


def scale_schedule_linearly(cfg):
    """Linear LR scaling from ``SOLVER.REFERENCE_IMS_PER_BATCH`` to ``SOLVER.IMS_PER_BATCH`` images, in place.

    LR × N/ref; iteration counts (max, steps, warm-up, checkpoint and eval periods) × ref/N, so the run sees
    the same number of images at the same LR per image. Afterwards the reference is N, so applying it to
    the dumped config again changes nothing. No-op unless ``SOLVER.LINEAR_LR_SCALING``.
    """
    solver = cfg.SOLVER
    if not solver.LINEAR_LR_SCALING or solver.IMS_PER_BATCH == solver.REFERENCE_IMS_PER_BATCH:
        return cfg
    factor = solver.IMS_PER_BATCH / solver.REFERENCE_IMS_PER_BATCH

    def iters(n):
        return max(1, int(round(n / factor))) if n > 0 else n

    logger.info("Linear LR scaling from %d to %d images per batch (x%.4g LR)",
                solver.REFERENCE_IMS_PER_BATCH, solver.IMS_PER_BATCH, factor)
    solver.BASE_LR = solver.BASE_LR * factor
    solver.MAX_ITER = iters(solver.MAX_ITER)
    solver.STEPS = tuple(iters(s) for s in solver.STEPS)
    solver.WARMUP_ITERS = iters(solver.WARMUP_ITERS)
    solver.CHECKPOINT_PERIOD = iters(solver.CHECKPOINT_PERIOD)
    cfg.TEST.EVAL_PERIOD = iters(cfg.TEST.EVAL_PERIOD)
    solver.REFERENCE_IMS_PER_BATCH = solver.IMS_PER_BATCH
    return cfg
