"""Registered heads whose convs take the configured norm, and that build the CPU fast path's pieces.

Each is a thin subclass of the detectron2 head it names: ``from_config`` hands the parent a config whose "GN"
keys hold gn-det's GroupNormSpec, and the built head is checked (and given GN+WS convs with ``ws``, from
``MODEL.GN.WS``) the same way as the backbones. Their constructors take plain arguments (``ws``, ``cpu_fast_path``,
norms as names or specs), so each can be named in a Python config too. Parameter names are the parent's. With ``MODEL.CPU_FAST_PATH`` they are built with
the pieces of ``gn_det.cpu`` (poolers, box predictor, chunked CPU inference, in-place CPU ReLUs); without it
they compute exactly as their parents.
"""
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import META_ARCH_REGISTRY, RPN_HEAD_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_HEADS_REGISTRY, ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
from detectron2.modeling.roi_heads.roi_heads import Res5ROIHeads, StandardROIHeads

from ..cpu import (INFERENCE_CHUNK_BYTES, CPUInplaceReLU, LayoutPreservingROIPooler, RoIChunkedInference,
                   TopScoresFirstOutputLayers, cpu_fast_path, use_cpu_inplace_relus)
from ..layers.onnx_nms import OnnxNMSOutputLayers
from .meta_arch import PrecisionLayoutMixin
from .norm_sites import finish_norm_sites, with_gn_specs


class _ConfiguredNormHead:
    """Mixin for a per-RoI head: the parent is built with gn-det's GroupNormSpec for "GN", then finished like a
    backbone (``ws``: GN+WS convs); ``cpu_fast_path`` (``MODEL.CPU_FAST_PATH``) builds it with in-place CPU
    ReLUs and chunked CPU inference.

    ``site`` is the head's path inside a GeneralizedRCNN, used in error messages.
    """

    site = ""
    follows_model_gn = True  # read by gn_det.config's check of the norm sites, through the registry

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(with_gn_specs(cfg), input_shape)
        ret["ws"] = cfg.MODEL.GN.WS
        ret["cpu_fast_path"] = cpu_fast_path(cfg)
        ret["inference_chunk_bytes"] = INFERENCE_CHUNK_BYTES if ret["cpu_fast_path"] else 0
        return ret

    @configurable
    def __init__(self, *, ws=False, cpu_fast_path=False, **kwargs):
        super().__init__(**kwargs)
        finish_norm_sites(self, ws, self.site)
        if cpu_fast_path:
            use_cpu_inplace_relus(self)


@ROI_BOX_HEAD_REGISTRY.register()
class GNConvFCHead(RoIChunkedInference, _ConfiguredNormHead, FastRCNNConvFCHead):
    """detectron2's conv+fc box head (the paper's 4conv1fc with NUM_CONV 4, NUM_FC 1), norm from
    ``MODEL.ROI_BOX_HEAD.NORM``. The paper found BN here costs ~9 AP (RoIs of one image are not i.i.d.);
    GN has no such problem (Sec. 6.1)."""

    site = "roi_heads.box_head"

    def forward(self, x):
        return self.run_in_chunks(super().forward, x)


@ROI_MASK_HEAD_REGISTRY.register()
class GNMaskHead(RoIChunkedInference, _ConfiguredNormHead, MaskRCNNConvUpsampleHead):
    """detectron2's 4-conv + deconv mask head, norm from ``MODEL.ROI_MASK_HEAD.NORM``."""

    site = "roi_heads.mask_head"

    def layers(self, x):
        return self.run_in_chunks(super().layers, x)


def with_gn_det_pooler_and_predictor(ret, pooler_key, cfg, predictor_shape):
    """Make ``ret["box_predictor"]`` of an ROI heads' constructor arguments, as detectron2 built it, gn-det's (same
    settings and weights), in place: with ``MODEL.CPU_FAST_PATH`` the CPU fast path's box predictor and
    ``ret[pooler_key]``, otherwise OnnxNMSOutputLayers (detectron2's eager inference, per-class NMS in ONNX)."""
    if cpu_fast_path(cfg):
        ret[pooler_key] = LayoutPreservingROIPooler.like(ret[pooler_key])
        ret["box_predictor"] = TopScoresFirstOutputLayers.like(ret["box_predictor"], cfg, predictor_shape)
    else:
        ret["box_predictor"] = OnnxNMSOutputLayers.like(ret["box_predictor"], cfg, predictor_shape)
    return ret


