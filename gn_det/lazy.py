"""gn-det for detectron2's LazyConfig (Python configs): norm at every site, the paper's box head and decay.

::

    from detectron2 import model_zoo
    import gn_det
    from gn_det.lazy import set_norm, use_4conv1fc_box_head

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    use_4conv1fc_box_head(model)
    set_norm(model, gn_det.GN(num_groups=16))

Each function edits a config node in place. The node is still a plain config: ``LazyConfig.save`` writes it as
YAML, and ``instantiate`` builds it with detectron2's own classes.
"""
import inspect

from omegaconf import DictConfig, ListConfig, OmegaConf

from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils.registry import locate

from gn_det.errors import InputError
from gn_det.layers.norm import NORM_NAMES, GroupNormSpec

# Argument names under which detectron2's builders take a norm: ResNet stem, stages and res5 (make_stage), FPN,
# RetinaNetHead ("norm"); FastRCNNConvFCHead, MaskRCNNConvUpsampleHead, gn-det's GNRPNHead ("conv_norm").
NORM_ARGUMENTS = ("norm", "conv_norm")


def _target(node):
    """The callable a LazyCall node builds, or None for a node without ``_target_``."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return None
    target = node._target_
    if not isinstance(target, str):
        return target
    try:
        return locate(target)
    except ImportError:  # hydra's locate raises it, over several lines, for a name that does not import
        raise InputError(f"_target_ {target!r} cannot be imported (no such module or attribute)") from None


def _norm_arguments(node):
    """The norm arguments of a LazyCall node: those it sets, and those its target's signature declares."""
    target = _target(node)
    if target is None:
        return []
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins and C callables have no signature to read
        parameters = {}
    return [name for name in NORM_ARGUMENTS if name in node or name in parameters]


def norm_slots(node, path="model"):
    """(parent node, argument name, dotted path) for every norm argument in the LazyCall tree ``node``."""
    arguments = _norm_arguments(node)
    for name in arguments:
        yield node, name, f"{path}.{name}"
    if isinstance(node, DictConfig):
        children = [(key, f"{path}.{key}") for key in node if key != "_target_" and key not in arguments]
    elif isinstance(node, ListConfig):
        children = [(i, f"{path}.{i}") for i in range(len(node))]
    else:
        return
    for key, child_path in children:
        if not OmegaConf.is_interpolation(node, key):  # "${..num_classes}" and the like point elsewhere
            yield from norm_slots(node[key], child_path)


def norm_sites(node, path="model"):
    """The dotted paths of every norm argument in the LazyCall tree ``node`` (named from ``path``)."""
    return [site for _parent, _name, site in norm_slots(node, path)]


def _is_group_norm_spec(value):
    return _target(value) is GroupNormSpec


def _check_norm(norm):
    if isinstance(norm, str):
        if norm not in NORM_NAMES:
            raise InputError(f"norm={norm!r} is not a norm; use gn_det.GN(...) or one of "
                             f"{', '.join(map(repr, NORM_NAMES))}")
        return
    if _target(norm) is None:
        # a lambda, partial or module class would build, but LazyConfig.save could not write it as YAML
        raise InputError(f"norm={norm!r} is neither a norm name nor a LazyCall node; use gn_det.GN(...) or "
                         "LazyCall(YourNorm)(...)")


def _assign(parent, key, norm, site):
    parent[key] = norm
    if _is_group_norm_spec(parent[key]):
        parent[key].site = site  # the assigned node is the parent's own copy


def set_norm(model, norm, path="model"):
    """Set ``norm`` at every norm site of the LazyCall model node ``model``, in place; returns the sites' paths.

    ``norm`` is a gn-det spec (``gn_det.GN(...)``), a ``LazyCall`` node building a callable
    ``channels -> nn.Module``, or a norm name (``gn_det.layers.NORM_NAMES``; "GN" is detectron2's fixed 32 groups here).
    A norm site is every ``norm`` / ``conv_norm`` argument that a node sets or its target declares: in an
    R-CNN, the ResNet stem and stages, FPN, the box and mask heads and the C4 res5 stage; gn-det's
    ``GNRPNHead`` and RetinaNet's head where the model has them. detectron2's ``StandardRPNHead`` has no
    norm argument, so the RPN keeps none, as in the paper.
    """
    _check_norm(norm)
    slots = list(norm_slots(model, path))
    if not slots:
        raise InputError(f"{path} has no norm site (no node takes a norm or conv_norm argument)")
    for parent, name, site in slots:
        _assign(parent, name, norm, site)
    return [site for _parent, _name, site in slots]


def label_group_norm_sites(node, path="model"):
    """Fill in the ``site`` of every GN spec in ``node`` that has none, so an error names its config field."""
    for parent, name, site in norm_slots(node, path):
        value = parent.get(name)
        if _is_group_norm_spec(value) and not value.get("site"):
            value.site = site


def use_4conv1fc_box_head(model, conv_dim=256, fc_dim=1024, conv_norm=None):
    """Make the box head of an FPN model node the paper's 4conv1fc: four 3x3 convs of ``conv_dim`` channels and
    one fc of ``fc_dim``. ``conv_norm`` (as for :func:`set_norm`) sets the convs' norm; None keeps it."""
    box_head = model.get("roi_heads", {}).get("box_head")
    if box_head is None:
        raise InputError("model.roi_heads has no box_head (a C4 model's box head is its res5 stage)")
    box_head.conv_dims = [conv_dim] * 4
    box_head.fc_dims = [fc_dim]
    if conv_norm is not None:
        _check_norm(conv_norm)
        _assign(box_head, "conv_norm", conv_norm, "model.roi_heads.box_head.conv_norm")
    return model


def no_weight_decay_on_norm(optimizer):
    """The paper's fine-tuning recipe on an optimizer node built from detectron2's
    ``get_default_optimizer_params``: weight decay 0 on norm γ/β (gn-det's GroupNorm subclasses
    ``nn.GroupNorm``, so it counts as a norm there)."""
    params = optimizer.get("params")
    if _target(params) is not get_default_optimizer_params:
        raise InputError("optimizer.params is not built by detectron2's get_default_optimizer_params, "
                         "which is where weight_decay_norm applies")
    params.weight_decay_norm = 0.0
    return optimizer
