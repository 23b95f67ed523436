"""Export (gn_det.deploy, tools/export_model.py) and running the exported file: TorchScript for every model
family and for the CPU fast path, ONNX in ONNX Runtime and OpenVINO with any GroupNorm group setting, int8
OpenVINO IR.

Tiny R-18 models at 128 px with random weights; the test score threshold 0 and few proposals make detection
counts differ from image to image, so a traced file is checked on images other than the one it was traced on.
"""
import json
import os

import pytest

pytest.importorskip("detectron2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import CONFIG_DIR, TINY_OPTS, made_once, tool_exit_message, tool_main  # noqa: E402
from gn_det import InputError  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402

SHAPES_GN = os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn.yaml")
FP32 = ["MODEL.PRECISION", "fp32", "MODEL.CHANNELS_LAST", "False", "MODEL.CPU_FAST_PATH", "False"]
# 40 proposals x 3 classes scoring ~0.2-0.3 (random weights): the score threshold leaves 8, 17 and 10 detections
# on the test images (at most 20; the fast path's top-scores-first loop starts from 80 candidates)
SMALL = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
         "MODEL.RPN.POST_NMS_TOPK_TEST", "40", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.26",
         "TEST.DETECTIONS_PER_IMAGE", "20"]


def tiny_model(config=SHAPES_GN, opts=()):
    torch.manual_seed(0)
    cfg = get_gn_cfg(config, SMALL + list(opts))
    return build_model(cfg).eval(), cfg


def images(count, seed=0, size=128):
    """CHW float BGR images of random rectangles on noise (so proposals and detections differ per image)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(count):
        image = rng.uniform(0, 255, (3, size, size)).astype(np.float32) * 0.3
        for _ in range(4):
            y, x = rng.randint(0, size - 32, 2)
            image[:, y:y + rng.randint(8, 32), x:x + rng.randint(8, 32)] = rng.uniform(0, 255, (3, 1, 1))
        out.append(torch.from_numpy(image))
    return out


def eager_instances(model, image):
    from gn_det.deploy.export import export_inference

    inference = export_inference(model)
    with torch.no_grad():
        outputs = inference(model, [{"image": image}]) if inference else model([{"image": image}])
    return outputs[0]["instances"]


def canonical_order(instances):
    """The instances sorted by score, then class and box: bf16 scores tie often, and the order of tied
    detections is not defined (detectron2's sort is not stable)."""
    boxes = instances.pred_boxes.tensor.numpy().round(2)
    keys = [boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], instances.pred_classes.numpy(),
            -instances.scores.numpy()]
    return instances[torch.from_numpy(np.lexsort(keys).copy())]


def assert_same_instances(ours, eager, box_tol=1e-3, mask_tol=1e-3, tied_tail=False):
    """Same detections up to the order of tied scores. ``tied_tail`` (bf16 scores, which tie often): greedy NMS
    among boxes of exactly equal score depends on their order (docs/SPEED.md), so only detections above the
    two lowest score levels are compared."""
    assert len(ours) == len(eager)
    ours, eager = canonical_order(ours), canonical_order(eager)
    if tied_tail and len(eager):
        levels = torch.unique(eager.scores)
        floor = levels[min(1, len(levels) - 1)]
        ours, eager = ours[ours.scores > floor], eager[eager.scores > floor]
        assert len(ours) == len(eager) > 0
    assert torch.allclose(ours.pred_boxes.tensor, eager.pred_boxes.tensor, atol=box_tol)
    assert torch.allclose(ours.scores, eager.scores, atol=1e-4)
    assert torch.equal(ours.pred_classes.long(), eager.pred_classes.long())
    if eager.has("pred_masks"):
        assert torch.allclose(ours.pred_masks, eager.pred_masks, atol=mask_tol)


