"""The paper's protocol in miniature: pretrain a small GN or BN ResNet on a classification task, then fine-tune
Mask R-CNN from it (GN -> GN, BN -> BN*), as the paper does with ImageNet and COCO.

The classification task comes from the project's own synthetic shapes (:mod:`gn_det.data.shapes`), generated
with another seed than the detection dataset so the two share no image: every instance's box, widened by some
context and made square, is cropped and resized to 64 px, and its label is its class. The classifiers are
torchvision ResNets with torchvision's input normalization, so :mod:`gn_det.checkpoint.convert` turns their state
dicts into detectron2 checkpoints exactly as it does torchvision's and timm's ImageNet weights.
"""
import dataclasses
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.nn import functional as F

from gn_det.checkpoint.convert import (
    IMAGENET_RGB_PIXEL_MEAN,
    IMAGENET_RGB_PIXEL_STD,
    convert_weights,
)
from gn_det.data import SHAPES_CLASSES, ensure_shapes, shapes_root
from gn_det.errors import InputError
from gn_det.fileio import atomic_write, read_json, write_json_atomically

logger = logging.getLogger(__name__)

PRETRAIN_SEED = 1  # the detection dataset (shapes_train/shapes_val) is generated with seed 0
CROP_SIZE = 64
CROP_PADDING = 8  # crops are stored this much larger and randomly cropped back to CROP_SIZE while training
CONTEXT = 0.15  # each side of an instance's box is widened by this fraction of the box's longer side
# GN classifiers use the group setting of gn-det's shapes configs (MODEL.GN: G=32, eps 1e-5), so the GN
# backbone built from the converted weights normalizes exactly as the classifier did.
GN_NUM_GROUPS = 32
GN_EPS = 1e-5
# Each pretrained norm, the Mask R-CNN it initializes (configs/shapes/), and the files the protocol writes.
FINETUNE_CONFIGS = {"GN": "mask_rcnn_R_18_FPN_gn_pretrained.yaml", "BN": "mask_rcnn_R_18_FPN_bnstar_pretrained.yaml"}
SCRATCH_CONFIGS = {"GN": "mask_rcnn_R_18_FPN_gn.yaml", "BN": "mask_rcnn_R_18_FPN_bnstar.yaml"}
WEIGHTS_NAMES = {"GN": "shapes_resnet18_gn", "BN": "shapes_resnet18_bn"}  # + .pth (state dict), .pkl (converted)


def pretrain_data_root(num_train=1000, num_val=200):
    """Where the pretraining shapes of ``num_train`` + ``num_val`` images are generated: next to the detection
    dataset, named after the seed and the counts (a folder is never regenerated, so other counts need their own)."""
    return f"{shapes_root()}_pretrain_seed{PRETRAIN_SEED}_{num_train}x{num_val}"


def ensure_pretrain_data(root=None, num_train=1000, num_val=200):
    """Generate the pretraining shapes (256 px, seed ``PRETRAIN_SEED``) into ``root`` (default
    :func:`pretrain_data_root` of the counts) unless already there; returns the absolute folder.

    An InputError, before anything is written, when a count is below 1, or ``root`` exists but is not a complete
    shapes dataset of ``num_train`` training and ``num_val`` validation images.
    """
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if value < 1:
            raise InputError(f"{name}={value} must be >= 1 (images to generate)")
    root = os.path.abspath(root or pretrain_data_root(num_train, num_val))
    if not os.path.exists(root):
        # Checked after: another process may have generated the folder, with its own counts, while this one waited.
        ensure_shapes(root, num_train=num_train, num_val=num_val, seed=PRETRAIN_SEED)
    check_pretrain_data(root, num_train, num_val)
    return root


def check_pretrain_data(root, num_train, num_val):
    """An InputError naming ``root`` unless it is a complete shapes dataset of ``num_train`` training and
    ``num_val`` validation images (ensure_shapes never regenerates an existing folder)."""
    split_files = {split: os.path.join(root, f"{split}.json") for split in ("train", "val")}
    if not os.path.isdir(root) or not all(os.path.isfile(f) for f in split_files.values()):
        raise InputError(f"pretraining data {root} exists but is not a complete shapes dataset (no train.json and "
                         "val.json); remove it to regenerate, or name another folder")
    for (split, path), wanted in zip(split_files.items(), (num_train, num_val)):
        coco = read_json(path, "pretraining data")
        images = coco.get("images") if isinstance(coco, dict) else None
        if not isinstance(images, list):
            raise InputError(f"pretraining data {path} is not a COCO file (no \"images\" list)")
        if len(images) != wanted:
            raise InputError(f"pretraining data {root} holds {len(images)} {split} images, not the {wanted} asked "
                             "for (num_train/num_val); remove it to regenerate, or name another folder")


