"""Box-predictor inference that runs NMS on the top-scoring candidates first, on CPU.

detectron2 runs per-class NMS over every (proposal, class) pair above ``MODEL.ROI_HEADS.SCORE_THRESH_TEST``
(80,000 pairs per image for 1000 proposals x 80 classes at a low threshold) and then keeps the
``TEST.DETECTIONS_PER_IMAGE`` best survivors. Greedy NMS decides a box by the higher-scoring boxes of its class
alone, so NMS over the pairs above a score t decides those pairs exactly as NMS over all of them does, and
every survivor above t outranks every pair below it. Once the pairs above t leave ``DETECTIONS_PER_IMAGE``
survivors, those are the full run's detections, and the rest need no NMS.
"""
from typing import Tuple

import torch
from torchvision.ops import batched_nms

from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image

from ..layers.onnx_nms import OnnxNMSOutputLayers, detections, finite_rows_and_clipped_boxes

# Pairs that the first NMS runs on, per detection kept; each retry takes 4x more.
FIRST_CANDIDATES_PER_DETECTION = 4
GROWTH = 4


def top_scores_first_inference_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image):
    """detectron2's ``fast_rcnn_inference_single_image`` (same arguments and results), run on the top-scoring
    pairs first.

    The subset is chosen through detectron2's own score threshold: t is the score that leaves at most
    ``FIRST_CANDIDATES_PER_DETECTION * topk_per_image`` pairs strictly above it (so pairs with equal scores are
    all in or all out). If NMS on them keeps fewer than ``topk_per_image`` detections, t is lowered to leave
    ``GROWTH`` times more, down to ``score_thresh`` itself, which is the full run. Detections equal
    detectron2's, except that detections with exactly equal scores may come in another order, and where such a
    tie straddles the ``topk_per_image``-th place another of them may be kept (detectron2's own order among
    equal scores comes from an unstable sort and depends on how many pairs torchvision's batched NMS sees).
    For the same reason a pair whose IoU lies within float rounding (~1e-4) of ``nms_thresh`` may be decided
    otherwise: torchvision's CPU batched NMS offsets boxes by class up to 1000 boxes and loops over classes above,
    and the offset costs a few thousandths of a pixel; detectron2 itself decides such a pair by its pair count.
    """
    if topk_per_image >= 0:
        foreground = scores[:, :-1].flatten()  # the last column is background
        candidates = FIRST_CANDIDATES_PER_DETECTION * max(topk_per_image, 1)
        while candidates < foreground.numel():
            thresh = foreground.topk(candidates + 1).values[-1].item()
            if not thresh > score_thresh:  # also stops on NaN; the full run drops non-finite rows
                break
            result = fast_rcnn_inference_single_image(boxes, scores, image_shape, thresh, nms_thresh, topk_per_image)
            if len(result[0]) >= topk_per_image:
                return result
            candidates *= GROWTH
    return fast_rcnn_inference_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image)


def traceable_top_scores_first_inference_single_image(boxes, scores, image_shape, score_thresh, nms_thresh,
                                                      topk_per_image):
    """:func:`top_scores_first_inference_single_image` in a form ``torch.jit.trace`` records whole: the box
    clipping is traced, the retry loop and detectron2's selection (:func:`_select_top_scores_first`) are
    TorchScript, so the exported file keeps the loop and decides every threshold on its own input."""
    valid, clipped = finite_rows_and_clipped_boxes(boxes, scores, image_shape)
    kept_boxes, kept_scores, classes, rows = _select_top_scores_first(
        clipped, scores, valid, float(score_thresh), float(nms_thresh), int(topk_per_image),
        FIRST_CANDIDATES_PER_DETECTION, GROWTH)
    return detections(image_shape, kept_boxes, kept_scores, classes), rows


@torch.jit.script_if_tracing
def _select_top_scores_first(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, score_thresh: float,
                             nms_thresh: float, topk_per_image: int, first_candidates: int,
                             growth: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the loop of top_scores_first_inference_single_image, in TorchScript
    if topk_per_image >= 0:
        foreground = scores[:, :-1].flatten()
        candidates = first_candidates * max(topk_per_image, 1)
        while candidates < foreground.numel():
            thresh = float(foreground.topk(candidates + 1).values[-1])
            if not thresh > score_thresh:
                break
            result = _select(boxes, scores, valid, thresh, nms_thresh, topk_per_image)
            if result[0].shape[0] >= topk_per_image:
                return result
            candidates *= growth
    return _select(boxes, scores, valid, score_thresh, nms_thresh, topk_per_image)


def _select(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, score_thresh: float, nms_thresh: float,
            topk_per_image: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # follows detectron2's fast_rcnn_inference_single_image after its box clipping (boxes: R x K x 4, clipped),
    # in TorchScript; returns boxes, scores, classes and the rows they came from
    if not bool(valid.all()):
        boxes = boxes[valid]
        scores = scores[valid]
    scores = scores[:, :-1]
    filter_mask = scores > score_thresh
    filter_inds = filter_mask.nonzero()
    if boxes.shape[1] == 1:
        boxes = boxes[filter_inds[:, 0], 0]
    else:
        boxes = boxes[filter_mask]
    scores = scores[filter_mask]
    keep = batched_nms(boxes, scores, filter_inds[:, 1], nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    filter_inds = filter_inds[keep]
    return boxes[keep], scores[keep], filter_inds[:, 1], filter_inds[:, 0]


class TopScoresFirstOutputLayers(OnnxNMSOutputLayers):
    """detectron2's FastRCNNOutputLayers whose CPU inference runs NMS on the top-scoring pairs first.

    Same parameters, losses and detections (see :func:`top_scores_first_inference_single_image`); only
    ``inference`` differs, and off the CPU it is detectron2's (``fast_rcnn_inference``: the retry loop reads a
    threshold with ``.item()``, a device synchronisation per step on a GPU). Under ``torch.jit.trace`` it runs
    :func:`traceable_top_scores_first_inference_single_image`, the same selection with the loop in TorchScript.
    """

    def inference(self, predictions, proposals):
        if predictions[0].device.type != "cpu":  # predictions: (class scores, box deltas) of every RoI
            return super().inference(predictions, proposals)
        # in torch.jit.trace, the form whose file keeps the data-dependent loop
        return self.inference_per_image(
            traceable_top_scores_first_inference_single_image if torch.jit.is_tracing()
            else top_scores_first_inference_single_image, predictions, proposals)