def exported_equals_eager(model, fmt, tmp_path, backends, target="onnxruntime", count=3, **tolerances):
    """Export ``model`` traced on the first of ``count`` test images, run the file in each backend on all of them,
    compare with eager; the images must give different detection counts."""
    from gn_det.deploy import export_model, load_exported

    test_images = images(count)
    path = export_model(model, test_images[0], fmt, str(tmp_path), target)
    counts = []
    for backend in backends:
        backend, precision = backend if isinstance(backend, tuple) else (backend, "f32")
        exported = load_exported(path, backend, openvino_precision=precision)
        for image in test_images:
            eager = eager_instances(model, image)
            assert_same_instances(exported.instances(image), eager, **tolerances)
            counts.append(len(eager))
    assert len(set(counts)) > 1, f"every image gave {counts[0]} detections: the check would not see a frozen count"
    return path


def test_fast_path_traces_to_torchscript_that_runs_any_image_as_eager(tmp_path):
    model, _ = tiny_model()  # the shapes config: bf16, channels_last, MODEL.CPU_FAST_PATH
    path = exported_equals_eager(model, "torchscript", tmp_path, ["torchscript"], tied_tail=True)
    names = set(os.listdir(tmp_path))
    assert {"model.ts", "model_ts_code.txt", "model_ts_IR.txt"} <= names  # detectron2's dump_torchscript_IR
    assert not [n for n in names if n.startswith(".")]  # no temporary file left behind
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("group_setting", [["MODEL.GN.NUM_GROUPS", "16"], ["MODEL.GN.DIM_PER_GROUP", "16"]],
                         ids=["16_groups", "16_channels_per_group"])
def test_group_norm_exports_to_onnx_runtime_as_eager(tmp_path, group_setting):
    pytest.importorskip("onnxruntime")
    model, _ = tiny_model(opts=FP32 + group_setting)
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups and groups != {32}
    exported_equals_eager(model, "onnx", tmp_path, ["onnxruntime"])


def test_onnx_for_openvino_has_native_group_normalization_and_runs_as_eager(tmp_path):
    pytest.importorskip("openvino")
    import onnx

    model, _ = tiny_model(opts=FP32 + ["MODEL.GN.DIM_PER_GROUP", "8"])
    path = exported_equals_eager(model, "onnx", tmp_path, [("openvino", "f32")], target="openvino", count=2)
    graph = onnx.load(path)
    assert {i.domain: i.version for i in graph.opset_import}[""] == 21
    assert not [n for n in graph.graph.node if n.op_type == "InstanceNormalization"]
    norms = [n for n in graph.graph.node if n.op_type == "GroupNormalization"]
    assert len(norms) == sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules())


def test_openvino_ir_runs_as_eager_and_keeps_the_roi_coordinates_in_f32_under_bf16(tmp_path):
    """--format openvino: OpenVINO IR; at bf16 OpenVINO would round the RoI boxes the poolers read (they are not
    in the graph's f32 tail), so the nodes computing them carry the f32 attribute in the file."""
    openvino = pytest.importorskip("openvino")
    from gn_det.deploy.openvino_ir import roi_coordinate_nodes

    model, _ = tiny_model(opts=FP32)
    path = exported_equals_eager(model, "openvino", tmp_path, [("openvino", "f32")], count=2)
    assert sorted(os.listdir(tmp_path)) == ["model.bin", "model.xml"]
    core = openvino.Core()
    marked = roi_coordinate_nodes(core.read_model(path))
    assert {"Gather", "Concat"} <= {op.get_type_name() for op in core.read_model(path).get_ops()
                                    if op.get_friendly_name() in marked}
    assert open(path).read().count('name="DisablePrecisionConversion"') == len(marked)
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("OpenVINO runs bf16 only on a CPU with AVX512-BF16 or AMX")
    runtime = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"}).get_runtime_model()

    def info(node, key):
        return node.get_rt_info()[key].astype(str)
    roi_aligns = [op for op in runtime.get_ops() if info(op, "layerType") == "ROIAlign"]
    assert len(roi_aligns) == 8  # 4 levels, box and mask poolers
    for op in roi_aligns:
        boxes = op.input(1).get_source_output().get_node()
        assert info(op, "runtimePrecision") == "bf16"  # the features, as the rest of the model
        # unmarked, this is a Reorder from the bf16 the boxes were gathered in
        assert info(boxes, "runtimePrecision") == "f32", (op.get_friendly_name(), info(boxes, "layerType"))


