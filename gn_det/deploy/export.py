"""Export a gn-det model to TorchScript or ONNX, built on detectron2.export.

The model is wrapped in detectron2's ``TracingAdapter`` with detectron2's export protocol (``tools/deploy/
export_model.py``: a GeneralizedRCNN runs ``model.inference(inputs, do_postprocess=False)``, so masks stay per
RoI and mask pasting is left to the caller; RetinaNet runs its forward). The file records, beside the graph, what
the loaders need: the output schema (JSON, :mod:`gn_det.deploy.schema`), the input format and the autocast
precision the traced graph was recorded under.

- TorchScript (``torch.jit.trace``) takes every model, the CPU fast path and bf16 / channels_last included: the
  fast path's pieces have a trace-friendly form (``gn_det/cpu``), and the graph is traced with TorchScript's own
  autocast pass off, so it records eager autocast's casts; the loader runs it under the same autocast.
- ONNX takes fp32 models without the fast path (:func:`check_exportable`). Its GroupNorm form is chosen by the
  runtime the file is for (:data:`ONNX_TARGETS`).
- ``openvino`` is the OpenVINO ONNX file written as OpenVINO IR, with the RoI coordinates kept in f32 when
  OpenVINO runs the rest in bf16 (:mod:`gn_det.deploy.openvino_ir`); ``openvino-int8`` is the same quantized to
  int8 by NNCF on calibration images (:mod:`gn_det.deploy.quantize`).
"""
import collections.abc
import json
import logging
import os

import torch

from detectron2.export import TracingAdapter, dump_torchscript_IR
from detectron2.modeling import GeneralizedRCNN

from gn_det.config import get_gn_cfg, load_lazy_config
from gn_det.data import register_datasets
from gn_det.errors import InputError
from gn_det.fileio import atomic_paths

from .schema import METADATA_FILE, METADATA_KEY, eager_autocast_in_torchscript, schema_to_json

logger = logging.getLogger(__name__)

FORMATS = ("torchscript", "onnx", "openvino", "openvino-int8")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx", "openvino": "model.xml",
              "openvino-int8": "model_int8.xml"}  # OpenVINO IR: the .xml graph, its weights in the .bin beside it
# The ONNX opset per runtime (why, with the measurement: docs/DEPLOY.md, "GroupNorm in ONNX"): ONNX Runtime has no
# CPU kernel for GroupNormalization-21 and runs its function body, so it gets the opset-17 decomposition
# (Reshape -> InstanceNormalization -> Reshape -> Mul -> Add); OpenVINO has a GroupNormalization kernel.
ONNX_TARGETS = {"onnxruntime": 17, "openvino": 21}
# the opset torch's TorchScript-based ONNX exporter writes before GroupNorm is fused for opset 21 (its last)
ONNX_EXPORT_OPSET_FOR_21 = 20


def fast_path_settings(model):
    """The CPU-specific settings the built ``model`` carries, as the config keys that set them (empty when none).

    Read from the modules (so LazyConfig models are covered): gn-det's meta-architectures' precision and layout,
    and any piece of ``gn_det.cpu`` (``MODEL.CPU_FAST_PATH``).
    """
    from gn_det.cpu import (CPUInplaceReLU, LayoutPreservingROIPooler, NCHWCopyGroupNorm, RoIChunkedInference,
                            SparseMatrixROIAlign, TopScoresFirstOutputLayers)

    settings = []
    if getattr(model, "precision", "fp32") != "fp32":
        settings.append(f"MODEL.PRECISION={model.precision!r}")
    if getattr(model, "channels_last", False):
        settings.append("MODEL.CHANNELS_LAST=True")
    pieces = (CPUInplaceReLU, LayoutPreservingROIPooler, NCHWCopyGroupNorm, SparseMatrixROIAlign,
              TopScoresFirstOutputLayers)
    if any(isinstance(m, pieces) or (isinstance(m, RoIChunkedInference) and m.inference_chunk_bytes)
           for m in model.modules()):
        settings.append("MODEL.CPU_FAST_PATH=True")
    return settings


def check_exportable(model, fmt, target="onnxruntime"):
    """Raise a one-line InputError unless ``model`` exports to ``fmt`` (for ONNX, for runtime ``target``)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if fmt == "torchscript":
        return
    if fmt.startswith("openvino"):
        target = "openvino"
    if target not in ONNX_TARGETS:
        raise InputError(f"--onnx-runtime {target!r} is not a runtime; choose one of {', '.join(ONNX_TARGETS)}")
    settings = fast_path_settings(model)
    if settings:
        raise InputError(
            f"--format {fmt}: the model has {', '.join(settings)}, PyTorch-CPU settings that ONNX does not take; "
            "export to ONNX without them (MODEL.PRECISION fp32 MODEL.CHANNELS_LAST False MODEL.CPU_FAST_PATH "
            "False: the runtime picks its own kernels and precision), or to TorchScript with them (docs/DEPLOY.md)")


def export_inference(model):
    """detectron2's export protocol as a ``TracingAdapter`` inference function (``None``: call the model)."""
    if isinstance(model, GeneralizedRCNN):
        def inference(model, inputs):
            # as detectron2's tools/deploy/export_model.py: ROI masks, no pasting
            return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]
        return inference
    return None


