"""Tiny variants of the registered models run forward and backward on CPU."""
import os
import pickle

import pytest

pytest.importorskip("detectron2")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

from conftest import CONFIG_DIR, GN_FPN, TINY_OPTS  # noqa: E402
from gn_det.config import get_gn_cfg  # noqa: E402
from gn_det.analysis.random_inputs import random_detection_batch  # noqa: E402

SMALL_INPUT = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
               "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
               "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]


def train_step(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():  # detectron2's heads log training statistics to it
        losses = model(random_detection_batch(num_images=2, height=128, width=128))
    total = sum(losses.values())
    assert torch.isfinite(total), losses
    total.backward()
    return model, losses


def grad_norms_of(model, module_type):
    return [p.grad.abs().sum().item() for m in model.modules() if isinstance(m, module_type)
            for p in m.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.slow
def test_gn_fpn_mask_rcnn_trains_a_step():
    model, losses = train_step(get_gn_cfg(GN_FPN, TINY_OPTS + SMALL_INPUT))
    assert {"loss_mask", "loss_cls", "loss_box_reg", "loss_rpn_cls"} <= set(losses)
    grads = grad_norms_of(model, torch.nn.GroupNorm)
    assert grads and all(g > 0 for g in grads)  # every trainable GN gamma/beta gets a gradient
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.rand(3, 96, 128) * 255, "height": 96, "width": 128}])
    assert out["instances"].image_size == (96, 128)


@pytest.mark.slow
def test_c4_gn_trains_a_step():
    path = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_C4_2x_gn.yaml")
    model, losses = train_step(get_gn_cfg(path, TINY_OPTS + SMALL_INPUT + ["MODEL.GN.NUM_GROUPS", "16"]))
    assert "loss_mask" in losses
    res5 = [m for m in model.roi_heads.res5.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert res5 and all(m.num_groups == 16 for m in res5)


def test_retinanet_gn_head_trains_a_step():
    path = os.path.join(CONFIG_DIR, "COCO-Detection", "retinanet_R_50_FPN_3x_gn.yaml")
    model, losses = train_step(get_gn_cfg(path, TINY_OPTS + SMALL_INPUT + ["MODEL.GN.NUM_GROUPS", "8"]))
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    head_norms = [m for m in model.head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(head_norms) == 8 and all(m.num_groups == 8 for m in head_norms)


@pytest.mark.slow
def test_rpn_head_with_optional_norm():
    cfg = get_gn_cfg(GN_FPN, TINY_OPTS + SMALL_INPUT + ["MODEL.RPN.HEAD_NAME", "GNRPNHead", "MODEL.RPN.NORM", "GN"])
    model, _ = train_step(cfg)
    conv = model.proposal_generator.rpn_head.conv
    assert isinstance(conv.norm, torch.nn.GroupNorm) and conv.norm.weight.grad is not None
    plain = build_model(get_gn_cfg(GN_FPN, TINY_OPTS + ["MODEL.RPN.HEAD_NAME", "GNRPNHead"]))
    assert plain.proposal_generator.rpn_head.conv.norm is None
    # same parameter names as detectron2's StandardRPNHead (plus the norm's)
    stock = build_model(get_gn_cfg(GN_FPN, TINY_OPTS))
    assert set(stock.proposal_generator.rpn_head.state_dict()) == set(
        plain.proposal_generator.rpn_head.state_dict())


def caffe2_blob_name(param_name):
    """detectron2 ResNet parameter name -> Detectron (Caffe2) blob name, e.g.
    ``res2.0.conv1.norm.weight`` -> ``res2_0_branch2a_gn_s``."""
    module, kind = param_name.rsplit(".", 1)
    suffix = {"weight": "w", "bias": "b"}[kind]
    if module.endswith(".norm"):
        module, suffix = module[: -len(".norm")], {"w": "gn_s", "b": "gn_b"}[suffix]
    if module == "stem.conv1":
        return f"conv1_{suffix}"
    stage, block, conv = module.split(".")
    branch = {"shortcut": "branch1", "conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c"}[conv]
    return f"{stage}_{block}_{branch}_{suffix}"


@pytest.mark.zoo
def test_detectron_gn_imagenet_blobs_load_into_gn_r50_fpn(tmp_path):
    cfg = get_gn_cfg(GN_FPN, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up.state_dict()
    rng = np.random.default_rng(0)
    blobs = {caffe2_blob_name(k): rng.standard_normal(v.shape).astype(np.float32) for k, v in bottom_up.items()}
    assert "res2_0_branch2a_gn_s" in blobs and "conv1_gn_b" in blobs and "res5_2_branch2c_w" in blobs
    blobs["pred_w"] = rng.standard_normal((1000, 2048)).astype(np.float32)  # ImageNet classifier: unused
    blobs["pred_b"] = np.zeros(1000, dtype=np.float32)
    path = tmp_path / "R-50-GN.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f)
    DetectionCheckpointer(model).load(str(path))
    loaded = model.backbone.bottom_up.state_dict()
    assert len(loaded) == len(blobs) - 2 == 159  # 53 convs: weight, GN gamma, GN beta
    for name, tensor in loaded.items():
        np.testing.assert_array_equal(tensor.numpy(), blobs[caffe2_blob_name(name)], err_msg=name)