def instance_crops(json_file, image_dir, size=CROP_SIZE + CROP_PADDING, context=CONTEXT):
    """(uint8 N x 3 x size x size RGB crops, int64 N labels) of every instance of a COCO file.

    A crop is the instance's box widened by ``context`` on each side and made square around the box's centre;
    outside the image it is black. Labels index the categories in id order (0 = circle, 1 = rectangle, ...).
    """
    with open(json_file) as f:
        coco = json.load(f)
    label_of = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    by_image = {}
    for annotation in coco["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    crops, labels = [], []
    for image in coco["images"]:
        if image["id"] not in by_image:
            continue
        with Image.open(os.path.join(image_dir, image["file_name"])) as pil:
            pil = pil.convert("RGB")
            for annotation in by_image[image["id"]]:
                x, y, w, h = annotation["bbox"]
                side = max(w, h) * (1 + 2 * context)
                cx, cy = x + w / 2, y + h / 2
                box = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
                crops.append(np.asarray(pil.crop(box).resize((size, size), Image.BILINEAR)))
                labels.append(label_of[annotation["category_id"]])
    if not crops:
        raise InputError(f"{json_file}: no instances to crop")
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


def normalize(images):
    """uint8 RGB -> float input of torchvision's ImageNet models: (x - mean) / std in 0-255 units, the same
    as detectron2's MODEL.PIXEL_MEAN/PIXEL_STD with INPUT.FORMAT RGB in the fine-tuning configs."""
    mean = torch.tensor(IMAGENET_RGB_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_RGB_PIXEL_STD).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def augment(images, generator, size=CROP_SIZE):
    """A random ``size`` crop of each image and random horizontal and vertical flips (the shapes' classes do
    not change under either)."""
    n, _, height, width = images.shape
    tops = torch.randint(height - size + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(width - size + 1, (n,), generator=generator).tolist()
    out = torch.stack([img[:, t:t + size, s:s + size] for img, t, s in zip(images, tops, lefts)])
    for dim in (-1, -2):
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(dim), out)
    return out


def center_crop(images, size=CROP_SIZE):
    top, left = (images.shape[-2] - size) // 2, (images.shape[-1] - size) // 2
    return images[..., top:top + size, left:left + size]


def build_classifier(norm, depth=18, num_classes=len(SHAPES_CLASSES)):
    """torchvision's ResNet with GroupNorm (``GN_NUM_GROUPS`` groups) or BatchNorm ("GN" / "BN").

    The last norm of every residual block starts with γ = 0, so each block starts as the identity: the
    initialization the GN paper uses for both norms (after Goyal et al., 2017), which keeps from-scratch
    training stable at a high learning rate.
    """
    norm_layers = {"GN": lambda channels: nn.GroupNorm(GN_NUM_GROUPS, channels, eps=GN_EPS), "BN": nn.BatchNorm2d}
    if norm not in norm_layers:
        raise InputError(f"norm={norm!r}; choose 'GN' or 'BN'")
    return getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes, norm_layer=norm_layers[norm],
                                                          zero_init_residual=True)


@dataclasses.dataclass
class PretrainResult:
    model: nn.Module
    val_accuracy: float  # fraction of validation crops classified correctly
    train_loss: float  # mean loss of the last logging period
    seconds: float
    num_train_crops: int


def warmup_cosine(iters, warmup_fraction=0.1):
    """LR factor per iteration: linear warm-up, then cosine decay to 0."""
    warmup = max(1, int(iters * warmup_fraction))

    def factor(it):
        if it < warmup:
            return (it + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(1, iters - warmup)))

    return factor


