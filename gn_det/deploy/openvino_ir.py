"""OpenVINO IR written by gn-det, with the RoI coordinates kept in f32 when OpenVINO runs the model in bf16.

OpenVINO's CPU plugin runs a float model in bf16 by default on a CPU with AVX512-BF16 or AMX, and keeps f32 only
in the graph's tail: the nodes after the last convolution or matrix product on the way to an output. The boxes a
RoIAlign reads are not in that tail: read from gn-det's ONNX file, the gathers that pick each FPN level's RoIs
run in bf16, whose 8 significant bits round a coordinate to a grid of 1 px between 128 and 256 and of 8 px
above 1024 (a COCO image's long side is 1333), which costs AP (docs/DEPLOY.md, "Equal AP").

So every node that computes a RoIAlign's boxes, back to the convolutions and matrix products whose outputs they
read, carries OpenVINO's precision-conversion attribute in the IR and runs in f32. The convolutions, matrix
products, GroupNorm and RoIAlign itself keep the inference precision. The attribute is in the IR file, so any
OpenVINO that reads the file honours it. ``DisablePrecisionConversion`` is what OpenVINO 2026 reads;
``disable_fp16_compression`` is its predecessor in earlier versions; OpenVINO's IR reader ignores an attribute it
does not know.
"""
import json
import os
import xml.etree.ElementTree as ElementTree

from gn_det.fileio import atomic_paths

from .schema import METADATA_KEY

# where the walk back from a RoIAlign's boxes stops: the work that the inference precision is for, and the inputs
STOP_TYPES = frozenset({"Convolution", "GroupConvolution", "ConvolutionBackpropData", "MatMul", "Parameter",
                        "Constant", "FakeQuantize"})
KEEP_F32 = ({"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16,bf16"},
            {"name": "disable_fp16_compression", "version": "0"})


def roi_coordinate_nodes(model):
    """The friendly names of the nodes of ``model`` (an ``openvino.Model``) that compute the boxes (input 1) of
    any ROIAlign, walking back until a node of :data:`STOP_TYPES`."""
    names, stack = set(), []
    for op in model.get_ops():
        if op.get_type_name() == "ROIAlign":
            stack.append(op.input(1).get_source_output().get_node())
    while stack:
        node = stack.pop()
        if node.get_type_name() in STOP_TYPES or node.get_friendly_name() in names:
            continue
        names.add(node.get_friendly_name())
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return names


def keep_f32_in_ir(xml_path, names):
    """Add the :data:`KEEP_F32` attributes to the layers named ``names`` of the IR graph file ``xml_path``."""
    tree = ElementTree.parse(xml_path)
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") in names:
            rt_info = layer.find("rt_info")
            if rt_info is None:
                rt_info = ElementTree.Element("rt_info")
                layer.insert(0, rt_info)
            for attribute in KEEP_F32:
                ElementTree.SubElement(rt_info, "attribute", attribute)
    tree.write(xml_path)


def write_ir(model, xml_path, metadata):
    """Write ``model`` as OpenVINO IR ``xml_path`` + its ``.bin``, with gn-det's ``metadata`` (JSON) and the RoI
    coordinates kept in f32, each file through a temporary name (:func:`gn_det.fileio.atomic_paths`): the weights
    first, the graph last, so a reader of the graph finds its weights already there. Returns ``xml_path``."""
    import openvino

    model.set_rt_info(json.dumps(metadata), [METADATA_KEY])
    with atomic_paths(os.path.splitext(xml_path)[0] + ".bin", xml_path) as (_, tmp_xml):
        openvino.save_model(model, tmp_xml, compress_to_fp16=False)  # and the .bin beside it
        keep_f32_in_ir(tmp_xml, roi_coordinate_nodes(model))
    return xml_path
