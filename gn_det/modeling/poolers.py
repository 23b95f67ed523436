"""An ROIPooler that keeps the features' memory format: part of the fast path (numbers: docs/SPEED.md)."""
import torch

from detectron2.layers import nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format

from ..layers.layout import is_channels_last


class LayoutPreservingROIPooler(ROIPooler):
    """detectron2's multi-level ROIPooler gathering the levels' pooled RoIs into a tensor of the features' layout.

    detectron2 pools each FPN level and ``index_put_``s the result into an NCHW tensor. On channels_last
    features a level's :class:`~gn_det.layers.SparseMatrixROIAlign` result is channels_last, so that gather
    would transpose every RoI element by element (on CPU the slowest kind of copy, and once more in the
    backward); into a channels_last tensor it copies whole RoIs, and the heads' channels_last convs take it as
    it is. Same values as detectron2's (tested); single-level poolers, empty batches and NCHW features take
    detectron2's own path.
    """

    def forward(self, x, box_lists):
        if len(self.level_poolers) == 1 or len(box_lists) == 0 or not is_channels_last(x[0]):
            return super().forward(x, box_lists)
        boxes = convert_boxes_to_pooler_format(box_lists)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        # No zero fill: assign_boxes_to_levels clamps every box into [min_level, max_level], so the levels'
        # index sets below cover every row exactly once.
        output = torch.empty((len(boxes), x[0].shape[1], *self.output_size), dtype=x[0].dtype,
                             device=x[0].device, memory_format=torch.channels_last)
        for level, pooler in enumerate(self.level_poolers):
            inds = nonzero_tuple(levels == level)[0]
            output.index_put_((inds,), pooler(x[level], boxes[inds]))
        return output


def use_layout_preserving_poolers(model):
    """Make every detectron2 ROIPooler of ``model`` a LayoutPreservingROIPooler, in place.

    The subclass adds no state; its class is swapped as for the box predictor
    (:func:`~gn_det.modeling.box_predictor.use_top_scores_first_inference`).
    """
    for module in model.modules():
        if type(module) is ROIPooler:
            module.__class__ = LayoutPreservingROIPooler
    return model
