"""GroupNorm that computes RoI-sized bfloat16 channels_last CPU maps on an NCHW copy."""
import torch

from ..layers.layout import is_channels_last
from ..layers.norm import GroupNorm

# PyTorch's CPU GroupNorm on a channels_last input with H*W below this parallelises over (n, g) and vectorises
# over the C/G channels of one group only (at::native's GroupNormKernelImplChannelsLastInternal).
CHANNELS_LAST_SMALL_MAP = 1024
# Channels per group from which that path fills a vector register (a 512-bit register holds 32 bfloat16).
FULL_VECTOR_CHANNELS = 32


def runs_faster_in_nchw(x, num_groups):
    """Whether GroupNorm on ``x`` is faster through an NCHW copy and back than on ``x`` as it is.

    True for bfloat16 channels_last CPU maps smaller than ``CHANNELS_LAST_SMALL_MAP`` pixels with fewer than
    ``FULL_VECTOR_CHANNELS`` channels per group: the RoI features of the box (7x7) and mask (14x14) heads
    under bf16 autocast, 256 channels in 32 groups of 8. In float32 the channels_last kernel is the faster one
    on the same maps (measurements: docs/SPEED.md).
    """
    return (
        x.dtype == torch.bfloat16 and is_channels_last(x) and x.device.type == "cpu"
        and x.shape[2] * x.shape[3] < CHANNELS_LAST_SMALL_MAP and x.shape[1] // num_groups < FULL_VECTOR_CHANNELS
    )


class NCHWCopyGroupNorm(GroupNorm):
    """gn-det's GroupNorm that runs small bf16 channels_last CPU maps (:func:`runs_faster_in_nchw`) on an NCHW
    copy and returns the result channels_last. Values and gradients are exactly the NCHW kernel's; every other
    input (off the CPU included) runs as it is, as ``nn.GroupNorm``."""

    def forward(self, x):
        if runs_faster_in_nchw(x, self.num_groups):
            return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)
        return super().forward(x)
