"""SGD with PyTorch's fused step, for CPU training."""
import torch


def fused_sgd(sgd):
    """The same SGD (groups, settings) with PyTorch's fused step, which updates each parameter in one pass.

    detectron2 builds a foreach SGD, whose weight-decay step allocates a new gradient tensor for every
    parameter (180 MB for R50-FPN, mapped afresh every step under glibc's default allocator); the update rule
    is the same (tested to float rounding; time per step: docs/SPEED.md).
    """
    groups = [{key: value for key, value in group.items() if key not in ("foreach", "fused")}
              for group in sgd.param_groups]
    return torch.optim.SGD(groups, **{**sgd.defaults, "foreach": None, "fused": True})
