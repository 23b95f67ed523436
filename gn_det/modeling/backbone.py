"""Registered ResNet backbones (C4 and FPN, depths 18-152) whose "GN" norms follow ``MODEL.GN``.

They are detectron2's own builders given a config whose "GN" keys hold gn-det's GroupNormSpec, so modules and
parameter names are exactly detectron2's: Detectron/detectron2 checkpoints (``*_gn_s``/``*_gn_b`` Caffe2 blobs
included) load as usual.
"""
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .norm_sites import finish_norm_sites, with_gn_specs


def _gn_built(build, cfg, input_shape):
    return finish_norm_sites(build(with_gn_specs(cfg), input_shape), cfg.MODEL.GN.WS, "backbone")


def _follows_model_gn(build):
    build.follows_model_gn = True  # read by gn_det.config's check of the norm sites, through the registry
    return build


@BACKBONE_REGISTRY.register()
@_follows_model_gn
def build_gn_resnet_backbone(cfg, input_shape):
    """ResNet (C4 models use it with ``Res5ROIHeads``); norm from ``MODEL.RESNETS.NORM``."""
    return _gn_built(build_resnet_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
@_follows_model_gn
def build_gn_resnet_fpn_backbone(cfg, input_shape):
    """ResNet + FPN with P6 by max-pool (Mask R-CNN); FPN lateral/output convs take ``MODEL.FPN.NORM``."""
    return _gn_built(build_resnet_fpn_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
@_follows_model_gn
def build_gn_retinanet_resnet_fpn_backbone(cfg, input_shape):
    """ResNet + FPN with P6/P7 convs (RetinaNet)."""
    return _gn_built(build_retinanet_resnet_fpn_backbone, cfg, input_shape)
