"""A ReLU that overwrites its input on CPU: the heads' activations under ``MODEL.CPU_FAST_PATH``."""
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d


class CPUInplaceReLU(nn.ReLU):
    """ReLU computed in place when its input is on the CPU, out of place (detectron2's ``nn.ReLU()``) elsewhere.

    The heads give it tensors that nothing else reads: a detectron2 ``Conv2d``'s own conv (+ norm) output, or in
    the sequential box and mask heads the output of an FC layer or the mask deconv. None of those producers
    (convolution, linear, GroupNorm, frozen BN) keeps its output for the backward pass; if one did, autograd's
    version check would raise. So values and gradients are unchanged; on CPU it saves a fresh activation tensor
    per layer (glibc maps a new large tensor afresh and page-faults it in) and one write.
    """

    def forward(self, input):
        return F.relu(input, inplace=input.device.type == "cpu")


def use_cpu_inplace_relus(head):
    """Give ``head`` (being constructed: call it from the head's ``__init__``) CPUInplaceReLU activations.

    The ReLU of each of its detectron2 ``Conv2d``s, and its own ReLU children when it is an ``nn.Sequential``
    (detectron2's box and mask heads run ``for layer in self: x = layer(x)``). detectron2's constructors take no
    activation argument, so the ReLUs they create are replaced here, before the head is part of any model.
    """
    for module in head.modules():
        if isinstance(module, Conv2d) and type(module.activation) is nn.ReLU:
            module.activation = CPUInplaceReLU()
    if isinstance(head, nn.Sequential):
        for name, child in head.named_children():
            if type(child) is nn.ReLU:
                setattr(head, name, CPUInplaceReLU())
    return head