def crowded_predictions(rois, num_classes, seed, class_agnostic=False):
    """Box-predictor outputs for ``rois`` RoIs on a 128 px image: boxes of one class crowd together (so NMS per
    class keeps more than ``TOPK`` only if it is not stopped), one row is NaN, scores are peaked."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(rois, 1, 2, generator=g) * 100
    sizes = torch.rand(rois, 1, 2, generator=g) * 30 + 8
    boxes = torch.cat([corners, corners + sizes], dim=2) - 4  # some cross the image border: clipped
    boxes = boxes + torch.randn(rois, 1 if class_agnostic else num_classes, 4, generator=g) * 4
    scores = torch.softmax(torch.randn(rois, num_classes + 1, generator=g) * 2, dim=1)
    boxes = boxes.flatten(1)
    boxes[1] = float("nan")  # detectron2 drops non-finite rows
    return boxes, scores


TOPK, SCORE_THRESH, NMS_THRESH = 10, 0.05, 0.5


@pytest.mark.parametrize("class_agnostic", [False, True], ids=["per_class_boxes", "class_agnostic_boxes"])
def test_per_class_nms_exports_as_one_operator_and_keeps_detectron2s_detections(tmp_path, class_agnostic):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    import onnx
    import onnxruntime
    import openvino
    from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

    from gn_det.layers.onnx_nms import per_class_nms_inference_single_image

    class Selection(torch.nn.Module):
        def forward(self, boxes, scores):
            result, rows = per_class_nms_inference_single_image(boxes, scores, (128, 128), SCORE_THRESH,
                                                                NMS_THRESH, TOPK)
            return result.pred_boxes.tensor, result.scores, result.pred_classes, rows

    path = str(tmp_path / "selection.onnx")
    torch.onnx.export(Selection(), crowded_predictions(200, 4, seed=0, class_agnostic=class_agnostic), path,
                      opset_version=17, dynamo=False, input_names=["boxes", "scores"],
                      dynamic_axes={"boxes": {0: "rois"}, "scores": {0: "rois"}})
    ops = [node.op_type for node in onnx.load(path).graph.node]
    assert ops.count("NonMaxSuppression") == 1 and "If" not in ops and "Loop" not in ops
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runs = {
        "eager": lambda b, s: Selection()(b, s),
        "onnxruntime": lambda b, s: session.run(None, {"boxes": b.numpy(), "scores": s.numpy()}),
        "openvino": lambda b, s: list(compiled([b.numpy(), s.numpy()]).values()),
    }
    bound_mattered = False
    for seed, rois in [(1, 300), (2, 40), (3, 3)]:
        boxes, scores = crowded_predictions(rois, 4, seed, class_agnostic)
        if seed == 3:
            scores[:, :-1] = SCORE_THRESH  # nothing above the threshold: no detection
        expected, rows = fast_rcnn_inference_single_image(boxes, scores, (128, 128), SCORE_THRESH, NMS_THRESH, -1)
        classes_kept = torch.bincount(expected.pred_classes, minlength=4)
        bound_mattered |= bool((classes_kept > TOPK).any())
        # detectron2's kept rows count the finite rows only; ours are RoI indices
        rows = (torch.isfinite(boxes).all(1) & torch.isfinite(scores).all(1)).nonzero().flatten()[rows[:TOPK]]
        expected = expected[:TOPK]
        for name, run in runs.items():
            got = [torch.as_tensor(np.asarray(x)) for x in run(boxes, scores)]
            assert len(got[1]) == len(expected), (name, seed)
            assert torch.allclose(got[0], expected.pred_boxes.tensor, atol=1e-4), (name, seed)
            assert torch.allclose(got[1], expected.scores, atol=1e-6), (name, seed)
            assert torch.equal(got[2].long(), expected.pred_classes) and torch.equal(got[3].long(), rows), (name, seed)
    assert bound_mattered  # some class kept more than TOPK boxes: the per-class stop was exercised


def test_gn_det_box_predictor_exports_nms_per_class_stopped_at_the_detections_per_image(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    from onnx import numpy_helper

    from gn_det.deploy import export_model
    from gn_det.layers.onnx_nms import OnnxNMSOutputLayers

    model, cfg = tiny_model(opts=FP32)
    assert type(model.roi_heads.box_predictor) is OnnxNMSOutputLayers
    graph = onnx.load(export_model(model, images(1)[0], "onnx", str(tmp_path))).graph
    constants = {out: numpy_helper.to_array(node.attribute[0].t) for node in graph.node if node.op_type == "Constant"
                 for out in node.output}
    constants.update({init.name: numpy_helper.to_array(init) for init in graph.initializer})
    stopped = [node for node in graph.node if node.op_type == "NonMaxSuppression"
               and node.input[2] in constants and int(constants[node.input[2]][0]) == cfg.TEST.DETECTIONS_PER_IMAGE]
    assert len(stopped) == 1  # the box predictor's; the RPN's NMS is torchvision's


def test_onnx_of_the_fast_path_is_one_line_naming_the_keys(tmp_path):
    from gn_det.deploy import export_model

    model, _ = tiny_model()
    with pytest.raises(InputError, match="MODEL.CPU_FAST_PATH=True.*export to ONNX without them") as err:
        export_model(model, images(1)[0], "onnx", str(tmp_path / "out"))
    assert "\n" not in str(err.value) and "MODEL.PRECISION='bf16'" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [None, b"", b"not a model"], ids=["missing", "empty", "not_the_format"])
@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime", "openvino"])
def test_loaders_name_a_bad_file(tmp_path, backend, content):
    from gn_det.deploy import load_exported

    path = tmp_path / {"torchscript": "model.ts", "onnxruntime": "model.onnx", "openvino": "model_int8.xml"}[backend]
    if content is not None:
        path.write_bytes(content)
        (tmp_path / "model_int8.bin").write_bytes(content)
    if backend != "torchscript":
        pytest.importorskip("onnx" if backend == "onnxruntime" else "openvino")
    with pytest.raises(InputError, match=str(path)) as err:
        load_exported(str(path), backend)
    assert "\n" not in str(err.value)


def test_openvino_ir_not_written_by_gn_det_is_one_line(tmp_path):
    openvino = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    from gn_det.deploy import load_exported

    image = ops.parameter([3, 8, 8], openvino.Type.f32)
    path = str(tmp_path / "other.xml")
    openvino.save_model(openvino.Model([ops.relu(image)], [image]), path)
    with pytest.raises(InputError, match=f"{path}: not a model exported by gn-det"):
        load_exported(path)


# every model family of the issue, eval form, TorchScript export + reload equal to eager (slow: one trace each)
FAMILIES = {
    "gn_ws": (os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_gn_ws.yaml"), FP32),
    "bnstar": (os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bnstar.yaml"), FP32),
    "bn": (os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bn.yaml"), FP32),
    "syncbn": (os.path.join(CONFIG_DIR, "shapes", "mask_rcnn_R_18_FPN_bn.yaml"),
               FP32 + ["MODEL.RESNETS.NORM", "SyncBN", "MODEL.FPN.NORM", "SyncBN"]),
    "c4_gn": (os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_C4_2x_gn.yaml"),
              TINY_OPTS + ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200"]),
    "retinanet_gn": (os.path.join(CONFIG_DIR, "COCO-Detection", "retinanet_R_50_FPN_3x_gn.yaml"),
                     TINY_OPTS + ["MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"]),
}


@pytest.mark.slow
def test_fast_path_pieces_in_float32_trace_exactly(tmp_path):
    """Also without TorchScript's graph optimizations: a constant in the saved graph loses the "Python number"
    mark that keeps ``long_tensor + 0.5`` in float32, so the file must not rely on it."""
    from gn_det.deploy import load_exported

    model, _ = tiny_model(opts=["MODEL.PRECISION", "fp32"])  # channels_last and MODEL.CPU_FAST_PATH, no ties
    path = exported_equals_eager(model, "torchscript", tmp_path, ["torchscript"])
    exported, image = load_exported(path), images(1)[0]
    with torch.jit.optimized_execution(False):  # in a fresh module: the first call fixes the execution plan
        assert_same_instances(exported.instances(image), eager_instances(model, image))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_model_family_exports_to_torchscript_and_reloads(tmp_path, family):
    config, opts = FAMILIES[family]
    model, _ = tiny_model(config, opts)
    model.eval()
    from gn_det.deploy import export_model, load_exported

    test_images = images(2)
    path = export_model(model, test_images[0], "torchscript", str(tmp_path))
    exported = load_exported(path)
    for image in test_images:
        assert_same_instances(exported.instances(image), eager_instances(model, image))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A checkpoint of the tiny fp32 GN model and a registered 2-image shapes dataset at 128 px."""
    from gn_det.data import generate_shapes

    def make(root):
        generate_shapes(str(root / "shapes"), num_train=1, num_val=2, image_size=128)
        torch.save({"model": tiny_model(opts=FP32)[0].state_dict()}, root / "model.pth")

    # one folder per session: the tests register it under fixed names, which a second folder (a worker that runs
    # this module's tests between other modules' re-creates module fixtures) could not take again
    root = made_once(tmp_path_factory, "export_run", make)
    weights = root / "model.pth"
    data = root / "shapes"
    return {"weights": str(weights), "dataset": f"DATASETS.REGISTER \"['tiny_val={data}/val.json,{data}/val']\"",
            "register": [f"tiny_val={data}/val.json,{data}/val", f"tiny_train={data}/train.json,{data}/train"],
            "val": str(data / "val"),
            "val_json": str(data / "val.json"), "root": root}


