"""gn-det's CPU fast path: one feature, ``MODEL.CPU_FAST_PATH``, built into the model at construction.

Each piece is a subclass (or a part) of the detectron2 module it stands for, built in its place when the key is
on, so ``print(model)`` shows it. Each computes exactly as detectron2 does when its input is not on the CPU
(a model built on CPU and moved to a GPU included). Parameters and state-dict names are detectron2's.
Measurements: docs/SPEED.md.

=============================  ==========================================  ================================
piece                          replaces in detectron2, and why faster      may change
=============================  ==========================================  ================================
``SparseMatrixROIAlign``       ``ROIAlign`` (torchvision's kernel): one     float32 summation order (~1e-6);
(roi_align.py)                 sparse x dense product per level            bf16 features in inference are
                               (``F.embedding_bag`` on NHWC rows); the     pooled with bf16 weights
                               backward is the transposed product, where   (error of bf16 rounding)
                               torchvision's CPU backward is one thread
``LayoutPreservingROIPooler``  ``ROIPooler``: its levels are               nothing (tested equal)
(pooler.py)                    ``SparseMatrixROIAlign``; gathers them
                               into a channels_last tensor, no per-element
                               transposition (follows the multi-level
                               branch of ``ROIPooler.forward``)
``TopScoresFirstOutputLayers`` ``FastRCNNOutputLayers.inference``: NMS on   order of exactly tied scores, and
(box_predictor.py)             the ~4 x ``TEST.DETECTIONS_PER_IMAGE`` best  which of them is kept at the last
                               (box, class) pairs first, not all 80,000    place (follows
                                                                           ``fast_rcnn_inference``)
``RoIChunkedInference``        box / mask head and C4 res5 inference on    bf16 kernels' rounding, which
(roi_chunks.py)                all RoIs at once: chunks whose activations  depends on the RoIs per call
                               stay in cache
``CPUInplaceReLU`` (relu.py)   the heads' ``nn.ReLU()``: in place, no      nothing (tested equal)
                               fresh activation tensor per layer
``NCHWCopyGroupNorm``          GroupNorm on RoI-sized bf16 channels_last   nothing (tested equal)
(group_norm.py)                maps: PyTorch's NCHW kernel on a copy is
                               faster
``fused_sgd`` (sgd.py)         detectron2's foreach SGD: one pass per      float rounding of the update
                               parameter, no new gradient tensor for the
                               weight decay
=============================  ==========================================  ================================

gn-det's registered heads build these (``gn_det/modeling/heads.py``: ``GNStandardROIHeads``,
``GNRes5ROIHeads``, ``GNConvFCHead``, ``GNMaskHead``, ``GNRPNHead``), the norm factory builds
``NCHWCopyGroupNorm``, and ``build_gn_optimizer`` the fused SGD, each when :func:`cpu_fast_path` says so
(without it, detectron2's SGD as ``SGDKeepingItsStep``: a run resumed from a fused checkpoint steps as the key
says, not as the checkpoint's optimizer did).
"""
import functools
import logging

import torch

from .box_predictor import TopScoresFirstOutputLayers, top_scores_first_inference_single_image
from .group_norm import NCHWCopyGroupNorm, runs_faster_in_nchw
from .pooler import LayoutPreservingROIPooler
from .relu import CPUInplaceReLU, use_cpu_inplace_relus
from .roi_align import SparseMatrixROIAlign, pools_in_bfloat16, roi_align_sampling_matrix
from .roi_chunks import INFERENCE_CHUNK_BYTES, RoIChunkedInference
from .sgd import fused_sgd, sgd_keeping_its_step

logger = logging.getLogger(__name__)


def cpu_fast_path(cfg):
    """Whether ``cfg`` builds the CPU fast path (``MODEL.CPU_FAST_PATH``).

    On for a model whose ``MODEL.DEVICE`` is not the CPU, the pieces are built all the same (the model may be
    moved) and compute as detectron2 does there; that is logged once.
    """
    if cfg.MODEL.CPU_FAST_PATH and torch.device(cfg.MODEL.DEVICE).type != "cpu":
        log_cpu_fast_path_off_cpu(cfg.MODEL.DEVICE)
    return bool(cfg.MODEL.CPU_FAST_PATH)


@functools.lru_cache(maxsize=None)  # once per device and process: every head's builder asks
def log_cpu_fast_path_off_cpu(device):
    logger.warning("MODEL.CPU_FAST_PATH=True on MODEL.DEVICE=%r: its pieces compute as detectron2 does off the "
                   "CPU (gn_det/cpu)", device)
