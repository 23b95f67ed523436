"""SGD with PyTorch's fused step, for CPU training, and the SGD that keeps its step when resumed."""
import torch


class SGDKeepingItsStep(torch.optim.SGD):
    """torch's SGD that keeps the step it was built with (its groups' ``foreach``/``fused`` flags) across
    ``load_state_dict``: a checkpoint's groups carry the flags of the optimizer that saved it, and torch restores
    them, so a run resumed from a fused (CPU fast path) checkpoint would otherwise step fused without the key,
    and one resumed from detectron2's foreach SGD would step foreach with it."""

    def load_state_dict(self, state_dict):
        built = [(group["foreach"], group["fused"]) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, (foreach, fused) in zip(self.param_groups, built):
            group["foreach"], group["fused"] = foreach, fused


def sgd_keeping_its_step(sgd):
    """detectron2's SGD ``sgd`` (groups, settings, step) as :class:`SGDKeepingItsStep`."""
    return SGDKeepingItsStep([dict(group) for group in sgd.param_groups], **sgd.defaults)


class FusedSGD(SGDKeepingItsStep):
    """torch's SGD with its fused step, kept fused across ``load_state_dict``.

    torch's fused step takes a group's first step as all or nothing: a parameter whose first gradient comes after
    the others' (a momentum buffer missing beside existing ones, also after resuming from a state without it)
    would reach it as None. Such a group steps through torch's foreach implementation of the same rule.
    """

    def step(self, closure=None):
        mixed = [group for group in self.param_groups if group["momentum"] and self._first_step_is_partial(group)]
        for group in mixed:
            group["fused"], group["foreach"] = False, True
        try:
            return super().step(closure)
        finally:
            for group in mixed:
                group["fused"], group["foreach"] = True, None

    def _first_step_is_partial(self, group):
        started = [self.state.get(p, {}).get("momentum_buffer") is not None for p in group["params"]
                   if p.grad is not None]
        return any(started) and not all(started)


def fused_sgd(sgd):
    """The same SGD (groups, settings) with PyTorch's fused step (:class:`FusedSGD`), which updates each
    parameter in one pass.

    detectron2 builds a foreach SGD, whose weight-decay step allocates a new gradient tensor for every
    parameter (180 MB for R50-FPN, mapped afresh every step under glibc's default allocator); the update rule
    is the same (tested to float rounding; time per step: docs/SPEED.md).
    """
    groups = [{key: value for key, value in group.items() if key not in ("foreach", "fused")}
              for group in sgd.param_groups]
    return FusedSGD(groups, **{**sgd.defaults, "foreach": None, "fused": True})
