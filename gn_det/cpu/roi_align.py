"""ROIAlign as a sparse x dense matrix product on CPU (measurements: docs/SPEED.md)."""
import torch
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from detectron2.layers import ROIAlign

from ..layers.layout import is_channels_last


def roi_align_sampling_matrix(rois, spatial_scale, output_size, sampling_ratio, aligned, feature_shape):
    """ROIAlign as a sparse matrix: (rows, cols, weights) with 4 entries per sampling point.

    Row ``r * PH * PW + ph * PW + pw`` is output bin (ph, pw) of roi r, column ``(n * H + y) * W + x`` is pixel
    (y, x) of image n. The sampling points, their validity and bilinear weights are those of torchvision's
    CPU/CUDA kernel (adaptive ``ceil(roi_size / bins)`` points per bin when ``sampling_ratio`` is 0), each
    weight already divided by its bin's point count. Rows come out in non-decreasing order.
    """
    _, _, height, width = feature_shape
    bins_h, bins_w = output_size
    offset = 0.5 if aligned else 0.0
    num_rois = rois.shape[0]
    image = rois[:, 0].long()
    start_w = rois[:, 1] * spatial_scale - offset
    start_h = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_w
    roi_h = rois[:, 4] * spatial_scale - offset - start_h
    if not aligned:  # the legacy kernel makes every roi at least 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_w, bin_h = roi_w / bins_w, roi_h / bins_h
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((num_rois,), sampling_ratio, dtype=torch.long, device=rois.device)
    else:
        grid_h = torch.ceil(roi_h / bins_h).long().clamp(min=0)
        grid_w = torch.ceil(roi_w / bins_w).long().clamp(min=0)
    points_per_roi = bins_h * bins_w * grid_h * grid_w
    roi = torch.repeat_interleave(torch.arange(num_rois, device=rois.device), points_per_roi)
    local = torch.arange(roi.shape[0], device=rois.device) - (torch.cumsum(points_per_roi, 0) - points_per_roi)[roi]
    # local = ((ph * bins_w + pw) * grid_h + iy) * grid_w + ix, the kernel's loop order
    gh, gw = grid_h[roi], grid_w[roi]
    ix, rest = local % gw, local // gw
    iy, rest = rest % gh, rest // gh
    pw, ph = rest % bins_w, rest // bins_w
    # same operations in the same order as the kernel, so the points agree to the last float32 bit; the sample
    # indices are cast before adding 0.5 because a saved TorchScript graph holds 0.5 as a double tensor, which
    # would otherwise make long + 0.5 float64 wherever the graph runs unoptimized
    y = start_h[roi] + ph * bin_h[roi] + (iy.to(bin_h.dtype) + 0.5) * bin_h[roi] / gh
    x = start_w[roi] + pw * bin_w[roi] + (ix.to(bin_w.dtype) + 0.5) * bin_w[roi] / gw
    inside = ~((y < -1.0) | (y > height) | (x < -1.0) | (x > width))
    y, x = y.clamp(min=0.0), x.clamp(min=0.0)
    y_low, x_low = y.long(), x.long()
    y_edge, x_edge = y_low >= height - 1, x_low >= width - 1
    y_low = torch.where(y_edge, height - 1, y_low)
    x_low = torch.where(x_edge, width - 1, x_low)
    y_high = torch.where(y_edge, height - 1, y_low + 1)
    x_high = torch.where(x_edge, width - 1, x_low + 1)
    ly = torch.where(y_edge, 0.0, y - y_low)
    lx = torch.where(x_edge, 0.0, x - x_low)
    hy, hx = 1.0 - ly, 1.0 - lx
    scale = inside.to(y.dtype) / (grid_h * grid_w).clamp(min=1)[roi]
    weights = torch.stack([hy * hx, hy * lx, ly * hx, ly * lx], dim=1) * scale[:, None]
    row_low = (image[roi] * height + y_low) * width
    row_high = (image[roi] * height + y_high) * width
    cols = torch.stack([row_low + x_low, row_low + x_high, row_high + x_low, row_high + x_high], dim=1)
    rows = roi * (bins_h * bins_w) + ph * bins_w + pw
    return rows, cols.flatten(), weights.flatten()


class SparseMatrixROIAlign(ROIAlign):
    """detectron2's ROIAlign, computed on CPU as one sparse x dense matrix product per feature level.

    Each output bin is a weighted sum of feature pixels (torchvision's sampling points and bilinear weights,
    see :func:`roi_align_sampling_matrix`), so ROIAlign is ``(R*PH*PW, N*H*W) @ (N*H*W, C)``, run by
    ``F.embedding_bag`` over the NHWC feature rows (a view of channels_last features); autograd's backward is
    the transposed product. torchvision's CPU backward is a single-threaded loop that recomputes the bilinear
    weights for every channel. It places its sampling points from float32 boxes: detectron2's ROIAlign casts
    the boxes to the feature dtype, which under bf16 autocast rounds coordinates to 2 px steps between 256 and
    512 px. It pools in float32, except in CPU inference on bf16 features (:func:`pools_in_bfloat16`). Float32
    outputs equal torchvision's up to float32 summation order (~1e-6); the result has the input's dtype, as
    with torchvision's autocast wrapper, and its memory format.

    Off the CPU it is detectron2's ROIAlign (torchvision's kernel), whatever the model's settings.
    """

    def forward(self, input, rois):
        if input.device.type != "cpu":
            return super().forward(input, rois)
        bins_h, bins_w = _pair(self.output_size)
        rows, cols, weights = roi_align_sampling_matrix(
            rois.detach().float(), self.spatial_scale, (bins_h, bins_w), self.sampling_ratio, self.aligned,
            input.shape,
        )
        num_rows = rois.shape[0] * bins_h * bins_w
        # rows (one per sampling point, 4 entries each) are non-decreasing: a row's first point is where its
        # index would be inserted (a row without points, of an empty RoI, gets an empty bag); this needs no
        # bincount, which torch.jit.trace's ONNX export lacks
        offsets = torch.searchsorted(rows, torch.arange(num_rows, device=rows.device)) * 4
        pixels = input.permute(0, 2, 3, 1).reshape(-1, input.shape[1])  # a view when channels_last
        if pools_in_bfloat16(input):
            weights = weights.to(input.dtype)
        else:
            pixels = pixels.float()
        pooled = F.embedding_bag(cols, pixels, offsets, mode="sum", per_sample_weights=weights)
        pooled = pooled.view(-1, bins_h, bins_w, input.shape[1]).permute(0, 3, 1, 2)  # channels_last
        if is_channels_last(input):
            return pooled.to(input.dtype)
        return pooled.to(input.dtype, memory_format=torch.contiguous_format)  # NCHW, as torchvision's


def pools_in_bfloat16(features):
    """Whether :class:`SparseMatrixROIAlign` reads ``features`` as they are, with bfloat16 bilinear weights.

    Only in CPU inference on bfloat16 features: PyTorch's CPU ``embedding_bag`` still sums in float32, and
    skipping the float32 copy of every FPN level saves its time at an error of the order of the bfloat16
    output's own rounding (docs/SPEED.md). Training pools in float32: its backward accumulates the
    gradients of overlapping RoIs into the feature rows, which bfloat16 would round at every addition.
    """
    return (features.dtype == torch.bfloat16 and features.device.type == "cpu"
            and not (torch.is_grad_enabled() and features.requires_grad))

