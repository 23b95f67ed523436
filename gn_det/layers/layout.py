"""Memory-layout checks shared by the fast path's layers."""
import torch


def is_channels_last(x):
    """Whether ``x`` is a channels_last (NHWC) 4-D tensor and not also a plain contiguous one (as 1x1 maps are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
