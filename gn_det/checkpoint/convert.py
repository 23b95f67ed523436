"""Convert timm / torchvision ResNet state dicts into detectron2 checkpoints for gn-det's ResNet backbones.

timm and torchvision name ResNet parameters identically (``conv1``/``bn1``, ``layer1..4.N.conv1..3`` /
``bn1..3``, ``downsample.0`` conv + ``downsample.1`` norm, ``fc``); timm's GN models (``resnet50_gn``) keep the
``bn*`` names for their GroupNorms. The converted file is detectron2's own ``.pkl`` format with
``matching_heuristics``, keyed by the names of detectron2's ResNet (``stem.conv1.weight``,
``res2.0.conv1.norm.weight``, ``res2.0.shortcut.weight``...), so ``DetectionCheckpointer`` matches them by
suffix to ``backbone.bottom_up.*`` of FPN models and to ``backbone.*`` + ``roi_heads.res5.*`` of C4 models.

GN sources become GN backbones; BN sources become BN* (FrozenBN) backbones, keeping the running statistics.
A ``"gn_det"`` entry records what the weights expect of the model's input and ResNet settings, and
:func:`check_weights_for_model` checks a model and config against it.
"""
import dataclasses
import logging
import pickle
import re
from collections import OrderedDict
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BottleneckBlock

from gn_det.checkpoint.reader import read_checkpoint, read_weights
from gn_det.config import get_gn_cfg
from gn_det.errors import InputError
from gn_det.fileio import atomic_write
from gn_det.layers.ws import WSConv2d
from gn_det.modeling.backbone import build_gn_resnet_backbone

logger = logging.getLogger(__name__)

AUTHOR = "gn-det convert_weights"
SOURCES = ("timm", "torchvision")
# ImageNet statistics of timm/torchvision models, in detectron2's units: RGB pixel values in 0-255
# (torchvision's 0-1 mean/std x 255).
IMAGENET_RGB_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_RGB_PIXEL_STD = [58.395, 57.12, 57.375]
# depth -> (block type, blocks in layer1..layer4), as in detectron2's build_resnet_backbone.
RESNET_DEPTHS = {
    18: ("BasicBlock", (2, 2, 2, 2)),
    34: ("BasicBlock", (3, 4, 6, 3)),
    50: ("Bottleneck", (3, 4, 6, 3)),
    101: ("Bottleneck", (3, 4, 23, 3)),
    152: ("Bottleneck", (3, 8, 36, 3)),
}
NORM_PARAMS = r"(weight|bias|running_mean|running_var)"
# timm/torchvision ResNet name -> detectron2 ResNet name. Layer i is detectron2's stage res(i+1); bnK is the
# norm of convK, detectron2's convK.norm; downsample.0/.1 is detectron2's shortcut conv / its norm.
SOURCE_TO_D2 = [
    (re.compile(r"^conv1\.weight$"), r"stem.conv1.weight"),
    (re.compile(rf"^bn1\.{NORM_PARAMS}$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.weight$"), r"res{stage}.\2.conv\3.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.bn([1-3])\.{NORM_PARAMS}$"), r"res{stage}.\2.conv\3.norm.\4"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.weight$"), r"res{stage}.\2.shortcut.weight"),
    (re.compile(rf"^layer([1-4])\.(\d+)\.downsample\.1\.{NORM_PARAMS}$"), r"res{stage}.\2.shortcut.norm.\3"),
]
# The ImageNet classifier: no detectron2 counterpart, reported as unused.
CLASSIFIER = re.compile(r"^fc\.(weight|bias)$")
# Parameters of a detectron2 model that belong to its ResNet: the stem and stages res2-res5 (under
# backbone.bottom_up. in FPN models; under backbone. and roi_heads.res5. in C4 models). BN's
# num_batches_tracked is a counter, not a weight, and is never in pretrained files.
RESNET_MODEL_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.")


class WeightsMismatchError(InputError):
    """A state dict or checkpoint that does not fit the expected ResNet; the message is one line and starts
    with the first mismatched key."""


