"""Box-predictor inference whose ONNX graph runs NMS class by class with ONNX's NonMaxSuppression operator.

detectron2's ``fast_rcnn_inference_single_image`` runs torchvision's batched NMS over every (RoI, class) pair
above ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` and keeps the ``TEST.DETECTIONS_PER_IMAGE`` best survivors. Exported
to ONNX, that is one ``NonMaxSuppression`` over all pairs with no limit on what it keeps (80,000 pairs per image
for 1000 RoIs x 80 classes at a low threshold). Greedy NMS decides a box by the higher-scoring boxes of its class
alone, and at most ``DETECTIONS_PER_IMAGE`` survivors of one class can be among the best of the image, so NMS per
class that stops after that many survivors keeps the same detections. ONNX's operator does exactly that when the
classes are its batch (``max_output_boxes_per_class``). Timings: docs/DEPLOY.md.
"""
import sys

import torch
from torchvision.ops import nms

from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances


class NonMaxSuppression(torch.autograd.Function):
    """ONNX's ``NonMaxSuppression`` (``center_point_box`` 0): exported as the operator, computed in eager with
    torchvision's ``nms`` (the same greedy rule: a box goes when its IoU with a kept box of higher score exceeds
    ``iou_threshold``).

    ``boxes`` B x N x 4 (corners), ``scores`` B x C x N; returns the (batch, class, box) index rows of the kept
    boxes, at most ``max_per_class`` per (batch, class), each class's in descending score order, among the boxes
    whose score is above ``score_threshold``.
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_per_class, iou_threshold, score_threshold):
        rows = [torch.zeros((0, 3), dtype=torch.int64, device=boxes.device)]
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                candidates = (scores[b, c] > score_threshold).nonzero().flatten()
                kept = candidates[nms(boxes[b, candidates], scores[b, c, candidates], iou_threshold)][:max_per_class]
                rows.append(torch.stack([torch.full_like(kept, b), torch.full_like(kept, c), kept], dim=1))
        return torch.cat(rows)

    @staticmethod
    def symbolic(g, boxes, scores, max_per_class, iou_threshold, score_threshold):
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.int64)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)))


def per_class_nms_inference_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk_per_image):
    """detectron2's ``fast_rcnn_inference_single_image`` (same arguments and results) with NMS per class, each
    stopped after ``topk_per_image`` survivors, as a graph ``torch.onnx.export`` records whole.

    Pairs detectron2 drops (non-finite rows, scores not above ``score_thresh``) get score -inf, below the
    operator's threshold. Detections equal detectron2's, except that exactly tied scores may come in another
    order, and where such a tie straddles the ``topk_per_image``-th place another of them may be kept. The kept
    rows are RoI indices (detectron2's count the finite rows only: the same when every row is finite).
    """
    num_classes = scores.shape[1] - 1
    valid, boxes = finite_rows_and_clipped_boxes(boxes, scores, image_shape)
    class_boxes = boxes.expand(-1, num_classes, 4).transpose(0, 1).contiguous()  # K x R x 4: a class per batch
    foreground = scores[:, :-1]
    class_scores = torch.where(valid[:, None] & (foreground > score_thresh), foreground,
                               torch.full_like(foreground, float("-inf"))).t().contiguous()  # K x R
    selected = NonMaxSuppression.apply(class_boxes, class_scores[:, None, :],
                                       topk_per_image if topk_per_image >= 0 else sys.maxsize,
                                       float(nms_thresh), float(score_thresh))
    classes, rows = selected[:, 0], selected[:, 2]
    kept_scores = class_scores[classes, rows]
    order = kept_scores.argsort(descending=True)
    if topk_per_image >= 0:
        order = order[:topk_per_image]
    classes, rows = classes[order], rows[order]
    return detections(image_shape, class_boxes[classes, rows], kept_scores[order], classes), rows


def finite_rows_and_clipped_boxes(boxes, scores, image_shape):
    """The first step of detectron2's ``fast_rcnn_inference_single_image`` in a traceable form: which RoIs have
    finite boxes and scores (R), and the boxes clipped to the image, R x K x 4 (R x 1 x 4 for class-agnostic
    boxes). Non-finite rows are zeroed first (``Boxes.clip`` refuses them); callers drop them by ``valid``."""
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    clipped = Boxes(torch.where(valid[:, None], boxes, torch.zeros_like(boxes)).reshape(-1, 4))
    clipped.clip(image_shape)
    return valid, clipped.tensor.view(-1, boxes.shape[1] // 4, 4)


def detections(image_shape, boxes, scores, classes):
    """``Instances`` of detected boxes as detectron2's box predictor returns them."""
    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes)
    result.scores = scores
    result.pred_classes = classes
    return result


class OnnxNMSOutputLayers(FastRCNNOutputLayers):
    """detectron2's FastRCNNOutputLayers whose ONNX graph selects detections with
    :func:`per_class_nms_inference_single_image`. Same parameters, losses and eager results: only ``inference``
    under ``torch.onnx.export`` differs."""

    @classmethod
    def like(cls, predictor, cfg, input_shape):
        """A ``cls`` built from ``cfg`` and ``input_shape`` as detectron2 built ``predictor``, with its weights.
        The global random state is left as building ``predictor`` left it, so the layers built after it
        initialise as in detectron2's model."""
        with torch.random.fork_rng(devices=[]):
            built = cls(cfg, input_shape)
        built.load_state_dict(predictor.state_dict())
        return built

    def inference(self, predictions, proposals):
        if not torch.onnx.is_in_onnx_export():
            return super().inference(predictions, proposals)
        return self.inference_per_image(per_class_nms_inference_single_image, predictions, proposals)

    def inference_per_image(self, inference_single_image, predictions, proposals):
        """detectron2's ``fast_rcnn_inference`` with ``inference_single_image`` for its per-image function:
        ``predictions`` (class scores, box deltas of every RoI) -> (instances per image, kept RoIs per image)."""
        boxes = self.predict_boxes(predictions, proposals)
        scores = self.predict_probs(predictions, proposals)
        results = [
            inference_single_image(
                boxes_per_image, scores_per_image, proposals_per_image.image_size, self.test_score_thresh,
                self.test_nms_thresh, self.test_topk_per_image,
            )
            for boxes_per_image, scores_per_image, proposals_per_image in zip(boxes, scores, proposals)
        ]
        return [instances for instances, _ in results], [kept for _, kept in results]