def export_model(model, image, fmt, output_dir, target="onnxruntime", input_format="BGR", calibration=None):
    """Trace ``model`` (eval mode) on ``image`` (CHW float, resized, the model's input format) and write
    ``output_dir/`` + ``FILE_NAMES[fmt]`` through a temporary file. Returns its path.

    ``target`` is the runtime an ONNX file is for (:data:`ONNX_TARGETS`); ``openvino-int8`` is calibrated on
    ``calibration`` (images as ``image``, default ``[image]``, see :func:`~.quantize.quantize_to_int8`). Checked
    before anything is written.
    """
    check_exportable(model, fmt, target)
    if fmt.startswith("openvino"):
        import tempfile

        import openvino

        from .openvino_ir import write_ir
        from .quantize import quantize_to_int8

        path = os.path.join(output_dir, FILE_NAMES[fmt])
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path, metadata = trace_to_file(model, image, "onnx", tmp, "openvino", input_format)
            metadata = {**metadata, "format": fmt}
            ir = openvino.Core().read_model(onnx_path)
            if fmt == "openvino-int8":
                images = calibration or [image]
                ir = quantize_to_int8(ir, images)
                metadata["quantization"] = f"nncf int8, {len(images)} images"
            write_ir(ir, path, metadata)
        logger.info("wrote %s", path)
        return path
    return trace_to_file(model, image, fmt, output_dir, target, input_format)[0]


def trace_to_file(model, image, fmt, output_dir, target, input_format):
    """:func:`export_model` for TorchScript and ONNX: ``(path, metadata stored in the file)``."""
    model = model.eval()
    adapter = TracingAdapter(model, [{"image": image}], export_inference(model)).eval()  # the ONNX exporter restores its mode
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    metadata = {"format": fmt, "input_format": input_format, "autocast": getattr(model, "precision", "fp32"),
                "meta_architecture": type(model).__name__, "image_shape": list(image.shape)}
    with atomic_paths(path) as (tmp,):
        if fmt == "torchscript":
            with eager_autocast_in_torchscript(), torch.no_grad():
                traced = torch.jit.trace(adapter, (image,), check_trace=False)
            metadata["outputs_schema"] = schema_to_json(adapter.outputs_schema)
            torch.jit.save(traced, tmp, _extra_files={METADATA_FILE: json.dumps(metadata)})
        else:
            metadata["opset"] = ONNX_TARGETS[target]
            metadata["onnx_runtime"] = target
            write_onnx(adapter, image, tmp, target, metadata)
    if fmt == "torchscript":
        dump_torchscript_IR(traced, output_dir)  # detectron2's readable dumps of the graph, beside the file
    logger.info("wrote %s (outputs: %s)", path, adapter.outputs_schema)
    return path, metadata


def write_onnx(adapter, image, path, target, metadata):
    """torch's ONNX export of ``adapter`` at the opset of ``target``, with gn-det's metadata."""
    import onnx

    opset = ONNX_TARGETS[target]
    export_opset = min(opset, ONNX_EXPORT_OPSET_FOR_21)
    torch.onnx.register_custom_op_symbolic("aten::group_norm", group_norm_symbolic, export_opset)
    try:
        with torch.no_grad():
            torch.onnx.export(adapter, (image,), path, opset_version=export_opset, dynamo=False,
                              input_names=["image"], dynamic_axes={"image": {1: "height", 2: "width"}})
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::group_norm", export_opset)
    metadata["outputs_schema"] = schema_to_json(adapter.outputs_schema)
    model = onnx.load(path)
    if opset > export_opset:
        model = onnx.version_converter.convert_version(model, opset)
        metadata["fused_group_norms"] = fuse_group_norms(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, path)


