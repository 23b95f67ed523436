"""detectron2.export's output schemas as JSON, stored inside the exported file.

``TracingAdapter.outputs_schema`` rebuilds a model's outputs (lists, dicts, ``Instances``, ``Boxes``) from the
flat tuple of tensors a traced or ONNX model returns. It is a tree of detectron2 dataclasses; this writes it as
JSON (no pickle: an exported file is read without running anything of it) and reads it back into those same
classes, so an exported file's outputs are rebuilt by detectron2's own code.
"""
import contextlib
import dataclasses

import torch

from detectron2.export.flatten import (DictSchema, IdentitySchema, InstancesSchema, ListSchema, TensorWrapSchema,
                                       TupleSchema)

from gn_det.errors import InputError

METADATA_KEY = "gn_det"  # TorchScript extra file / ONNX metadata_props key of the JSON metadata
METADATA_FILE = METADATA_KEY + ".json"
SCHEMAS = {cls.__name__: cls for cls in (ListSchema, TupleSchema, IdentitySchema, DictSchema, InstancesSchema,
                                         TensorWrapSchema)}
# the only classes a TensorWrapSchema may rebuild (detectron2's flatten_to_tuple wraps these)
TENSOR_WRAPPERS = ("detectron2.structures.Boxes", "detectron2.structures.boxes.Boxes",
                   "detectron2.structures.ROIMasks", "detectron2.structures.masks.ROIMasks")


def schema_to_json(schema):
    """A JSON-able dict of a detectron2 schema tree."""
    if type(schema).__name__ not in SCHEMAS:
        raise TypeError(f"cannot store a {type(schema).__name__}")
    out = {"type": type(schema).__name__}
    for field in dataclasses.fields(schema):
        value = getattr(schema, field.name)
        out[field.name] = [schema_to_json(s) for s in value] if field.name == "schemas" else value
    return out


def schema_from_json(data, source):
    """The detectron2 schema tree of :func:`schema_to_json`'s ``data``; an InputError naming ``source`` if it is
    not one."""
    try:
        cls = SCHEMAS[data["type"]]
        kwargs = {key: value for key, value in data.items() if key != "type"}
        if "schemas" in kwargs:
            kwargs["schemas"] = [schema_from_json(s, source) for s in kwargs["schemas"]]
        if cls is TensorWrapSchema and kwargs.get("class_name") not in TENSOR_WRAPPERS:
            raise ValueError(f"class {kwargs.get('class_name')!r}")
        return cls(**kwargs)
    except (KeyError, TypeError, ValueError) as err:
        raise InputError(f"{source}: its output schema is not one gn-det wrote ({err})") from None


@contextlib.contextmanager
def eager_autocast_in_torchscript():
    """TorchScript's own autocast pass off: a graph traced under autocast holds eager autocast's casts, and the
    TorchScript functions it calls (torchvision's batched NMS, gn-det's top-scores-first selection) run under
    eager autocast as in eager mode. Used around tracing and around running a traced file."""
    previous = torch._C._jit_set_autocast_mode(False)
    try:
        yield
    finally:
        torch._C._jit_set_autocast_mode(previous)
