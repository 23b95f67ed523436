"""Run an exported gn-det model: TorchScript, ONNX Runtime or OpenVINO, each returning detectron2 ``Instances``.

:class:`ExportedDetector` is called like a detectron2 model (a list of ``{"image", "height", "width"}``, the
image resized and in the model's input format) and returns ``[{"instances": Instances}]`` in the original image
size: the backend runs the file, detectron2's output schema stored in it rebuilds the ``Instances``, and
detectron2's ``detector_postprocess`` rescales them and pastes the masks, as detectron2's
``tools/deploy/export_model.py`` does for evaluation. So ``inference_on_dataset`` and gn-det's predictor take
every backend the same way. Every file is read through ``gn_det.checkpoint.reader``.
"""
import json
import os

import numpy as np
import torch

from detectron2.modeling.postprocessing import detector_postprocess

from gn_det.checkpoint.reader import read_onnx, read_openvino_ir, read_torchscript
from gn_det.errors import InputError

from .schema import METADATA_FILE, METADATA_KEY, eager_autocast_in_torchscript, schema_from_json

BACKENDS = ("torchscript", "onnxruntime", "openvino")
# OpenVINO's INFERENCE_PRECISION_HINT: "default" leaves OpenVINO's choice (bf16 on a CPU with AVX512-BF16 or AMX)
OPENVINO_PRECISIONS = ("default", "f32", "bf16")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _metadata(text, path):
    try:
        metadata = json.loads(text)
        if not isinstance(metadata, dict) or "outputs_schema" not in metadata:
            raise ValueError("no outputs_schema")
        return metadata
    except ValueError as err:
        raise InputError(f"{path}: not a model exported by gn-det (its {METADATA_KEY} metadata: {err})") from None


class ExportedDetector:
    """An exported file run by ``backend``, called like a detectron2 model (see the module docstring)."""

    device = torch.device("cpu")

    def __init__(self, path, backend, openvino_precision="default", threads=0):
        if backend not in BACKENDS:
            raise InputError(f"--backend {backend!r} is not an exported-model backend; choose one of "
                             f"{', '.join(BACKENDS)}")
        self.path, self.backend = path, backend
        if backend == "torchscript":
            self.module, extras = read_torchscript(path, extra_files=[METADATA_FILE])
            if not extras[METADATA_FILE]:
                raise InputError(f"{path}: not a model exported by gn-det (no {METADATA_FILE} inside)")
            self.metadata = _metadata(extras[METADATA_FILE], path)
            self.run = self._run_torchscript
        elif str(path).endswith(".xml"):  # OpenVINO IR (tools/export_model.py --format openvino / openvino-int8)
            if backend != "openvino":
                raise InputError(f"{path}: OpenVINO IR runs in --backend openvino, not {backend}")
            model = read_openvino_ir(path)
            if not model.has_rt_info([METADATA_KEY]):
                raise InputError(f"{path}: not a model exported by gn-det (no {METADATA_KEY} metadata)")
            self.metadata = _metadata(model.get_rt_info([METADATA_KEY]).astype(str), path)
            self.run = self._openvino(model, openvino_precision, threads)
        else:
            data, model = read_onnx(path)
            props = {p.key: p.value for p in model.metadata_props}
            if METADATA_KEY not in props:
                raise InputError(f"{path}: not a model exported by gn-det (no {METADATA_KEY} metadata)")
            self.metadata = _metadata(props[METADATA_KEY], path)
            self.run = self._onnxruntime(data, threads) if backend == "onnxruntime" else self._openvino(
                data, openvino_precision, threads)
        self.outputs_schema = schema_from_json(self.metadata["outputs_schema"], path)
        self.input_format = self.metadata.get("input_format", "BGR")
        autocast = self.metadata.get("autocast", "fp32")
        self.autocast_dtype = AUTOCAST.get(autocast)

    # --- backends: CHW float32 tensor -> tuple of output tensors -------------------------------------------------
    def _run_torchscript(self, image):
        with torch.no_grad(), eager_autocast_in_torchscript():
            if self.autocast_dtype is None:
                return self.module(image)
            # the graph was traced under this autocast; its TorchScript functions (NMS) need it too
            with torch.autocast("cpu", dtype=self.autocast_dtype):
                return self.module(image)

    def _onnxruntime(self, data, threads):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name

        def run(image):
            outputs = session.run(None, {input_name: image.numpy()})
            return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)
        return run

    def _openvino(self, model, precision, threads):
        """``model``: the ONNX file's bytes or an ``openvino.Model`` (read from IR)."""
        import openvino

        if precision not in OPENVINO_PRECISIONS:
            raise InputError(f"OpenVINO precision {precision!r} is not one of {', '.join(OPENVINO_PRECISIONS)}")
        core = openvino.Core()
        config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if isinstance(model, bytes):
            model = core.read_model(model, b"")
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        self.openvino_precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # "f32", "bf16"

        def run(image):
            results = request.infer([image.numpy()])
            return tuple(torch.from_numpy(np.array(results[out])) for out in compiled.outputs)
        return run

    # --- detectron2-model interface ------------------------------------------------------------------------------
    def instances(self, image):
        """The exported model's ``Instances`` for one resized image (CHW float, the model's input format), before
        detectron2's ``detector_postprocess``: boxes in the resized image, masks per RoI."""
        outputs = self.run(image.to(torch.float32).contiguous())
        return self.outputs_schema(outputs)[0]["instances"]

    def __call__(self, batched_inputs):
        results = []
        for item in batched_inputs:
            instances = self.instances(item["image"])
            height, width = item.get("height", item["image"].shape[1]), item.get("width", item["image"].shape[2])
            results.append({"instances": detector_postprocess(instances, height, width)})
        return results

    def eval(self):
        return self


def load_exported(path, backend=None, openvino_precision="default", threads=0):
    """:class:`ExportedDetector` of ``path``; ``backend`` defaults to torchscript for a TorchScript file, to
    openvino for OpenVINO IR (``.xml``) and to the runtime an ONNX file was exported for."""
    if backend is None and str(path).endswith(".xml"):
        backend = "openvino"
    if backend is None:
        backend = "onnxruntime" if str(path).endswith(".onnx") else "torchscript"
        if backend == "onnxruntime" and os.path.isfile(path):
            _, model = read_onnx(path)
            props = {p.key: p.value for p in model.metadata_props}
            backend = json.loads(props.get(METADATA_KEY, "{}")).get("onnx_runtime", backend)
    return ExportedDetector(path, backend, openvino_precision, threads)
