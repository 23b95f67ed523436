"""Weight Standardization (Qiao et al., 2019), the conv half of GN+WS."""
from torch import nn
from torch.nn import functional as F

from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d

# Layers that normalize a conv's output when they follow it in an nn.Sequential (detectron2's RetinaNetHead
# builds its subnets so; "BN"/"SyncBN" there is one BN per FPN level, a CycleBatchNormList).
NORM_LAYERS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, CycleBatchNormList)


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


def ws_conv_from(conv):
    """A ``WSConv2d`` with ``conv``'s settings that holds ``conv``'s own weight, bias, norm and activation.

    Built on the meta device, so nothing is allocated or initialised before the parameters are handed over.
    """
    ws = WSConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        norm=getattr(conv, "norm", None), activation=getattr(conv, "activation", None), device="meta",
    )
    ws.weight = conv.weight
    ws.bias = conv.bias
    ws.train(conv.training)
    return ws


def normed_convs(module):
    """``(parent, name, conv)`` of every conv of ``module`` whose output a norm takes: a detectron2 ``Conv2d``
    that carries a norm, or a conv followed by a norm layer (:data:`NORM_LAYERS`) in an ``nn.Sequential``."""
    for parent in list(module.modules()):
        children = list(parent.named_children())
        for i, (name, child) in enumerate(children):
            if type(child) is Conv2d and child.norm is not None:
                yield parent, name, child
            elif (type(child) in (Conv2d, nn.Conv2d) and isinstance(parent, nn.Sequential) and i + 1 < len(children)
                    and isinstance(children[i + 1][1], NORM_LAYERS)):
                yield parent, name, child


def use_ws_convs(module):
    """Give ``module`` (being built: call it from its builder, before it is part of any model) a ``WSConv2d``
    for every conv whose output a norm takes (:func:`normed_convs`).

    detectron2's builders take no conv class, so the convs they create are replaced here; each replacement holds
    the same parameters under the same name, so state dicts are unchanged. detectron2's FPN also keeps its convs
    in plain lists (``lateral_convs``, ``output_convs``) that its forward reads; those lists are updated too.
    Returns the number of convs replaced.
    """
    replaced = {}
    for parent, name, child in list(normed_convs(module)):
        if child not in replaced:
            replaced[child] = ws_conv_from(child)
        setattr(parent, name, replaced[child])
    for parent in module.modules():
        for name, value in vars(parent).items():
            if isinstance(value, list) and any(isinstance(v, Conv2d) and v in replaced for v in value):
                setattr(parent, name, [replaced.get(v, v) if isinstance(v, Conv2d) else v for v in value])
    return len(replaced)