def pretrain_classifier(norm, train_data, val_data, iters=400, batch_size=64, lr=0.05, weight_decay=1e-4, seed=0,
                        log_period=50):
    """Train :func:`build_classifier` (``norm``) on ``train_data`` = (crops, labels) from :func:`instance_crops`
    with SGD (momentum 0.9), warm-up + cosine LR, random crops and flips; report accuracy on ``val_data``."""
    check_pretrain_settings(iters, batch_size, lr)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_classifier(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(iters))
    images, labels = train_data
    start, losses = time.perf_counter(), []
    model.train()
    for it in range(iters):
        batch = torch.randint(len(labels), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(normalize(augment(images[batch], generator))), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if (it + 1) % log_period == 0 or it + 1 == iters:
            logger.info("%s classifier: iteration %d/%d, loss %.4f, lr %.4g, %.1f s", norm, it + 1, iters,
                        sum(losses[-log_period:]) / len(losses[-log_period:]), scheduler.get_last_lr()[0],
                        time.perf_counter() - start)
    accuracy = classifier_accuracy(model, *val_data)
    logger.info("%s classifier: validation accuracy %.1f%% on %d crops", norm, 100 * accuracy, len(val_data[1]))
    return PretrainResult(model, accuracy, sum(losses[-log_period:]) / len(losses[-log_period:]),
                          time.perf_counter() - start, len(labels))


@torch.no_grad()
def classifier_accuracy(model, images, labels, batch_size=256):
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(normalize(center_crop(images[i:i + batch_size])))
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / len(labels)


def check_pretrain_settings(iters, batch_size, lr=0.05):
    """An InputError naming the setting when there would be nothing to train, or the learning rate is not
    positive."""
    for name, value in (("iters", iters), ("batch_size", batch_size)):
        if value < 1:
            raise InputError(f"{name}={value} must be >= 1")
    if not (lr > 0 and math.isfinite(lr)):  # NaN fails both comparisons
        raise InputError(f"lr={lr} must be a finite number > 0")


def pretrain_and_save(norm, data_root, path, **train_kwargs):
    """Crop ``data_root``'s train/val splits, pretrain a ``norm`` classifier and save its state dict to ``path``
    (the format tools/convert_weights.py reads), and what it was trained on and how well it did next to it
    (:func:`summary_path`). Returns the :class:`PretrainResult`."""
    train = instance_crops(os.path.join(data_root, "train.json"), os.path.join(data_root, "train"))
    val = instance_crops(os.path.join(data_root, "val.json"), os.path.join(data_root, "val"))
    result = pretrain_classifier(norm, train, val, **train_kwargs)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    summary = {"norm": norm, "data_root": os.path.abspath(data_root), "train_crops": result.num_train_crops,
               "val_crops": len(val[1]), "val_accuracy": result.val_accuracy, "final_train_loss": result.train_loss,
               "seconds": result.seconds, **train_kwargs}
    write_json_atomically(summary_path(path), summary)
    with atomic_write(path, "wb") as f:  # last: the protocol takes an existing state dict as finished
        torch.save(result.model.state_dict(), f)
    return result


def summary_path(state_dict_path):
    """The JSON written next to a pretrained state dict: its data, settings and validation accuracy."""
    return os.path.splitext(state_dict_path)[0] + ".json"


def check_pretrained_as_asked(state_dict_path, data_root, iters, batch_size):
    """An InputError naming the file and the setting when a pretrained state dict that the protocol would keep was
    trained on other data or with other settings than asked (its :func:`summary_path` says). A state dict without
    gn-det's summary (one the user put there) is kept as it is."""
    path = summary_path(state_dict_path)
    if not (os.path.isfile(state_dict_path) and os.path.isfile(path)):
        return
    summary = read_json(path, "pretraining summary")
    asked = {"data_root": os.path.abspath(data_root), "iters": iters, "batch_size": batch_size}
    for key, value in asked.items():
        if summary.get(key) != value:
            raise InputError(f"{state_dict_path} was pretrained with {key}={summary.get(key)!r} ({path}), not the "
                             f"{value!r} asked; delete it or give another --weights-dir")


def convert_and_check(state_dict_path, checkpoint_path, config_file, opts=()):
    """Convert a pretrained classifier (:func:`gn_det.checkpoint.convert_weights`: GN -> GN, BN -> FrozenBN) and
    check that the Mask R-CNN of ``config_file`` (+ ``opts``) loads every ResNet parameter from it, with the
    input format, pixel statistics and stride placement it was trained with. Returns (converted, match)."""
    from detectron2.modeling import build_model

    from gn_det.config import get_gn_cfg

    cfg = get_gn_cfg(config_file, ["MODEL.DEVICE", "cpu", *opts, "MODEL.WEIGHTS", checkpoint_path])
    converted = convert_weights(state_dict_path, checkpoint_path, source="torchvision", model=build_model(cfg))
    return converted, converted.model_match