@pytest.mark.slow
def test_export_tool_writes_onnx_evaluates_it_and_predict_runs_it(tiny_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    opts = SMALL + FP32 + ["MODEL.WEIGHTS", tiny_run["weights"], "DATASETS.REGISTER", str(tiny_run["register"]),
                           "DATASETS.TEST", "('tiny_val',)"]
    tool_main("export_model.py", "--config-file", SHAPES_GN, "--format", "onnx", "--output", tmp_path / "x",
              "--run-eval", *opts)
    printed = capsys.readouterr().out
    assert "bbox AP:" in printed and "segm AP:" in printed
    metrics = json.loads((tmp_path / "x" / "eval.json").read_text())["metrics"]
    assert set(metrics) == {"bbox", "segm"}
    tool_main("predict.py", "--config-file", SHAPES_GN, "--backend", "onnxruntime", "--weights",
              tmp_path / "x" / "model.onnx", tiny_run["val"], "--out", tmp_path / "p",
              "--coco-json", tiny_run["val_json"], "--opts", *opts)
    assert len(os.listdir(tmp_path / "p")) == 3  # 2 PNGs and predictions.json


@pytest.mark.slow
def test_int8_export_quantizes_only_convolutions_evaluates_and_detects_as_float(tiny_run, tmp_path):
    """--format openvino-int8 from a config: calibrated on the training set, evaluated from the file; only
    convolutions and linear layers read quantized values, and the file's detections agree with eager fp32."""
    pytest.importorskip("nncf")
    import openvino
    from detectron2.structures import pairwise_iou

    from gn_det.deploy import export_from_config, load_exported
    from gn_det.deploy.quantize import QUANTIZED_TYPES

    opts = SMALL + FP32 + ["MODEL.WEIGHTS", tiny_run["weights"], "DATASETS.REGISTER", str(tiny_run["register"]),
                           "DATASETS.TEST", "('tiny_val',)"]
    with pytest.raises(InputError, match="calibrates on the training set.*'shapes_train_missing'"):
        export_from_config(SHAPES_GN, "openvino-int8", str(tmp_path / "none"),
                           opts + ["DATASETS.TRAIN", "('shapes_train_missing',)"])
    assert not (tmp_path / "none").exists()
    out = tmp_path / "x"
    path, metrics = export_from_config(SHAPES_GN, "openvino-int8", str(out),
                                       opts + ["DATASETS.TRAIN", "('tiny_train',)"], run_eval=True)
    assert path == str(out / "model_int8.xml") and set(metrics) == {"bbox", "segm"}
    saved = json.loads((out / "eval.json").read_text())
    assert saved["file"] == path and saved["metrics"]["bbox"].keys() == metrics["bbox"].keys()
    assert sorted(n for n in os.listdir(out) if n.startswith("model")) == ["model_int8.bin", "model_int8.xml"]

    quantizers = [op for op in openvino.Core().read_model(path).get_ops() if op.get_type_name() == "FakeQuantize"]
    readers = {target.get_node().get_type_name() for op in quantizers for target in op.output(0).get_target_inputs()}
    assert quantizers and readers - {"ShapeOf"} <= QUANTIZED_TYPES, readers  # ShapeOf reads no value
    assert 'name="DisablePrecisionConversion"' in open(path).read()  # the RoI coordinates, as --format openvino

    model, _ = tiny_model(opts=FP32)  # the weights of tiny_run
    exported = load_exported(path)  # .xml: OpenVINO
    assert exported.backend == "openvino" and exported.metadata["format"] == "openvino-int8"
    for image in images(3):
        ours, eager = exported.instances(image), eager_instances(model, image)
        # int8 moves the scores of random weights (all near the threshold) across it, so the counts differ; the
        # best eager detection is found again, with its class, score and mask
        best = eager[int(eager.scores.argmax())]
        overlap = pairwise_iou(best.pred_boxes, ours.pred_boxes)[0]
        match = int(overlap.argmax())
        assert overlap[match] > 0.9 and abs(float(ours.scores[match] - best.scores[0])) < 0.05
        assert torch.equal(ours.pred_classes[match:match + 1].long(), best.pred_classes.long())
        assert float((ours.pred_masks[match] - best.pred_masks[0]).abs().mean()) < 0.05
    os.remove(out / "model_int8.bin")
    with pytest.raises(InputError, match=f"{path}: its weights file .*model_int8.bin does not exist"):
        load_exported(path)


def test_export_tool_refuses_bad_input_in_one_line_before_writing(tiny_run, tmp_path):
    out = tmp_path / "x"
    line = tool_exit_message("export_model.py", "--config-file", SHAPES_GN, "--format", "onnx", "--output", out,
                             "--sample-image", tiny_run["val"] + "/missing.png", "MODEL.WEIGHTS", tiny_run["weights"])
    assert "MODEL.CPU_FAST_PATH" in line and not out.exists()
    line = tool_exit_message("export_model.py", "--config-file", SHAPES_GN, "--output", out, "MODEL.WEIGHTS",
                             tmp_path / "none.pth")
    assert "none.pth" in line and not out.exists()
    broken = tmp_path / "broken.py"  # a Python config goes through the checked LazyConfig reader
    broken.write_text("x = (\n")
    line = tool_exit_message("export_model.py", "--config-file", broken, "--output", out)
    assert str(broken) in line and not out.exists()


@pytest.mark.slow
def test_run_eval_checks_the_test_set_before_writing(tiny_run, tmp_path):
    """--run-eval's test set is checked as a run checks its datasets before the export replaces an earlier
    file: an empty DATASETS.TEST, an unregistered one, one whose files are gone, one without the segmentations
    the mask model is evaluated against."""
    from gn_det.data import register_datasets

    data = tmp_path / "gone"
    data.mkdir()
    (data / "val.json").write_text(open(tiny_run["val_json"]).read())
    register_datasets(f"export_gone_val={data}/val.json,{tiny_run['val']}")
    os.remove(data / "val.json")
    coco = json.loads(open(tiny_run["val_json"]).read())
    del coco["annotations"][0]["segmentation"]
    (tmp_path / "boxes_only.json").write_text(json.dumps(coco))
    register_datasets(f"export_boxes_only_val={tmp_path}/boxes_only.json,{tiny_run['val']}")
    out = tmp_path / "x"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an earlier export")
    sample = os.path.join(tiny_run["val"], sorted(os.listdir(tiny_run["val"]))[0])
    opts = SMALL + FP32 + ["MODEL.WEIGHTS", tiny_run["weights"], "DATASETS.REGISTER", str(tiny_run["register"])]
    for test_sets, problem in [("()", "DATASETS.TEST is empty"),
                               ("('nope_val',)", "DATASETS.TEST names dataset 'nope_val', which is not registered"),
                               ("('export_gone_val',)", f"json_file {data}/val.json does not exist"),
                               ("('export_boxes_only_val',)", f"annotation {coco['annotations'][0]['id']!r} has no "
                                                             "segmentation")]:
        line = tool_exit_message("export_model.py", "--config-file", SHAPES_GN, "--format", "onnx", "--output", out,
                                 "--sample-image", sample, "--run-eval", *opts, "DATASETS.TEST", test_sets)
        assert problem in line, line
        assert os.listdir(out) == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"an earlier export"


@pytest.mark.slow
def test_run_eval_names_an_undecodable_test_image_in_one_line(tiny_run, tmp_path):
    """--run-eval reads the test set as train_net --eval-only does: a truncated image is one line naming it, and
    an earlier export in the output folder is left as it was."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_run["val"], data / "val")
    shutil.copy(tiny_run["val_json"], data / "val.json")
    # the last image: the first is the one traced
    broken = data / "val" / json.loads((data / "val.json").read_text())["images"][-1]["file_name"]
    broken.write_bytes(broken.read_bytes()[:200])
    opts = SMALL + FP32 + ["MODEL.WEIGHTS", tiny_run["weights"], "DATASETS.REGISTER",
                           f"['export_truncated_val={data}/val.json,{data}/val']",
                           "DATASETS.TEST", "('export_truncated_val',)"]
    out = tmp_path / "x"
    out.mkdir()
    (out / "model.ts").write_bytes(b"an earlier export")
    line = tool_exit_message("export_model.py", "--config-file", SHAPES_GN, "--output", out, "--run-eval", *opts)
    assert f"image {broken} of dataset 'export_truncated_val' cannot be decoded" in line, line
    # the export and its evaluation were staged: the earlier export is as it was, and nothing else is there
    assert os.listdir(out) == ["model.ts"] and (out / "model.ts").read_bytes() == b"an earlier export"
    line = tool_exit_message("export_model.py", "--config-file", SHAPES_GN, "--output", tmp_path / "new",
                             "--run-eval", *opts)
    assert "cannot be decoded" in line and not (tmp_path / "new").exists()  # a folder it made is removed again


@pytest.mark.slow
def test_run_eval_reports_mask_ap_of_a_model_that_detects_nothing(tiny_run, tmp_path):
    """--run-eval evaluates the tasks the config's model has, as train_net does, not those its detections show."""
    from gn_det.deploy import export_from_config

    opts = SMALL + FP32 + ["MODEL.WEIGHTS", tiny_run["weights"], "DATASETS.REGISTER", str(tiny_run["register"]),
                           "DATASETS.TEST", "('tiny_val',)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    _, metrics = export_from_config(SHAPES_GN, "torchscript", str(tmp_path / "x"), opts, run_eval=True)
    assert set(metrics) == {"bbox", "segm"}
