"""detectron2's ROIPooler with sparse-matrix ROIAlign levels that keeps the features' memory format on CPU."""
import torch
from torch import nn

from detectron2.layers import ROIAlign, nonzero_tuple
from detectron2.modeling.poolers import ROIPooler, assign_boxes_to_levels, convert_boxes_to_pooler_format

from ..layers.layout import is_channels_last
from .roi_align import SparseMatrixROIAlign


class LayoutPreservingROIPooler(ROIPooler):
    """detectron2's ROIPooler whose ROIAlign levels are :class:`SparseMatrixROIAlign` and which, on CPU,
    gathers the levels' pooled RoIs into a tensor of the features' layout.

    detectron2 pools each FPN level and ``index_put_``s the result into an NCHW tensor. On channels_last CPU
    features a level's :class:`SparseMatrixROIAlign` result is channels_last, so that gather would transpose
    every RoI element by element (on CPU the slowest kind of copy, and once more in the backward); into a
    channels_last tensor it copies whole RoIs, and the heads' channels_last convs take it as it is. Same
    values as detectron2's (tested). Single-level poolers, empty batches, NCHW features and features off the
    CPU take detectron2's own ``ROIPooler.forward``.
    """

    def __init__(self, output_size, scales, sampling_ratio, pooler_type, canonical_box_size=224,
                 canonical_level=4):
        super().__init__(output_size, scales, sampling_ratio, pooler_type, canonical_box_size, canonical_level)
        if pooler_type in ("ROIAlign", "ROIAlignV2"):
            # ROIPooler.__init__ has no seam for the level op: its ROIAlign levels are rebuilt here, in the
            # constructor, with the same settings (they hold no state)
            self.level_poolers = nn.ModuleList(
                SparseMatrixROIAlign(pooler.output_size, pooler.spatial_scale, pooler.sampling_ratio, pooler.aligned)
                for pooler in self.level_poolers
            )

    @classmethod
    def like(cls, pooler):
        """A LayoutPreservingROIPooler with the settings of detectron2's ROIPooler ``pooler``, or ``pooler``
        itself when its levels are not ROIAlign (ROIPool, rotated boxes)."""
        first = pooler.level_poolers[0]
        if type(first) is not ROIAlign:
            return pooler
        return cls(
            pooler.output_size, [level.spatial_scale for level in pooler.level_poolers], first.sampling_ratio,
            "ROIAlignV2" if first.aligned else "ROIAlign", pooler.canonical_box_size, pooler.canonical_level,
        )

    def forward(self, x, box_lists):
        if (len(self.level_poolers) == 1 or len(box_lists) == 0 or x[0].device.type != "cpu"
                or not is_channels_last(x[0])):
            return super().forward(x, box_lists)
        # the multi-level branch of detectron2's ROIPooler.forward, gathering into a channels_last tensor
        boxes = convert_boxes_to_pooler_format(box_lists)
        levels = assign_boxes_to_levels(
            box_lists, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        # No zero fill: assign_boxes_to_levels clamps every box into [min_level, max_level], so the levels'
        # index sets below cover every row exactly once.
        # boxes.shape[0], not len(boxes): torch.jit.trace records the size, not the traced image's count
        output = torch.empty((boxes.shape[0], x[0].shape[1], *self.output_size), dtype=x[0].dtype,
                             device=x[0].device, memory_format=torch.channels_last)
        for level, pooler in enumerate(self.level_poolers):
            inds = nonzero_tuple(levels == level)[0]
            output.index_put_((inds,), pooler(x[level], boxes[inds]))
        return output
