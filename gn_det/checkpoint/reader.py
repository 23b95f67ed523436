"""The one checked reader of weights files: nothing in a weights file runs when it is read.

Loading a checkpoint is the one place where a user's file could execute code, through unpickling. Every read
of weights in gn-det goes through :func:`read_weights`:

- ``.pkl`` (Detectron/Caffe2 weights, detectron2 model-zoo and gn-det-converted checkpoints) through
  :class:`WeightsUnpickler`, which builds only what weight files hold: numpy arrays and dtypes, numbers,
  strings, lists, tuples and dicts;
- ``.safetensors`` through ``safetensors`` (no pickle at all);
- anything else (``.pth``, ``.pt``, ``.pyth``) through ``torch.load(weights_only=True)``, torch's own
  restricted unpickler, which admits tensors, containers and primitive values.

A file that is missing, empty, truncated, not a weights file, or that names any other type, is one
:class:`gn_det.InputError` naming the file (and the type it tried to load); nothing of it runs.

Exported models (``gn_det.deploy``) are weights files too: :func:`read_torchscript`, :func:`read_onnx` and
:func:`read_openvino_ir` check the file (present, not empty, of its format) the same way before a runtime takes
it. A TorchScript file holds its graph as TorchScript, which the TorchScript interpreter runs (no Python is
unpickled or imported); an ONNX file is a protobuf, and OpenVINO IR an XML graph with a binary of weights, of
operators the runtime implements.
:class:`GNCheckpointer` is detectron2's ``DetectionCheckpointer`` reading through it.
"""
import io
import logging
import pickle
import re
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from gn_det.errors import InputError
from gn_det.fileio import AtomicWrites, read_input_file

logger = logging.getLogger(__name__)

# (module, name) of every global a weights pickle may name. numpy arrays pickle as
# numpy.core.multiarray._reconstruct(numpy.ndarray, shape, dtype) + setstate; numpy 2 writes numpy._core.
# At protocol 5 numpy writes numpy._core.numeric._frombuffer(buffer, dtype, shape, order).
# Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"), a pure data transform.
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
ALLOWED_GLOBALS = frozenset(
    [(module, name) for module in _NUMPY_MODULES for name in ("_reconstruct", "scalar")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")]
)


class UnsafeGlobal(pickle.UnpicklingError):
    """A pickle that names a global outside :data:`ALLOWED_GLOBALS`."""


class WeightsUnpickler(pickle.Unpickler):
    """A pickle reader that builds only the types weight files hold (:data:`ALLOWED_GLOBALS`, plus the
    primitive values and containers pickle builds without naming a global)."""

    def find_class(self, module, name):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeGlobal(f"{module}.{name}")

    def persistent_load(self, pid):
        raise UnsafeGlobal(f"a persistent object {pid!r}")


def _one_line(err):
    return " ".join(str(err).split()) or type(err).__name__


def read_weights(path, what="weights file"):
    """The object stored in the weights file ``path`` (a path or a URL detectron2's PathManager resolves),
    read without running any of its code; an InputError naming ``what`` and the file otherwise."""
    local = local_weights_path(path)
    data = _read_bytes(path, what)
    try:
        if local.endswith(".pkl"):
            return WeightsUnpickler(io.BytesIO(data), encoding="latin1").load()
        if local.endswith(".safetensors"):
            try:
                return load_safetensors(data)
            except SafetensorError as err:  # its header parser's one error type
                raise ValueError(str(err)) from None
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except UnsafeGlobal as err:
        raise InputError(
            f"{what} {path} is refused: it would load {err}, which is not weights (only tensors, numpy arrays, "
            "numbers, strings and containers are read)"
        ) from None
    except pickle.UnpicklingError as err:
        # torch's weights_only unpickler names the refused global in a long message
        message = _one_line(err)
        if "weights_only" in message or "Unsupported global" in message:
            refused = re.search(r"GLOBAL (\S+)", message)
            refused = refused.group(1).rstrip(":,.") if refused else ""
            raise InputError(
                f"{what} {path} is refused: it would load {refused or 'an object'}, which is not weights "
                "(torch.load with weights_only=True)"
            ) from None
        raise InputError(f"{what} {path} is not a readable checkpoint ({message[:200]})") from None
    except (EOFError, ValueError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError, IndexError, KeyError,
            TypeError, AttributeError, ImportError, OverflowError, MemoryError) as err:
        # what a truncated or foreign file raises from pickle, torch's zip reader or safetensors' header parser
        raise InputError(f"{what} {path} is not a readable checkpoint ({_one_line(err)[:200]})") from None


def _read_bytes(path, what):
    """The bytes of file ``path`` (:func:`gn_det.fileio.read_input_file`), which must not be empty."""
    data = read_input_file(local_weights_path(path), what)
    if not data:
        raise InputError(f"{what} {path} is empty")
    return data


def read_torchscript(path, extra_files=(), what="TorchScript file"):
    """``(module, {name: text})``: the TorchScript module of ``path`` on the CPU and the extra files named
    ``extra_files`` ("" where absent); an InputError naming the file if it is not a TorchScript archive."""
    data = _read_bytes(path, what)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise InputError(f"{what} {path} is not a TorchScript file (not a zip archive)")
    extras = {name: "" for name in extra_files}
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extras)
    except (RuntimeError, ValueError, zipfile.BadZipFile) as err:
        raise InputError(f"{what} {path} is not a readable TorchScript file ({_one_line(err)[:200]})") from None
    return module, {name: value.decode() if isinstance(value, bytes) else value for name, value in extras.items()}


