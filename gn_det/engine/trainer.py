"""gn-det's trainer: detectron2's DefaultTrainer with the paper's optimizer recipe, COCO evaluation,
results written as JSON, and CPU-friendly distributed training."""
import logging
import os
import resource
import weakref

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from gn_det.fileio import write_json_atomically
from gn_det.solver import build_gn_optimizer

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def peak_memory_mb(device):
    """Peak memory of this process: max allocated on CUDA, else the RSS high-water mark (Linux: KiB)."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemoryHook(HookBase):
    """Puts ``peak_memory_mb`` into the event storage each iteration (metrics.json, compare_runs)."""

    def __init__(self, device):
        self._device = device

    def after_step(self):
        self.trainer.storage.put_scalar("peak_memory_mb", peak_memory_mb(self._device), smoothing_hint=False)


class GNTrainer(DefaultTrainer):
    """DefaultTrainer with SGD groups logged as a table (γ/β decay ``SOLVER.WEIGHT_DECAY_NORM``),
    ``COCOEvaluator`` for box and mask AP, and ``OUTPUT_DIR/results.json`` after each evaluation.

    ``MODEL.PRECISION: fp16`` trains with detectron2's AMPTrainer (gradient scaler); bf16 needs no scaler.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ asks DDP for device_ids=[local_rank], which torch rejects for a CPU model, so
        # `--num-gpus 2` without CUDA would fail; this is the same construction with device_ids=None on CPU.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        fp16 = cfg.MODEL.PRECISION == "fp16" or cfg.SOLVER.AMP.ENABLED
        self._trainer = (AMPTrainer if fp16 else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks.insert(1, PeakMemoryHook(self.cfg.MODEL.DEVICE))  # after the timer, before the writers
        return hooks

    def train(self):
        try:
            return super().train()
        except FloatingPointError as err:
            # detectron2's message spans lines (it prints the loss dict); keep the offender on one line
            detail = " ".join(str(err).split())
            raise FloatingPointError(
                f"training diverged (NaN/Inf) at iteration {self.iter}: {detail} Checkpoints already in "
                f"{self.cfg.OUTPUT_DIR} are kept (lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS)"
            ) from None

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_gn_optimizer(cfg, model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # tasks are explicit: inferred from predictions, an untrained model with none would report no segm AP
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            # DefaultTrainer.test drops the dataset level when there is one test set; keep it in the file
            per_dataset = results if len(cfg.DATASETS.TEST) != 1 else {cfg.DATASETS.TEST[0]: results}
            write_results(cfg.OUTPUT_DIR, per_dataset)
        return results


def write_results(output_dir, results):
    """Write evaluation results to ``output_dir/results.json`` atomically (a crash never leaves half a file)."""
    path = os.path.join(output_dir, RESULTS_FILE)
    write_json_atomically(path, results)
    logger.info("Evaluation results written to %s", path)
