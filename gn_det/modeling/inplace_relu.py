"""In-place ReLUs in the heads: part of the fast path (numbers: docs/SPEED.md)."""
from torch import nn

from detectron2.layers import Conv2d
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

# Heads that are an nn.Sequential run as ``for layer in self: x = layer(x)``: each of their ReLU children
# (after an FC layer or the mask deconv) reads the previous layer's output, which nothing else reads.
SEQUENTIAL_HEADS = (FastRCNNConvFCHead, MaskRCNNConvUpsampleHead)


def use_inplace_relus(model):
    """Make the ReLU of every detectron2 ``Conv2d`` and of the sequential box and mask heads run in place.

    A ``Conv2d`` applies its activation to its own conv (+ norm) output, a tensor local to its ``forward``; the
    sequential heads' ReLUs follow an FC layer or the deconv. Overwriting those tensors changes no value, and
    none of the producers (convolution, linear, GroupNorm, frozen BN) keeps its output for the backward pass;
    if one did, autograd's version check would raise. detectron2's ResNet blocks already use ``F.relu_``.
    What it saves is a fresh activation tensor per layer: on CPU a new large tensor is page-faulted in
    (glibc maps it afresh), and the out-of-place ReLU's extra write.
    """
    for module in model.modules():
        if isinstance(module, Conv2d) and isinstance(module.activation, nn.ReLU):
            module.activation.inplace = True
        elif isinstance(module, SEQUENTIAL_HEADS):
            for child in module.children():
                if isinstance(child, nn.ReLU):
                    child.inplace = True
    return model
