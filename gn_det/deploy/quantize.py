"""int8 for OpenVINO: NNCF's post-training quantization of the exported ONNX model (written as OpenVINO IR by
:func:`gn_det.deploy.openvino_ir.write_ir`).

NNCF (OpenVINO's quantizer) runs the model on calibration images, sets per-tensor activation and per-channel
weight ranges, and inserts FakeQuantize before the convolutions and fully connected layers
(:data:`QUANTIZED_TYPES`), which OpenVINO then runs in int8 (VNNI / AMX where the CPU has them). Everything
else, GroupNorm, RoIAlign, box arithmetic and NMS included, stays in floating point. The
calibration images are what the model sees at inference (read and resized by the predictor); without labels,
nothing is trained. AP and speed against the float model: docs/DEPLOY.md.
"""
import logging

# The operations whose inputs are quantized. NNCF would also quantize element-wise arithmetic, and in a detector
# that includes the boxes: the poolers' level assignment and coordinates and the anchors' decoding lost pixels
# (and masks, measured: docs/DEPLOY.md); every other operation stays in floating point.
QUANTIZED_TYPES = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul"})

logger = logging.getLogger(__name__)


def copy_constants_into_bodies(model):
    """Give each sub-graph (an ``If`` body) its own copy of the outer constants it reads, in place.

    OpenVINO's ONNX reader connects a main-graph Constant straight to the nodes of an ``If`` body that read it as
    an outer-scope value (torchvision's ``batched_nms`` is traced as a scripted function with an ``If`` for
    empty input); NNCF's graph builder then looks for those body nodes in the main graph and stops with
    "Could not find a node". A copy inside the body is the same value.
    """
    import openvino.opset13 as ops

    main = {op.get_friendly_name() for op in model.get_ops()}
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        for target in list(op.output(0).get_target_inputs()):
            if target.get_node().get_friendly_name() not in main:
                target.replace_source_output(ops.constant(op.get_data()).output(0))


def quantize_to_int8(model, images):
    """NNCF int8 quantization of ``model`` (an ``openvino.Model`` read from gn-det's OpenVINO ONNX file, changed in
    place by :func:`copy_constants_into_bodies`) calibrated on ``images`` (a sequence of CHW float tensors, read
    more than once). Returns the quantized ``openvino.Model``."""
    import nncf

    copy_constants_into_bodies(model)
    dataset = nncf.Dataset(images, lambda image: image.float().contiguous().numpy())
    float_types = sorted({op.get_type_name() for op in model.get_ops()} - QUANTIZED_TYPES)
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # NNCF logs one line per operation it leaves in floating point
    try:
        quantized = nncf.quantize(model, dataset, subset_size=len(images),
                                  ignored_scope=nncf.IgnoredScope(types=float_types, validate=False))
    finally:
        nncf_logger.setLevel(level)
    logger.info("quantized %d operations to int8 on %d calibration images", sum(
        op.get_type_name() in QUANTIZED_TYPES for op in quantized.get_ops()), len(images))
    return quantized
