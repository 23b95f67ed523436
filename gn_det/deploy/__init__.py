"""Deployment: export any gn-det model to TorchScript, ONNX or OpenVINO IR (float or int8), and run the file.

- :mod:`gn_det.deploy.export`: detectron2.export's ``TracingAdapter`` around the model (detectron2's export
  protocol: ``model.inference(inputs, do_postprocess=False)``), traced to TorchScript or exported to ONNX at the
  opset its runtime runs fastest (:data:`~gn_det.deploy.export.ONNX_TARGETS`), written through a temporary file.
- :mod:`gn_det.deploy.openvino_ir`: the OpenVINO ONNX file written as OpenVINO IR, with the RoI coordinates kept
  in f32 when OpenVINO runs the rest in bf16.
- :mod:`gn_det.deploy.quantize`: int8 for OpenVINO, NNCF's post-training quantization of the convolutions and
  fully connected layers of the OpenVINO ONNX file, written as that IR.
- :mod:`gn_det.deploy.runtimes`: TorchScript, ONNX Runtime and OpenVINO loaders that read the file through
  ``gn_det.checkpoint.reader`` and return detectron2 ``Instances`` the same way, callable like a detectron2 model
  (so ``inference_on_dataset`` and gn-det's predictor take them).
- :mod:`gn_det.deploy.evaluate`: COCO box / mask AP of any of them with detectron2's ``COCOEvaluator``.

Commands, measurements and the opset decision: docs/DEPLOY.md.
"""
from .export import FORMATS, ONNX_TARGETS, export_from_config, export_model
from .runtimes import BACKENDS, ExportedDetector, load_exported