def read_onnx(path, what="ONNX file"):
    """``(serialized bytes, onnx.ModelProto)`` of the ONNX file ``path``, parsed and checked by ``onnx``; an
    InputError naming the file if it is not an ONNX model."""
    import onnx
    from google.protobuf.message import DecodeError

    data = _read_bytes(path, what)
    try:
        model = onnx.load_model_from_string(data)
        if not model.graph.node:
            raise ValueError("no graph")
        onnx.checker.check_model(model)
    except (DecodeError, ValueError, RuntimeError, onnx.checker.ValidationError) as err:
        raise InputError(f"{what} {path} is not a readable ONNX model ({_one_line(err)[:200]})") from None
    return data, model


def read_openvino_ir(path, what="OpenVINO IR file"):
    """The ``openvino.Model`` of the OpenVINO IR ``path`` (``.xml``, its weights in the ``.bin`` beside it); an
    InputError naming the file if either is missing or not OpenVINO IR."""
    import openvino

    weights = path[:-len(".xml")] + ".bin" if path.endswith(".xml") else ""
    if not weights:
        raise InputError(f"{what} {path} is not OpenVINO IR (its name does not end in .xml)")
    # a graph without constants has an empty weights file
    graph, tensors = _read_bytes(path, what), read_input_file(weights, f"{what} {path}: its weights file")
    try:
        return openvino.Core().read_model(graph, tensors)
    except RuntimeError as err:
        raise InputError(f"{what} {path} is not readable OpenVINO IR ({_one_line(err)[:200]})") from None


def read_checkpoint(path, what="weights file"):
    """:func:`read_weights` for a file detectron2's checkpointer loads: a dict whose parameters
    (:func:`model_state`) are a state dict, names to tensors or numeric numpy arrays."""
    checkpoint = read_weights(path, what)
    if not isinstance(checkpoint, dict):
        raise InputError(f"{what} {path} holds a {type(checkpoint).__name__}, not a checkpoint")
    entry, state = model_state(local_weights_path(path), checkpoint)
    where = f"{what} {path}" + (f": its {entry!r} entry" if entry else "")
    if not isinstance(state, dict):
        raise InputError(f"{where} is a {type(state).__name__}, not a state dict (parameter names to tensors)")
    for name, value in state.items():
        if not isinstance(name, str):
            raise InputError(f"{where} has the key {name!r}, not a parameter name")
        numeric_array = isinstance(value, np.ndarray) and value.dtype.kind in "biuf"
        if not (isinstance(value, torch.Tensor) or numeric_array):
            kind = f"numpy {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__
            raise InputError(f"{where}: {name} is not a tensor or a numeric array ({kind})")
    return checkpoint


