"""Meta-architectures that carry their compute precision and memory layout (``MODEL.PRECISION``,
``MODEL.CHANNELS_LAST``).

The switches live in the model, not in a trainer, so they apply wherever the model runs: training, evaluation,
``DefaultPredictor``, DDP (which calls the wrapped module's ``forward``) and TTA (which calls ``inference``).
With the defaults ("fp32", no channels_last) the models behave exactly as detectron2's. The switches mean the
same on every device; the CPU-specific pieces are a separate key, ``MODEL.CPU_FAST_PATH`` (``gn_det.cpu``).

fp16 training needs a gradient scaler: train with detectron2's ``AMPTrainer`` (``SOLVER.AMP.ENABLED: True``).
bf16 has float32's exponent range and trains without one.
"""
import contextlib
import logging

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes, Instances, RotatedBoxes

import gn_det.config
from gn_det.errors import InputError

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)


def check_precision(precision, device_type, key="MODEL.PRECISION"):
    """Raise a one-line InputError naming ``key`` if ``precision`` cannot run on ``device_type``."""
    if precision not in PRECISIONS:
        raise InputError(f"{key}={precision!r} is not a precision; choose one of {', '.join(map(repr, PRECISIONS))}")
    if precision == "fp16" and device_type != "cuda":
        # CPU float16 autocast exists but has no fast kernels, and fp16 training needs a CUDA grad scaler.
        raise InputError(f"{key}='fp16' needs a CUDA device, not {device_type!r}; on CPU use 'fp32', "
                         "or 'bf16' where the CPU has AVX512-BF16 or AMX")


def to_float32(outputs):
    """``outputs`` (losses, inference results: dicts, lists, Instances, Boxes) with every floating-point
    tensor in float32, so users of the model never see the autocast dtype."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {key: to_float32(value) for key, value in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(value) for value in outputs)
    if isinstance(outputs, Instances):
        return Instances(outputs.image_size, **to_float32(outputs.get_fields()))
    if isinstance(outputs, (Boxes, RotatedBoxes)):
        return type(outputs)(outputs.tensor.float())
    return outputs


class PrecisionLayoutMixin:
    """Mixin for a detectron2 meta-architecture: forward under autocast and channels_last image batches.

    ``MODEL.PRECISION`` "bf16"/"fp16" runs ``forward`` under ``torch.autocast`` on the model's device and casts
    every output to float32. ``MODEL.CHANNELS_LAST`` converts 4-D parameters to channels_last at build (names
    and values unchanged, so checkpoints load as usual) and feeds the backbone a channels_last batch, the
    layout oneDNN and cuDNN convolutions run fastest on. Nothing else: the modules are those the config built.
    """

    honours_precision_switches = True  # read by gn_det.config's check of the switches, through the registry

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        check_precision(cfg.MODEL.PRECISION, torch.device(cfg.MODEL.DEVICE).type)  # fail at build, not in forward
        ret["precision"] = cfg.MODEL.PRECISION
        ret["channels_last"] = cfg.MODEL.CHANNELS_LAST
        return ret

    @configurable
    def __init__(self, *, precision="fp32", channels_last=False, **kwargs):
        super().__init__(**kwargs)
        self.precision = precision
        self.channels_last = channels_last
        self.warned_of_emulated_bf16 = False
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def extra_repr(self):
        # print(model) says what the forward runs in, beside the modules
        return f"precision={self.precision}, channels_last={self.channels_last}"

    def precision_context(self):
        """The autocast context the model computes in (a no-op for fp32)."""
        # checked again here: the model may have been moved to another device since it was built
        check_precision(self.precision, self.device.type)
        if self.precision == "fp32":
            return contextlib.nullcontext()
        if (self.precision == "bf16" and not self.warned_of_emulated_bf16
                and not (torch.jit.is_tracing() or torch.compiler.is_compiling())):  # an export records no check
            missing = gn_det.config.missing_bf16_kernels(self.device)
            if missing:
                # gn-det's tools run such a config in fp32 (gn_det.config.adapt_to_this_machine); a model built by
                # the user's own code (DefaultPredictor, instantiate) computes as asked, and says what that costs
                logger.warning(f"{missing}: precision='bf16' is emulated by torch, slower than 'fp32' "
                               "(docs/SPEED.md)")
                self.warned_of_emulated_bf16 = True
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def forward(self, batched_inputs):
        if self.precision == "fp32":
            return super().forward(batched_inputs)
        with self.precision_context():
            return to_float32(super().forward(batched_inputs))

    def preprocess_image(self, batched_inputs):
        images = super().preprocess_image(batched_inputs)
        if self.channels_last:
            images.tensor = images.tensor.contiguous(memory_format=torch.channels_last)
        return images


@META_ARCH_REGISTRY.register()
class GNGeneralizedRCNN(PrecisionLayoutMixin, GeneralizedRCNN):
    """detectron2's GeneralizedRCNN (Mask R-CNN, Faster R-CNN) honouring ``MODEL.PRECISION`` and
    ``MODEL.CHANNELS_LAST``. Modules and parameter names are the parent's."""

    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        # Called by forward in eval mode, and directly by detectron2's test-time augmentation.
        if self.precision == "fp32":
            return super().inference(batched_inputs, detected_instances, do_postprocess)
        with self.precision_context():
            return to_float32(super().inference(batched_inputs, detected_instances, do_postprocess))