@dataclasses.dataclass
class ConvertedResNet:
    model: "OrderedDict[str, np.ndarray]"  # detectron2 ResNet name -> float32 array
    metadata: Dict  # the checkpoint's "gn_det" entry
    unused_keys: List[str]  # source keys without a detectron2 counterpart (the classifier)
    dropped_keys: List[str]  # BN counters (num_batches_tracked)
    reference_match: "WeightsMatch"  # against gn-det's ResNet of the same depth and norm: complete
    model_match: "WeightsMatch" = None  # against the model convert_weights was given, if any

    def checkpoint(self):
        """The object saved to the ``.pkl``: detectron2's format, matched by suffix on load."""
        return {"model": self.model, "__author__": AUTHOR, "matching_heuristics": True, "gn_det": self.metadata}


@dataclasses.dataclass
class WeightsMatch:
    """How a checkpoint's tensors map onto a model's ResNet parameters (detectron2's suffix matching)."""

    matched: Dict[str, str]  # model key -> checkpoint key
    missing: List[str]  # ResNet keys of the model that no checkpoint tensor fills
    wrong_shape: Dict[str, str]  # model key -> checkpoint key it matches by name but not by shape
    unused: List[str]  # checkpoint keys that fill no model key


def load_source_state_dict(path):
    """Name -> tensor of a saved ResNet: ``.safetensors``, or a ``torch.save`` file (``.pth``/``.pt``).

    A dict that wraps the state dict under ``"state_dict"`` or ``"model"`` (training checkpoints) is
    unwrapped, and a DistributedDataParallel ``module.`` prefix is removed.
    """
    state_dict = read_weights(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if not isinstance(state_dict, dict):
        raise WeightsMismatchError(f"{path}: holds a {type(state_dict).__name__}, not a state dict")
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsMismatchError(f"{name}: a {type(value).__name__} in {path}, not a tensor")
    if state_dict and all(name.startswith("module.") for name in state_dict):
        state_dict = {name[len("module."):]: value for name, value in state_dict.items()}
    return OrderedDict(state_dict)


def d2_name(source_name):
    """The detectron2 ResNet name of a timm/torchvision ResNet parameter, or None."""
    for pattern, template in SOURCE_TO_D2:
        match = pattern.match(source_name)
        if match:
            stage = int(match.group(1)) + 1 if template.startswith("res") else None
            return match.expand(template.format(stage=stage))
    return None


def source_name(d2_key):
    """Inverse of :func:`d2_name`, for naming a parameter the source lacks."""
    match = re.match(r"^res([2-5])\.(\d+)\.(conv[1-3]|shortcut)(\.norm)?\.(\w+)$", d2_key)
    if not match:
        return {"stem.conv1.weight": "conv1.weight"}.get(d2_key, d2_key.replace("stem.conv1.norm.", "bn1."))
    stage, block, conv, norm, param = match.groups()
    if conv == "shortcut":
        module = "downsample.1" if norm else "downsample.0"
    else:
        module = conv.replace("conv", "bn") if norm else conv
    return f"layer{int(stage) - 1}.{block}.{module}.{param}"


def resnet_structure(names):
    """(block type, blocks per layer) of a ResNet with these detectron2 names."""
    blocks = [0, 0, 0, 0]
    for name in names:
        match = re.match(r"^res([2-5])\.(\d+)\.", name)
        if match:
            stage, block = int(match.group(1)) - 2, int(match.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
    block_type = "Bottleneck" if any(".conv3." in name for name in names) else "BasicBlock"
    return block_type, tuple(blocks)


def infer_depth(block_type, blocks):
    """The ResNet depth with this block type and blocks per layer; else the nearest of that block type (the
    key comparison against it then names the first extra or missing parameter)."""
    for depth, structure in RESNET_DEPTHS.items():
        if structure == (block_type, blocks):
            return depth
    candidates = [d for d, (kind, _) in RESNET_DEPTHS.items() if kind == block_type]
    return min(candidates, key=lambda d: sum(abs(a - b) for a, b in zip(RESNET_DEPTHS[d][1], blocks)))


def build_reference_resnet(depth, norm):
    """gn-det's ResNet (all stages res2-res5, stride in the 3x3 conv as timm/torchvision) whose parameter names
    and shapes a converted file must match exactly."""
    cfg = get_gn_cfg(None, ["MODEL.DEVICE", "cpu"])
    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH = depth
    resnets.NORM = norm
    resnets.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    resnets.RES2_OUT_CHANNELS = 64 if depth < 50 else 256  # detectron2 requires 64 for R18/R34
    resnets.STRIDE_IN_1X1 = False
    return build_gn_resnet_backbone(cfg, ShapeSpec(channels=3))


def convert_resnet_state_dict(state_dict, source="auto", norm="auto", depth=None, num_groups=32):
    """Rename a timm/torchvision ResNet state dict to detectron2's ResNet and check it against gn-det's ResNet.

    Args:
        state_dict: name -> tensor, as :func:`load_source_state_dict` returns.
        source: "timm", "torchvision" or "auto". Both libraries name ResNets identically, so this only labels
            the result; "auto" guesses timm for GN weights (torchvision publishes no GN ResNet), else torchvision.
        norm: "GN", "BN" or "auto" (BN when the norms carry running statistics, else GN). BN becomes FrozenBN.
        depth: 18, 34, 50, 101 or 152; None infers it from the block type and the blocks per layer.
        num_groups: the groups of the source's GroupNorms, which a state dict does not hold (32: timm's
            ``resnet*_gn``, the paper's G); recorded with ε = 1e-5 (torch's default) for GN weights.

    Raises:
        WeightsMismatchError: naming the first source key that is not a ResNet parameter, does not fit the
            requested norm, depth or shape, or that the ResNet needs but the source lacks.
    """
    if source not in SOURCES + ("auto",):
        raise InputError(f"source={source!r}; choose one of {', '.join(map(repr, SOURCES + ('auto',)))}")
    if norm not in ("GN", "BN", "auto"):
        raise InputError(f"norm={norm!r}; choose one of 'GN', 'BN', 'auto'")
    if depth is not None and depth not in RESNET_DEPTHS:
        raise InputError(f"depth={depth}; choose one of {', '.join(map(str, RESNET_DEPTHS))}")
    if num_groups < 1:
        raise InputError(f"num_groups={num_groups} must be >= 1")

    renamed, source_names, unused, dropped = OrderedDict(), {}, [], []
    for name, tensor in state_dict.items():
        if name.endswith("num_batches_tracked"):
            dropped.append(name)
            continue
        if CLASSIFIER.match(name):
            unused.append(name)
            continue
        new_name = d2_name(name)
        if new_name is None:
            raise WeightsMismatchError(
                f"{name}: not a parameter of a timm/torchvision ResNet (conv1, bn1, layer1-4.N.conv1-3/bn1-3/"
                f"downsample.0-1, fc)"
            )
        renamed[new_name] = tensor
        source_names[new_name] = name
    if not renamed:
        raise WeightsMismatchError("(no keys): the state dict holds no ResNet parameters")

    running_stats = [name for name in renamed if name.endswith(".running_mean") or name.endswith(".running_var")]
    if norm == "auto":
        norm = "BN" if running_stats else "GN"
    if norm == "GN" and running_stats:
        raise WeightsMismatchError(
            f"{source_names[running_stats[0]]}: BatchNorm running statistics, but GN was asked for; BN weights "
            f"convert to a BN* (FrozenBN) backbone (--norm BN or auto)"
        )
    if norm == "BN" and not running_stats:
        first_norm = next(name for name in renamed if ".norm." in name)
        raise WeightsMismatchError(
            f"{source_names[first_norm]}: a norm without running_mean/running_var (GroupNorm), but BN was asked "
            f"for; GN weights convert to a GN backbone (--norm GN or auto)"
        )
    target_norm = "FrozenBN" if norm == "BN" else "GN"

    block_type, blocks = resnet_structure(renamed)
    found = f"the source has {block_type} blocks {blocks}"
    if depth is None:
        depth = infer_depth(block_type, blocks)
    reference = build_reference_resnet(depth, target_norm).state_dict()
    match = match_weights(reference, renamed)
    expected = f"ResNet-{depth} ({target_norm})"
    if match.unused:
        key = match.unused[0]
        if key in match.wrong_shape.values():
            model_key = next(k for k, v in match.wrong_shape.items() if v == key)
            raise WeightsMismatchError(
                f"{source_names[key]}: shape {tuple(renamed[key].shape)}, but {expected} has "
                f"{tuple(reference[model_key].shape)} at {model_key}; {found}"
            )
        raise WeightsMismatchError(f"{source_names[key]}: not a parameter of {expected} ({key}); {found}")
    if match.missing:
        key = match.missing[0]
        raise WeightsMismatchError(f"{source_name(key)}: missing, {expected} needs it ({key}); {found}")

    if source == "auto":
        source = "timm" if target_norm == "GN" else "torchvision"
    # float32 whatever the source stored (fp16/bf16 files): detectron2 trains the backbone in float32
    model = OrderedDict((name, renamed[key].detach().cpu().float().numpy()) for name, key in match.matched.items())
    metadata = {
        "source": source,
        "depth": depth,
        "norm": target_norm,
        # what the source network was trained with, in detectron2's config terms (MODEL.PIXEL_MEAN etc.)
        "input_format": "RGB",
        "pixel_mean": list(IMAGENET_RGB_PIXEL_MEAN),
        "pixel_std": list(IMAGENET_RGB_PIXEL_STD),
        "stride_in_1x1": False,  # timm and torchvision put the stride in the 3x3 conv
    }
    if target_norm == "GN":  # what the GroupNorms computed: the same parameters under other groups do not
        metadata["group_norm"] = {"num_groups": num_groups, "eps": 1e-5, "weight_standardization": False}
    return ConvertedResNet(model, metadata, unused, dropped, match)


def match_weights(model_state_dict, weights):
    """Match checkpoint tensors to a model's ResNet parameters exactly as ``DetectionCheckpointer`` does for a
    file with ``matching_heuristics`` (detectron2's suffix matching), and say what is left over on both sides.

    ``weights``: name -> tensor or numpy array.
    """
    tensors = OrderedDict(
        (name, torch.from_numpy(value) if isinstance(value, np.ndarray) else value) for name, value in weights.items()
    )
    # detectron2 logs its match table and a warning per shape mismatch; the caller reports both from the result
    d2_logger = logging.getLogger(align_and_update_state_dicts.__module__)
    level = d2_logger.level
    d2_logger.setLevel(logging.ERROR)
    try:
        aligned = align_and_update_state_dicts(model_state_dict, dict(tensors), c2_conversion=False)
    finally:
        d2_logger.setLevel(level)
    name_of = {id(tensor): name for name, tensor in tensors.items()}
    matched, wrong_shape = {}, {}
    for key, target in model_state_dict.items():
        if key in aligned and aligned[key].shape == target.shape and id(aligned[key]) in name_of:
            matched[key] = name_of[id(aligned[key])]
    resnet_keys = [
        key for key in model_state_dict if RESNET_MODEL_KEY.search(key) and not key.endswith("num_batches_tracked")
    ]
    missing = [key for key in resnet_keys if key not in matched]
    for key in missing:
        # detectron2 skips a name match with the wrong shape (with a warning); find it to say so
        by_name = [name for name in tensors if key == name or key.endswith("." + name)]
        if by_name:
            wrong_shape[key] = max(by_name, key=len)
    used = set(matched.values())
    unused = [name for name in tensors if name not in used]
    return WeightsMatch(matched, missing, wrong_shape, unused)


def save_converted(converted, path):
    with atomic_write(path, "wb") as f:
        pickle.dump(converted.checkpoint(), f)


def load_converted(path):
    """The checkpoint dict of a ``.pkl`` written by :func:`save_converted`."""
    return read_checkpoint(path)


def convert_weights(input_path, output_path, source="auto", norm="auto", depth=None, model=None, num_groups=32):
    """Load a timm/torchvision ResNet file, convert it (checked against gn-det's ResNet), save the ``.pkl``.

    ``model``: also check that this model loads every ResNet weight of the result and reads its input as the
    weights expect (:func:`check_weights_for_model`), before anything is written; the match is then
    ``converted.model_match``."""
    converted = convert_resnet_state_dict(load_source_state_dict(input_path), source=source, norm=norm, depth=depth,
                                          num_groups=num_groups)
    if model is not None:
        converted.model_match = check_weights_for_model(model, converted.checkpoint(), name=output_path)
    save_converted(converted, output_path)
    meta = converted.metadata
    logger.info(
        f"Converted {input_path} ({meta['source']}, ResNet-{meta['depth']}, {meta['norm']}) to {output_path}: "
        f"{len(converted.model)} tensors"
    )
    return converted


def check_weights_for_model(model, checkpoint, name="weights"):
    """Check that ``checkpoint`` fills every ResNet parameter of ``model`` and nothing else, and, when it was
    written by gn-det's converter, that the model reads its input as the weights expect (input format, pixel
    mean/std, stride placement), read off the built model: the same check for a YAML and a Python config.

    Args:
        model: a detectron2 model (or a backbone: then only the parameters are checked).
        checkpoint: a path to a ``.pkl`` written by :func:`convert_weights`, or a dict in detectron2's naming
            (``{"model": {name: tensor}}`` or ``{name: tensor}``; Caffe2 blob names are not converted here).
        name: what to call the checkpoint in messages (its path when a path is given).

    Returns:
        WeightsMatch. Raises WeightsMismatchError naming the first mismatched key or setting.
    """
    if isinstance(checkpoint, str):
        checkpoint, name = load_converted(checkpoint), checkpoint
    weights = checkpoint.get("model", checkpoint)
    meta = checkpoint.get("gn_det")
    model_state_dict = model.state_dict()
    match = match_weights(model_state_dict, weights)
    holds = f"{name} holds ResNet-{meta['depth']} {meta['norm']} weights ({meta['source']})" if meta else name
    if match.missing or match.unused:
        context = f"{holds}; the model has {describe_resnet(model, model_state_dict)}"
    if match.missing:
        key = match.missing[0]
        if key in match.wrong_shape:
            ckpt_key = match.wrong_shape[key]
            raise WeightsMismatchError(
                f"{key}: shape {tuple(model_state_dict[key].shape)}, but {ckpt_key} is "
                f"{tuple(weights[ckpt_key].shape)}; {context}"
            )
        raise WeightsMismatchError(f"{key}: not filled by any tensor; {context}")
    if match.unused:
        raise WeightsMismatchError(f"{match.unused[0]}: matches no parameter of the model; {context}")
    if meta:
        for setting, value, wanted in input_settings(model, meta):
            if value != wanted and not (isinstance(wanted, list) and np.allclose(value, wanted)):
                raise WeightsMismatchError(f"{setting} is {value!r}, but {holds} that expect {wanted!r}")
        check_group_norms(model, meta.get("group_norm"), holds)
    return match


def check_group_norms(model, trained, holds):
    """Each GroupNorm of the model's ResNet computes as the converted weights' did (``trained``: their
    "group_norm" entry; files converted without one are not checked): the same groups and ε, and Weight
    Standardization on its conv only if the weights were trained with it."""
    if not trained:
        return
    wanted = (trained["num_groups"], trained["eps"], trained["weight_standardization"])
    for name, conv in model.named_modules():
        norm = getattr(conv, "norm", None)
        if RESNET_MODEL_KEY.search(name + ".") and isinstance(norm, nn.GroupNorm):
            found = (norm.num_groups, norm.eps, isinstance(conv, WSConv2d))
            if found != wanted:
                raise WeightsMismatchError(
                    f"{name}.norm: {found[0]} groups, eps {found[1]:g}, weight standardization {found[2]}; but {holds} "
                    f"that were trained with {wanted[0]} groups, eps {wanted[1]:g}, weight standardization {wanted[2]} "
                    "(MODEL.GN / the norm spec; convert_weights.py --num-groups)"
                )


def describe_resnet(model, state_dict):
    """``ResNet-<depth> with <stem norm class>`` of a model's ResNet (its stem and res2-res5 parameters, from the
    model's ``state_dict``)."""
    names = [re.sub(r"^.*?\b(?=(stem|res[2-5])\.)", "", key) for key in state_dict if RESNET_MODEL_KEY.search(key)]
    depth = next((d for d, structure in RESNET_DEPTHS.items() if structure == resnet_structure(names)), None)
    stem_norm = next((type(m).__name__ for n, m in model.named_modules() if n.endswith("stem.conv1.norm")), "no norm")
    return f"{'ResNet-' + str(depth) if depth else 'a ResNet of another depth'} with {stem_norm}"


def input_settings(model, meta):
    """``(setting, the model's value, the converted weights' value)`` for what the model reads its input with:
    each named by its YAML key and its Python-config attribute."""
    settings = []
    if hasattr(model, "input_format"):
        settings.append(("INPUT.FORMAT / model.input_format", model.input_format, meta["input_format"]))
    for key in ("pixel_mean", "pixel_std"):
        if hasattr(model, key):
            settings.append((f"MODEL.{key.upper()} / model.{key}", getattr(model, key).flatten().tolist(), meta[key]))
    # where the stride of a bottleneck block is (basic blocks have a single strided conv either way)
    strided = next((m for m in model.modules() if isinstance(m, BottleneckBlock)
                    and (m.conv1.stride != (1, 1) or m.conv2.stride != (1, 1))), None)
    if strided is not None:
        settings.append(("MODEL.RESNETS.STRIDE_IN_1X1 / stride_in_1x1", strided.conv1.stride != (1, 1),
                         meta["stride_in_1x1"]))
    return settings
