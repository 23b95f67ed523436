"""Pretrained weights for gn-det's backbones: timm / torchvision ResNets converted to detectron2 checkpoints."""
from .convert import (
    IMAGENET_RGB_PIXEL_MEAN,
    IMAGENET_RGB_PIXEL_STD,
    ConvertedResNet,
    WeightsMatch,
    WeightsMismatchError,
    check_weights_for_model,
    convert_resnet_state_dict,
    convert_weights,
    load_converted,
    load_source_state_dict,
    match_weights,
)