def model_state(local_path, checkpoint):
    """``(entry, parameters)``: the entry of a checkpoint read from ``local_path`` that detectron2's
    ``DetectionCheckpointer._load_file`` loads into the model ("" for the whole dict), by file type as it
    dispatches: ``.pkl`` ``"model"`` (detectron2's own) or ``"blobs"`` (Detectron's), ``.pyth``
    ``"model_state"`` (pycls), torch files ``"model"`` when present."""
    if local_path.endswith(".pkl"):
        entry = "model" if "model" in checkpoint and "__author__" in checkpoint else ""
        entry = entry or ("blobs" if "blobs" in checkpoint else "")
    elif local_path.endswith(".pyth"):
        if "model_state" not in checkpoint:
            raise InputError(f"weights file {local_path} is a .pyth file without 'model_state' (pycls's format)")
        entry = "model_state"
    else:
        entry = "model" if "model" in checkpoint else ""
    return entry, checkpoint[entry] if entry else checkpoint


def _tensors(state):
    """Every tensor in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _tensors(value)


def local_weights_path(path):
    """The local file detectron2's checkpointer reads for ``path`` (a URL's query removed, a URL downloaded)."""
    return PathManager.get_local_path(urlparse(path)._replace(query="").geturl())


class GNCheckpointer(DetectionCheckpointer):
    """detectron2's ``DetectionCheckpointer`` whose every read goes through :func:`read_checkpoint` and every
    write is atomic (:class:`gn_det.fileio.AtomicWrites`: a checkpoint or ``last_checkpoint`` is renamed into
    place only once complete, so ``last_checkpoint`` always names a complete checkpoint).

    Its loading, matching and saving are otherwise the parent's (the parent unpickles ``.pkl`` files in full
    and writes in place). ``strict``: weights must fit the model (evaluation, prediction); resuming from the
    last checkpoint is always strict. Beyond what detectron2 tolerates by design (``pixel_mean``/``pixel_std``,
    old anchors), a missing, unexpected or differently shaped parameter is then an InputError naming the file
    and the first of them. ``preloaded``: ``{local path: content}`` of a file already read (by a run's checks),
    so the file is read once.
    """

    def __init__(self, model, save_dir="", *, strict=False, preloaded=None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.path_manager = AtomicWrites(self.path_manager)
        self.strict = strict
        self.preloaded = dict(preloaded or {})
        self._strict_load = strict
        self._loading = None

    def _read(self, filename):
        if filename in self.preloaded:
            data = self.preloaded.pop(filename)
            # fvcore's load pops entries of the dict it is given: the caller's copy stays whole
            return {**data, "model": dict(data["model"])} if isinstance(data.get("model"), dict) else dict(data)
        return read_checkpoint(filename)

    def resume_or_load(self, path, *, resume=True):
        self._strict_load = self.strict or (resume and self.has_checkpoint())
        return super().resume_or_load(path, resume=resume)

    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None
            self._strict_load = self.strict

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self._strict_load and incompatible is not None:
            problems = (
                [f"{key} is missing" for key in incompatible.missing_keys]
                + [f"{key} is not in the model" for key in incompatible.unexpected_keys]
                + [f"{key} has shape {tuple(ckpt)} in the file but {tuple(model)} in the model"
                   for key, ckpt, model in incompatible.incorrect_shapes]
            )
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise InputError(f"weights file {self._loading} does not fit the model: {problems[0]}{more}")
        return incompatible

    def save(self, name, **kwargs):
        try:
            super().save(name, **kwargs)
        except InputError as err:  # a full disk (gn_det.fileio); name what the checkpoint needs
            state = [self.model.state_dict()] + [obj.state_dict() for obj in self.checkpointables.values()]
            needed = sum(t.numel() * t.element_size() for s in state for t in _tensors(s))
            last = self.get_checkpoint_file() if self.has_checkpoint() else "no checkpoint"
            raise InputError(f"{err} (checkpoint {name}.pth needs about {needed / 2**20:.1f} MiB; last_checkpoint "
                             f"still names {last}: free space, then continue with --resume)") from None

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            data = self._read(filename)
            # The rest follows DetectionCheckpointer._load_file's ".pkl" branch.
            if "model" in data and "__author__" in data:
                self.logger.info("Reading a file from '{}'".format(data["__author__"]))
                return data
            if "blobs" in data:  # Detection models have "blobs", ImageNet models don't
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            # follows DetectionCheckpointer._load_file's ".pyth" branch (pycls), which calls torch.load itself
            data = self._read(filename)  # has "model_state" (read_checkpoint)
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # torch files: read through _torch_load

    def _torch_load(self, f):
        return self._read(f)
