"""Weight Standardization (Qiao et al., 2019), the conv half of GN+WS."""
from torch.nn import functional as F

from detectron2.layers import Conv2d


def standardize_weight(weight, eps=1e-5):
    """Per output channel: subtract the mean and divide by the std over the fan-in (in_ch x kh x kw)."""
    flat = weight.flatten(1)
    mean = flat.mean(dim=1, keepdim=True)
    var = flat.var(dim=1, unbiased=False, keepdim=True)
    return ((flat - mean) / (var + eps).sqrt()).view_as(weight)


class WSConv2d(Conv2d):
    """detectron2's ``Conv2d`` (conv, then its ``norm``, then its ``activation``) on a standardised weight.

    It adds no parameter, so a state dict is the same as the plain conv's.
    """

    ws_eps = 1e-5

    def forward(self, x):
        x = F.conv2d(
            x, standardize_weight(self.weight, self.ws_eps), self.bias, self.stride, self.padding,
            self.dilation, self.groups,
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def convert_to_ws(module):
    """Turn every detectron2 ``Conv2d`` of ``module`` that carries a norm into a ``WSConv2d``, in place.

    Only the class changes (no new parameter, no copy), so names, weights and hooks stay as they were.
    Returns the number of convs converted.
    """
    converted = 0
    for child in module.modules():
        if type(child) is Conv2d and child.norm is not None:
            child.__class__ = WSConv2d
            converted += 1
    return converted
