"""Record the distribution of one layer's features during training (the paper's Figure 3).

:class:`FeatureStatsHook` hooks a module of the model and, every ``period`` iterations, takes the percentiles of
what the training forward pass feeds into it or gets out of it; :class:`FeatureStatsTrainer` is GNTrainer with
that hook, and :func:`train_with_feature_stats` the body of ``tools/feature_stats.py train``. Capturing the
training forward costs no extra forward pass and measures exactly the features the norms normalize in training.
"""
import difflib
import functools
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase
from detectron2.layers import Conv2d
from detectron2.utils import comm

from gn_det.engine import GNTrainer, train_or_evaluate
from gn_det.errors import InputError

from .feature_stats import (
    FEATURE_STATS_FILE,
    PERCENTILES,
    feature_percentiles,
    read_feature_stats,
    write_feature_stats,
)

WHERE = ("output", "input")


def default_feature_layer(model):
    """The paper's choice, conv5_3 before normalization, for any gn-det ResNet: the last conv of res5, taken at
    the input of its norm (the raw conv output), or at the conv's output when it has no norm."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv2d) and ".res5." in f".{name}"]
    if not convs:
        raise InputError("the model has no res5 stage; choose the layer to record (--layer MODULE_PATH)")
    name, conv = convs[-1]
    return (f"{name}.norm", "input") if conv.norm is not None else (name, "output")


def find_module(model, path):
    """``model``'s submodule at ``path``; InputError naming the closest existing paths otherwise."""
    modules = dict(model.named_modules())
    if path not in modules:
        close = difflib.get_close_matches(path, [n for n in modules if n], n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"the model has no module {path!r} to record features of{hint}")
    return modules[path]


def resolve_feature_layer(model, layer=None, where=None):
    """(layer, where, module) that the hook records in ``model``: :func:`default_feature_layer` for
    ``layer=None``, the output of a given layer for ``where=None``; an InputError naming a wrong layer."""
    if layer is None:
        layer, default_where = default_feature_layer(model)
    else:
        default_where = "output"
    return layer, where or default_where, find_module(model, layer)


def check_hook_settings(where, period):
    if where is not None and where not in WHERE:
        raise InputError(f"where={where!r}; choose one of {', '.join(map(repr, WHERE))}")
    if period < 1:
        raise InputError(f"feature stats period={period} must be >= 1")


def earlier_feature_stats(output_dir, layer, where):
    """The ``feature_stats.json`` an earlier part of the run left in ``output_dir`` (None if none); an
    InputError when it records another layer, which a continued file would mix up."""
    path = os.path.join(output_dir, FEATURE_STATS_FILE)
    if not os.path.isfile(path):
        return None
    earlier = read_feature_stats(output_dir)
    if (earlier["layer"], earlier["where"]) != (layer, where):
        raise InputError(
            f"{path} records {earlier['layer']} ({earlier['where']}), not {layer} ({where}); use another "
            "OUTPUT_DIR or the same layer"
        )
    return earlier


class FeatureStatsHook(HookBase):
    """Every ``period`` iterations (and at the last), the percentiles (``PERCENTILES``), mean and std of the
    tensor the training forward passes into (``where="input"``) or gets out of (``"output"``) the module at
    ``layer``, appended to ``output_dir/feature_stats.json``.

    ``layer=None`` records :func:`default_feature_layer`; ``where=None`` is "output" for a given layer. The file
    is rewritten after every record, so a killed run keeps what it measured; a resumed run continues it. Only
    the main process records (its share of the batch). Register it before hooks that run forward passes after
    the step (evaluation, PreciseBN), which must not be measured.
    """

    def __init__(self, output_dir, layer=None, where=None, period=10):
        check_hook_settings(where, period)
        self._output_dir = output_dir
        self._layer, self._where, self._period = layer, where, period
        self._handle = None
        self._wanted = False  # capture in this iteration's forward
        self._captured = None
        self._stats = None

    def before_train(self):
        if not comm.is_main_process():
            return
        model = self.trainer.model
        model = model.module if isinstance(model, DistributedDataParallel) else model
        self._layer, self._where, module = resolve_feature_layer(model, self._layer, self._where)
        if self._where == "input":
            self._handle = module.register_forward_pre_hook(lambda _module, inputs: self._capture(inputs[0]))
        else:
            self._handle = module.register_forward_hook(lambda _module, _inputs, output: self._capture(output))
        self._stats = self._resumed_stats()

    def _resumed_stats(self):
        """The records of an earlier part of this run (before the iteration it resumes from), or none."""
        fresh = {"layer": self._layer, "where": self._where, "percentiles": list(PERCENTILES), "records": []}
        earlier = earlier_feature_stats(self._output_dir, self._layer, self._where)
        if earlier is not None:
            fresh["records"] = [r for r in earlier["records"] if r["iteration"] < self.trainer.start_iter]
        return fresh

    def _capture(self, value):
        if not self._wanted:
            return
        self._wanted = False  # the first call of the iteration: a module called twice is measured once
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{self._layer} ({self._where}) is a {type(value).__name__}, not a tensor; "
                             "choose a module that takes/returns one tensor")
        self._captured = feature_percentiles(value)

    def before_step(self):
        if self._handle is not None:
            it = self.trainer.iter
            self._wanted = it % self._period == 0 or it == self.trainer.max_iter - 1

    def after_step(self):
        self._wanted = False  # a module the training forward did not call is not measured in later passes
        if self._captured is not None:
            self._stats["records"].append({"iteration": self.trainer.iter, **self._captured})
            self._captured = None
            write_feature_stats(self._output_dir, self._stats)

    def after_train(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class FeatureStatsTrainer(GNTrainer):
    """GNTrainer that also records a layer's feature distribution (:class:`FeatureStatsHook`)."""

    def __init__(self, cfg, model=None, preloaded=None, layer=None, where=None, period=10):
        # GNTrainer.__init__ builds the hooks, so the hook must exist before it runs
        self._feature_stats_hook = FeatureStatsHook(cfg.OUTPUT_DIR, layer, where, period)
        super().__init__(cfg, model, preloaded)

    def build_hooks(self):
        # first: its after_step ends the capture before EvalHook/PreciseBN run their forward passes
        return [self._feature_stats_hook] + super().build_hooks()


def check_feature_stats_settings(layer, where, period, cfg, model):
    """Before anything is written: the hook's settings, the layer in the model, an earlier feature_stats.json
    in OUTPUT_DIR recording the same layer."""
    check_hook_settings(where, period)
    layer, where, _ = resolve_feature_layer(model, layer, where)
    earlier_feature_stats(cfg.OUTPUT_DIR, layer, where)


def train_with_feature_stats(args):
    """tools/train_net.py's ``train_or_evaluate`` with :class:`FeatureStatsTrainer`; ``args`` also carry
    ``layer``, ``where`` and ``period``. ``--eval-only`` evaluates as train_net does (nothing to record)."""
    return train_or_evaluate(
        args, functools.partial(FeatureStatsTrainer, layer=args.layer, where=args.where, period=args.period),
        check_model=functools.partial(check_feature_stats_settings, args.layer, args.where, args.period),
    )