@ROI_HEADS_REGISTRY.register()
class GNStandardROIHeads(StandardROIHeads):
    """detectron2's StandardROIHeads (FPN Mask R-CNN) whose box and mask poolers and box predictor are, with
    ``MODEL.CPU_FAST_PATH``, the CPU fast path's: LayoutPreservingROIPooler and TopScoresFirstOutputLayers.
    Without it, StandardROIHeads with OnnxNMSOutputLayers, which computes as detectron2's box predictor and
    exports its NMS per class."""

    builds_cpu_fast_path = True  # read by gn_det.config's check of MODEL.CPU_FAST_PATH, through the registry

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        return with_gn_det_pooler_and_predictor(ret, "box_pooler", cfg, ret["box_head"].output_shape)

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        ret = super()._init_mask_head(cfg, input_shape)
        if ret.get("mask_pooler") is not None and cpu_fast_path(cfg):  # None: MASK_ON off, or no pooler
            ret["mask_pooler"] = LayoutPreservingROIPooler.like(ret["mask_pooler"])
        return ret


@ROI_HEADS_REGISTRY.register()
class GNRes5ROIHeads(RoIChunkedInference, Res5ROIHeads):
    """C4 ROI heads: the res5 stage that runs on each RoI takes ``MODEL.RESNETS.NORM`` from gn-det's factory
    (detectron2's own would build a fixed 32-group ``nn.GroupNorm``). With ``MODEL.CPU_FAST_PATH`` its pooler
    and box predictor are the CPU fast path's and CPU inference runs res5 on chunks of RoIs; without it the box
    predictor is OnnxNMSOutputLayers."""

    builds_cpu_fast_path = True
    follows_model_gn = True

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        res5_shape = ShapeSpec(channels=ret["box_predictor"].cls_score.in_features, height=1, width=1)
        with_gn_det_pooler_and_predictor(ret, "pooler", cfg, res5_shape)
        if cpu_fast_path(cfg):
            ret["inference_chunk_bytes"] = INFERENCE_CHUNK_BYTES
        return ret

    def _shared_roi_transform(self, features, boxes):
        # detectron2's (pool, then res5), with res5 run in chunks of RoIs
        return self.run_in_chunks(self.res5, self.pooler(features, boxes))

    @classmethod
    def _build_res5_block(cls, cfg):
        res5, out_channels = super()._build_res5_block(with_gn_specs(cfg))
        return finish_norm_sites(res5, cfg.MODEL.GN.WS, "roi_heads.res5"), out_channels


@RPN_HEAD_REGISTRY.register()
class GNRPNHead(StandardRPNHead):
    """detectron2's RPN head with an optional norm (``MODEL.RPN.NORM``) after each 3x3 conv; its ReLUs are
    CPUInplaceReLUs with ``MODEL.CPU_FAST_PATH``.

    The paper's RPN has no norm; this is for experiments. The conv keeps its bias so that detectron2's
    initialisation (zero bias on every conv) applies unchanged.
    """

    follows_model_gn = True

    @configurable
    def __init__(self, *, conv_norm="", ws=False, cpu_fast_path=False, **kwargs):
        # read by _get_rpn_conv, which the parent's __init__ calls
        self._conv_norm = conv_norm
        self._activation = CPUInplaceReLU if cpu_fast_path else nn.ReLU
        super().__init__(**kwargs)
        finish_norm_sites(self, ws, "proposal_generator.rpn_head")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["conv_norm"] = with_gn_specs(cfg).MODEL.RPN.NORM
        ret["ws"] = cfg.MODEL.GN.WS
        ret["cpu_fast_path"] = cpu_fast_path(cfg)
        return ret

    def _get_rpn_conv(self, in_channels, out_channels):
        return Conv2d(
            in_channels, out_channels, kernel_size=3, stride=1, padding=1,
            norm=get_norm(self._conv_norm, out_channels), activation=self._activation(),
        )


@META_ARCH_REGISTRY.register()
class GNRetinaNet(PrecisionLayoutMixin, RetinaNet):
    """detectron2's RetinaNet whose head convs take ``MODEL.RETINANET.NORM`` from gn-det's factory, honouring
    ``MODEL.PRECISION`` and ``MODEL.CHANNELS_LAST`` like GNGeneralizedRCNN."""

    follows_model_gn = True

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(with_gn_specs(cfg))
        finish_norm_sites(ret["head"], cfg.MODEL.GN.WS, "head")
        return ret