def group_norm_symbolic(g, input, num_groups, weight, bias, eps, cudnn_enabled):
    """torch's ONNX decomposition of GroupNorm (symbolic_opset9.group_norm: Reshape -> InstanceNormalization ->
    Reshape -> Mul -> Add) that also runs on an empty batch (a mask head given no detection).

    torch reshapes to ``[0, G, -1]``, which ONNX Runtime cannot resolve for 0 samples (0 elements, -1 unknown);
    this reshapes to ``[-1, G, C/G * H * W]``, whose known dims are never 0. Same values otherwise.
    """
    from torch.onnx import symbolic_helper, symbolic_opset9

    num_groups = symbolic_helper._maybe_get_const(num_groups, "i")
    eps = symbolic_helper._maybe_get_const(eps, "f")
    channels = symbolic_helper._get_tensor_dim_size(input, 1)
    rank = symbolic_helper._get_tensor_rank(input)
    if channels is None or rank is None:
        return symbolic_opset9.group_norm(g, input, num_groups, weight, bias, eps, cudnn_enabled)
    shape = g.op("Shape", input)
    length = g.op("Constant", value_t=torch.tensor([channels // num_groups], dtype=torch.int64))
    for dim in range(2, rank):
        length = g.op("Mul", length, g.op("Gather", shape, g.op("Constant", value_t=torch.tensor([dim]))))
    grouped = g.op("Concat", g.op("Constant", value_t=torch.tensor([-1, num_groups], dtype=torch.int64)), length,
                   axis_i=0)
    dtype = torch.onnx.JitScalarType.from_value(input).dtype()
    normalized = g.op("InstanceNormalization", g.op("Reshape", input, grouped),
                      g.op("Constant", value_t=torch.ones(num_groups, dtype=dtype)),
                      g.op("Constant", value_t=torch.zeros(num_groups, dtype=dtype)), epsilon_f=eps)
    norm = g.op("Reshape", normalized, shape)
    axes = list(range(1, rank - 1))
    if weight is not None and not symbolic_helper._is_none(weight):
        norm = g.op("Mul", norm, symbolic_helper._unsqueeze_helper(g, weight, axes))
    if bias is not None and not symbolic_helper._is_none(bias):
        norm = g.op("Add", norm, symbolic_helper._unsqueeze_helper(g, bias, axes))
    return norm


def fuse_group_norms(model):
    """Replace, in place, each GroupNorm that torch's exporter decomposed (Reshape(x, [0, G, -1]) ->
    InstanceNormalization(ones, zeros) -> Reshape(Shape(x)) -> Mul(gamma) -> Add(beta)) by one ONNX
    GroupNormalization-21 node with per-channel scale and bias. Returns the number fused."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {init.name: init for init in graph.initializer}

    def constant(name):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Identity":  # the exporter shares equal constants through these
            return constant(node.input[0])
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(name, op_type):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    fused, remove, new_nodes = 0, set(), {}
    for norm in graph.node:
        if norm.op_type != "InstanceNormalization":
            continue
        reshape_in = producers.get(norm.input[0])
        scale, bias = constant(norm.input[1]), constant(norm.input[2])
        if (reshape_in is None or reshape_in.op_type != "Reshape" or consumers[reshape_in.output[0]] != [norm]
                or scale is None or bias is None
                or not (scale == 1).all() or not (bias == 0).all()):
            continue
        reshape_out = only_consumer(norm.output[0], "Reshape")
        mul = reshape_out and only_consumer(reshape_out.output[0], "Mul")
        add = mul and only_consumer(mul.output[0], "Add")
        gamma = mul and constant(mul.input[1])
        beta = add and constant(add.input[1])
        if add is None or gamma is None or beta is None or gamma.ndim != 3 or beta.ndim != 3:
            continue
        x = reshape_in.input[0]
        epsilon = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        scale_name, bias_name = f"{norm.name or norm.output[0]}_gn_scale", f"{norm.name or norm.output[0]}_gn_bias"
        graph.initializer.extend([numpy_helper.from_array(gamma.reshape(-1), scale_name),
                                  numpy_helper.from_array(beta.reshape(-1), bias_name)])
        new_nodes[id(add)] = helper.make_node("GroupNormalization", [x, scale_name, bias_name], list(add.output),
                                              num_groups=len(scale), epsilon=epsilon)
        remove.update({id(reshape_in), id(norm), id(reshape_out), id(mul), id(add)})
        fused += 1
    kept = []
    for node in graph.node:
        if id(node) in new_nodes:
            kept.append(new_nodes[id(node)])
        elif id(node) not in remove:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    # Constants and shape nodes only the fused nodes read are left for the runtime's dead-code elimination
    onnx.checker.check_model(model)
    return fused


def sample_image(predictor, config_file, opts=(), image_path=None):
    """The traced call's input: ``image_path`` (``--sample-image``) or the first image of the config's test set,
    read and resized as the predictor does (detectron2's export_model.py takes the same two)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    from gn_det.predict import check_image

    if image_path is None:
        from .evaluate import test_dataset

        _, name = test_dataset(config_file, opts)
        records = DatasetCatalog.get(name)
        if not records:
            raise InputError(f"dataset {name!r} has no image to trace with; give --sample-image")
        image_path = records[0]["file_name"]
    check_image(image_path)
    return predictor.model_input(read_image(image_path, format="RGB"))["image"]


class ModelInputs(collections.abc.Sequence):
    """Image files read and resized as ``predictor`` does, one at a time when asked (calibration reads them more
    than once; holding a COCO-sized set in memory would not fit)."""

    def __init__(self, predictor, files):
        self.predictor, self.files = predictor, list(files)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        from detectron2.data.detection_utils import read_image

        return self.predictor.model_input(read_image(self.files[index], format="RGB"))["image"]


def calibration_files(config_file, opts, count):
    """The first ``count`` image files of the config's training set (``DATASETS.TRAIN[0]`` /
    ``dataloader.train.dataset.names``), checked as a run checks its datasets, each a readable image."""
    from detectron2.data import DatasetCatalog

    from gn_det.engine import check_dataset
    from gn_det.engine.lazy_train import dataset_names
    from gn_det.predict import check_image

    if config_file.endswith(".py"):
        names = dataset_names(load_lazy_config(config_file, opts), "train")
    else:
        cfg = get_gn_cfg(config_file, list(opts))
        register_datasets(cfg.DATASETS.REGISTER)
        names = [("DATASETS.TRAIN", name) for name in cfg.DATASETS.TRAIN]
    source = f"{config_file} (--format openvino-int8 calibrates on the training set)"
    if not names:
        raise InputError(f"{source}: the config names no training dataset")
    key, name = names[0]
    check_dataset(name, key, source)
    files = [record["file_name"] for record in DatasetCatalog.get(name)[:count]]
    if not files:
        raise InputError(f"{source}: dataset {name!r} has no image")
    for path in files:
        check_image(path)
    return files


def export_from_config(config_file, fmt, output_dir, opts=(), target="onnxruntime", sample_image_path=None,
                       run_eval=False, calibration_images=300):
    """config + weights (``MODEL.WEIGHTS`` / ``train.init_checkpoint``, read through GNCheckpointer) -> exported
    file in ``output_dir``; with ``run_eval``, its COCO AP on the config's test set, run from the file.
    ``openvino-int8`` calibrates on the first ``calibration_images`` images of the training set.
    Returns ``(path, metrics or None)``. Every input is checked before anything is written (the evaluation's
    test set included); an image of the test set that cannot be decoded is found, as one line naming it, when
    the evaluation reads it. The export (and evaluation) files are written in a staging folder that replaces
    nothing of an earlier export until everything has been written."""
    from gn_det.fileio import staged_folder, write_json_atomically
    from gn_det.predict import load_predictor

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if not os.path.isfile(config_file):
        raise InputError(f"--config-file: {config_file} is not a file")
    weights = config_weights(config_file, opts)
    # the config's precision as asked, whatever this CPU computes well: the file is for the machine that serves it
    predictor = load_predictor(config_file, weights, opts, device="cpu", keep_precision=True)
    check_exportable(predictor.model, fmt, target)
    if run_eval:
        from .evaluate import test_dataset

        # the evaluation's test set too: a run that cannot evaluate must not replace an earlier export
        test_dataset(config_file, opts, evaluating=True)
    image = sample_image(predictor, config_file, opts, sample_image_path)
    calibration = None
    if fmt == "openvino-int8":
        if calibration_images < 1:
            raise InputError(f"--calibration-images {calibration_images}: give at least 1")
        calibration = ModelInputs(predictor, calibration_files(config_file, opts, calibration_images))
    from .evaluate import evaluate
    from .runtimes import load_exported

    with staged_folder(output_dir) as staging:
        staged = export_model(predictor.model, image, fmt, staging, target, predictor.input_format, calibration)
        metrics = evaluate(load_exported(staged), config_file, opts, staging) if run_eval else None
    path = os.path.join(output_dir, os.path.relpath(staged, staging))
    if run_eval:
        write_json_atomically(os.path.join(output_dir, "eval.json"), {"file": path, "metrics": metrics})
    return path, metrics


def config_weights(config_file, opts):
    """The weights a config names: YAML ``MODEL.WEIGHTS``, Python ``train.init_checkpoint``, after overrides."""
    if config_file.endswith(".py"):
        cfg = load_lazy_config(config_file, opts)
        weights, key = cfg.get("train", {}).get("init_checkpoint", ""), "train.init_checkpoint"
    else:
        weights, key = get_gn_cfg(config_file, list(opts)).MODEL.WEIGHTS, "MODEL.WEIGHTS"
    if not weights:
        raise InputError(f"{key} is empty: give the weights to export ({key} FILE)")
    return weights
