"""gn-det's trainer: detectron2's DefaultTrainer with the paper's optimizer recipe, COCO evaluation,
results written as JSON, and CPU-friendly distributed training."""
import contextlib
import logging
import os
import resource
import weakref

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from gn_det.checkpoint.reader import GNCheckpointer
from gn_det.data import CheckedDatasetMapper
from gn_det.errors import InputError, one_line
from gn_det.fileio import AtomicAppendFile, write_json_atomically
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


def ddp_device_arguments(device):
    """The ``device_ids`` argument of detectron2's ``create_ddp_model`` for a model on ``device``.

    ``create_ddp_model`` (engine/defaults.py) passes ``device_ids=[local_rank]`` unless told otherwise, which
    torch's DistributedDataParallel rejects for a CPU model, so ``--num-gpus 2`` without CUDA would fail: a CPU
    model gets ``device_ids=None``. Other devices keep detectron2's default (no argument).
    """
    return {"device_ids": None} if torch.device(device).type == "cpu" else {}


class AtomicJSONWriter(JSONWriter):
    """detectron2's JSONWriter (``metrics.json``: one JSON object per line, appended) whose appends reach the file
    through :class:`gn_det.fileio.AtomicAppendFile`, so a reader never sees a cut line."""

    def __init__(self, json_file, window_size=20):
        # follows JSONWriter.__init__, with the file handle gn-det's
        self._file_handle = AtomicAppendFile(json_file)
        self._window_size = window_size
        self._last_write = -1


def gn_writers(output_dir, max_iter):
    """detectron2's ``default_writers`` (engine/defaults.py) with :class:`AtomicJSONWriter` for metrics.json."""
    PathManager.mkdirs(output_dir)
    return [CommonMetricPrinter(max_iter), AtomicJSONWriter(os.path.join(output_dir, "metrics.json")),
            TensorboardXWriter(output_dir)]


def log_input_errors_in_one_line(record):
    """Logging filter for detectron2's training loop, which logs any exception that ends training with its
    traceback ("Exception during training:"): bad input (and a NaN/Inf loss) is logged as its one line."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, (InputError, FloatingPointError)):
        record.msg, record.args = f"{record.msg} {type(error).__name__}: {' '.join(one_line(error).split())}", ()
        record.exc_info = record.exc_text = None
    return True


@contextlib.contextmanager
def training_errors_in_one_line(trainer, output_dir, remedy):
    """While detectron2's training loop runs ``trainer``: bad input is logged as one line, and a NaN/Inf loss
    (detectron2's FloatingPointError) becomes an InputError naming the iteration, the kept checkpoints and
    ``remedy`` (the config keys to change)."""
    train_loop_logger = logging.getLogger(TrainerBase.__module__)
    train_loop_logger.addFilter(log_input_errors_in_one_line)
    try:
        yield
    except FloatingPointError as err:
        # detectron2's message spans lines (it prints the loss dict); keep the offender on one line
        detail = " ".join(str(err).split())
        raise InputError(
            f"training diverged (NaN/Inf) at iteration {trainer.iter}: {detail} Checkpoints already in "
            f"{output_dir} are kept ({remedy})"
        ) from None
    finally:
        train_loop_logger.removeFilter(log_input_errors_in_one_line)


class AnyDeviceTrainer(DefaultTrainer):
    """detectron2's DefaultTrainer, also on several CPU processes, and for a model built before the trainer.

    ``__init__`` follows ``DefaultTrainer.__init__`` (detectron2/engine/defaults.py), which has no seam for either:
    it always builds the model itself, and gives ``create_ddp_model`` no ``device_ids``, so that it passes
    ``[local_rank]``, which torch's DistributedDataParallel rejects for a CPU model. Here ``model`` may be given,
    and ``create_ddp_model`` gets :func:`ddp_device_arguments`. The checkpointer comes from
    :meth:`build_checkpointer`. Nothing else differs.
    """

    def __init__(self, cfg, model=None):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg) if model is None else model
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_device_arguments(cfg.MODEL.DEVICE))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(model, cfg.OUTPUT_DIR)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_checkpointer(self, model, output_dir):
        return DetectionCheckpointer(model, output_dir, trainer=weakref.proxy(self))


class GNTrainer(AnyDeviceTrainer):
    """DefaultTrainer with SGD groups logged as a table (γ/β decay ``SOLVER.WEIGHT_DECAY_NORM``),
    ``COCOEvaluator`` for box and mask AP, and ``OUTPUT_DIR/results.json`` after each evaluation.

    ``MODEL.PRECISION: fp16`` trains with detectron2's AMPTrainer (gradient scaler); bf16 needs no scaler.
    Images are read by :class:`CheckedDatasetMapper` (one that cannot be decoded is an InputError naming it, or
    in training skipped with a warning under ``DATALOADER.SKIP_UNDECODABLE_IMAGES``);
    a NaN/Inf loss is an InputError naming the iteration.
    """

    def __init__(self, cfg, model=None, preloaded=None):
        """``model``: the model the run's set-up built and checked (built here when None); ``preloaded``: the
        weights file the set-up already read, ``{local path: its content}`` (:class:`GNCheckpointer`, which runs
        nothing in a weights file)."""
        if cfg.MODEL.PRECISION == "fp16" and not cfg.SOLVER.AMP.ENABLED:
            # fp16 trains with a gradient scaler: detectron2's AMPTrainer, which SOLVER.AMP.ENABLED selects
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.AMP.ENABLED = True
            cfg.freeze()
        self._preloaded = preloaded
        super().__init__(cfg, model)

    def build_checkpointer(self, model, output_dir):
        checkpointer = GNCheckpointer(model, output_dir, trainer=weakref.proxy(self), preloaded=self._preloaded)
        self._preloaded = None  # the checkpointer holds the content until it loads it
        return checkpointer

    def build_writers(self):
        return gn_writers(self.cfg.OUTPUT_DIR, self.max_iter)

    def build_hooks(self):
        hooks = super().build_hooks()
        hooks.insert(1, PeakMemoryHook(self.cfg.MODEL.DEVICE))  # after the timer, before the writers
        return hooks

    def train(self):
        with training_errors_in_one_line(self, self.cfg.OUTPUT_DIR,
                                         "lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS"):
            return super().train()

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = CheckedDatasetMapper(cfg, is_train=True, dataset_names=cfg.DATASETS.TRAIN,
                                      skip_undecodable=cfg.DATALOADER.SKIP_UNDECODABLE_IMAGES)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False, dataset_names=[dataset_name])
        )

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
