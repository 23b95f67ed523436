"""Config keys gn-det adds to detectron2's defaults.

Call ``add_gn_config(cfg)`` on a ``detectron2.config.get_cfg()`` before merging a gn-det YAML; ``get_gn_cfg``
does both and checks the result. Symbols in the comments are those of Wu & He, "Group Normalization",
ECCV 2018 (Eq. 1-7 and Sec. 3-5).
"""
import functools
import os

import yaml
from omegaconf import OmegaConf

from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.proposal_generator.rpn import RPN_HEAD_REGISTRY
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    Res5ROIHeads,
    StandardROIHeads,
)
from detectron2.utils.file_io import PathManager

from gn_det.errors import InputError
from gn_det.layers.norm import NORM_NAMES, GroupNormSpec

# Every config key that names the normalization of one norm site ("norm site" = a layer built by
# detectron2 that accepts ``norm=``). gn-det's builders turn "GN" at these keys into the GroupNormSpec of
# MODEL.GN (gn_det.modeling.norm_sites), so "GN" everywhere honours MODEL.GN.*; other names stay detectron2's.
NORM_SITE_KEYS = (
    "MODEL.RESNETS.NORM",
    "MODEL.FPN.NORM",
    "MODEL.RPN.NORM",
    "MODEL.ROI_BOX_HEAD.NORM",
    "MODEL.ROI_MASK_HEAD.NORM",
    "MODEL.RETINANET.NORM",
)



def add_gn_config(cfg):
    """Add gn-det's keys (with their defaults) to a detectron2 config, in place."""
    cfg.MODEL.GN = CN()
    # G, the number of groups the C channels are split into (Sec. 3.1, Eq. 7: S_i = {k | floor(k_C/(C/G))
    # = floor(i_C/(C/G))}). The paper's default is G = 32; G = 1 is Layer Norm and G = C is Instance Norm
    # (Sec. 3.1, Fig. 2). Ablation: Table 3 (top). Used when DIM_PER_GROUP <= 0.
    cfg.MODEL.GN.NUM_GROUPS = 32
    # C/G, a fixed number of channels per group, so G varies with the layer's width (Table 3, bottom:
    # 16 channels per group is the paper's best). -1 turns it off; any value > 0 takes precedence over
    # NUM_GROUPS, so exactly one of the two settings is active.
    cfg.MODEL.GN.DIM_PER_GROUP = -1
    # epsilon in sigma_i = sqrt(1/m sum (x_k - mu_i)^2 + epsilon) (Eq. 2); 1e-5 as in the paper's code.
    cfg.MODEL.GN.EPS = 1e-5
    # Weight Standardization (Qiao et al., 2019) on every conv that carries a norm: the conv's weight is
    # standardised per output channel (zero mean, unit variance over its fan-in) before it is applied.
    # GN+WS is the best-known follow-up to GN; parameter names are unchanged, so checkpoints move freely
    # between GN and GN+WS models.
    cfg.MODEL.GN.WS = False
    # Norm of the RPN's shared 3x3 conv. The paper's RPN has none (""), as detectron2's; any norm name of
    # gn_det.layers.NORM_NAMES is accepted when the RPN head is "GNRPNHead".
    cfg.MODEL.RPN.NORM = ""

    # --- Speed (not in the paper; docs/SPEED.md). The two switches are read by gn-det's meta-architectures
    # wherever the model runs (training, evaluation, DefaultPredictor, distributed runs) and mean the same on
    # every device. Compute precision of the forward pass: "fp32", "bf16" (autocast; CPU and CUDA) or "fp16"
    # (autocast, CUDA only, trained with detectron2's AMPTrainer and its gradient scaler); outputs are float32.
    # A run (train_net) on a device without bf16 kernels (a CPU without oneDNN's, an NVIDIA GPU below compute
    # capability 8.0) runs "bf16" in "fp32" and logs it: torch emulates bf16 there (adapt_to_this_machine).
    cfg.MODEL.PRECISION = "fp32"
    # Convolution weights and the image batch in channels_last (NHWC), faster for oneDNN/cuDNN kernels.
    cfg.MODEL.CHANNELS_LAST = False
    # The CPU fast path (gn_det/cpu, docs/SPEED.md): sparse-matrix ROIAlign, layout-preserving poolers,
    # top-scores-first NMS, chunked RoI-head inference, in-place ReLUs and GroupNorm of RoI maps on an NCHW copy,
    # built into the model (needs ROI heads that build it: gn-det's); each computes as detectron2 does
    # off the CPU. Outputs change only by float rounding and the order of exactly tied scores. It also steps SGD
    # fused for CPU parameters: that step is CPU-specific as well (faster on CPU, docs/SPEED.md; not
    # AMPTrainer-safe on CUDA) and rounds differently from detectron2's foreach step, so it stays off the defaults.
    cfg.MODEL.CPU_FAST_PATH = False

    # --- Data. COCO-format datasets registered without code, each "NAME=JSON_FILE,IMAGE_DIR"
    # (the same as train_net.py's repeatable --dataset flag). Names can then be used in DATASETS.TRAIN/TEST.
    cfg.DATASETS.REGISTER = []
    # A training image that cannot be decoded (truncated, corrupt) or whose decoded size is not the one its JSON
    # entry gives stops training with one line naming it and its dataset (False), or is skipped with a warning
    # naming it and counting the skips, another image taking its place (True). Evaluation never skips: its
    # metrics would silently cover fewer images.
    cfg.DATALOADER.SKIP_UNDECODABLE_IMAGES = False

    # --- Linear LR scaling (Goyal et al., 2017; the paper's Sec. 4 recipe for other batch sizes).
    # When True, BASE_LR, WARMUP_ITERS, STEPS, MAX_ITER, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD are rescaled
    # from REFERENCE_IMS_PER_BATCH images per iteration to IMS_PER_BATCH: LR x N/ref, iterations x ref/N.
    cfg.SOLVER.LINEAR_LR_SCALING = False
    # The batch size the config's schedule was written for: 16 images, the paper's (8 GPUs x 2).
    cfg.SOLVER.REFERENCE_IMS_PER_BATCH = 16


def get_gn_cfg(config_file=None, opts=()):
    """A detectron2 config with gn-det's keys, merged from ``config_file`` and ``opts`` and checked.

    Every problem of the file (missing, or a missing ``_BASE_``, not YAML), of a key (unknown, wrong type) or of
    a gn-det setting is an InputError naming the file or the command line, and the key.
    """
    cfg = get_cfg()
    add_gn_config(cfg)
    source = config_file or "command line"
    if config_file:
        merge_config_file(cfg, config_file)
    # yacs: KeyError for an unknown key, ValueError for a value of the wrong type, AssertionError for an odd
    # number of items; each names the key
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as err:
        raise InputError(f"command line: {' '.join(str(err.args[0]).split())}") from None
    check_gn_config(cfg, source=source)
    return cfg


def merge_config_file(cfg, config_file):
    """``cfg.merge_from_file(config_file)`` with every failure of the file or its ``_BASE_`` chain (missing, a
    folder, not text, not YAML, not a mapping of keys, an unknown key, a wrong type) as one-line InputErrors.

    YAML is read safely: a ``!!python/...`` tag is a YAML error here, not code that runs (detectron2's own
    default, ``allow_unsafe=True``, would fall back to PyYAML's unsafe loader).
    """
    if os.path.isdir(config_file):
        raise InputError(f"{config_file}: is a folder, not a config file")
    if not PathManager.isfile(config_file):
        raise InputError(f"{config_file}: the config file does not exist")
    try:
        cfg.merge_from_file(config_file, allow_unsafe=False)
    except FileNotFoundError as err:  # a _BASE_ of the chain
        raise InputError(f"{config_file}: its _BASE_ chain names {err.filename}, which does not exist") from None
    except yaml.YAMLError as err:
        # PyYAML's message spans lines and names the file, line and column of the error
        raise InputError(f"{config_file}: not valid YAML: {' '.join(str(err).split())}") from None
    except UnicodeDecodeError:
        raise InputError(f"{config_file}: not a text file (a YAML config is UTF-8 text)") from None
    except (TypeError, AttributeError):
        # detectron2's load_yaml_with_base tests and iterates the top level as a mapping
        raise InputError(f"{config_file}: not a mapping of config keys (an empty file, or YAML whose top level "
                         "is not KEY: VALUE)") from None
    except (KeyError, ValueError, AssertionError) as err:
        raise InputError(f"{config_file}: {' '.join(str(err.args[0]).split())}") from None


def is_lazy_config(path):
    """Whether ``path`` is a LazyConfig (Python) file rather than a YAML config."""
    return bool(path) and path.endswith(".py")


def load_lazy_config(path, overrides=()):
    """The LazyConfig (Python config) at ``path`` with ``KEY=VALUE`` ``overrides`` applied.

    A missing file, a Python syntax error, an import that fails in it or a ``model_zoo`` / ``LazyConfig.load``
    reference to a file that does not exist is an InputError naming the file (and line); an override must lie
    under a section that exists (``train.max_iter=10`` needs ``train``; its leaf may be new, as detectron2
    allows). Any other exception of the file's code is a bug in it and keeps its traceback.
    """
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a config file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: config file does not exist")
    try:
        cfg = LazyConfig.load(path)
    except SyntaxError as err:  # detectron2 re-raises the parser's error as "Config file ... has syntax error!"
        cause = err.__cause__ if isinstance(err.__cause__, SyntaxError) else err
        raise InputError(f"{path}: not valid Python (line {cause.lineno}): {cause.msg}") from None
    except ImportError as err:
        raise InputError(f"{path}: an import fails: {' '.join(str(err).split())}") from None
    except (FileNotFoundError, UnicodeDecodeError, ValueError) as err:  # ValueError: null bytes in the source
        raise InputError(f"{path}: {' '.join(str(err).split())}") from None
    except RuntimeError as err:
        if "not available in Model Zoo" not in str(err):  # model_zoo.get_config of a file it does not ship
            raise
        raise InputError(f"{path}: {err}") from None
    for override in overrides:
        key, sep, _value = override.partition("=")
        if not sep:
            raise InputError(f"command line: {override!r} is not KEY=VALUE")
        parent = key.rpartition(".")[0]
        if parent and not OmegaConf.is_config(OmegaConf.select(cfg, parent, default=None)):
            raise InputError(f"command line: {override}: {path} has no section {parent}")
    return LazyConfig.apply_overrides(cfg, list(overrides))


def check_gn_config(cfg, source="config"):
    """Raise a one-line InputError naming the first invalid gn-det setting: the group setting (checked by
    GroupNormSpec, the one place), the speed switches against the model, the norm names."""
    try:
        GroupNormSpec.from_config(cfg)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    check_speed_keys(cfg, source)
    for key in NORM_SITE_KEYS:
        value = select(cfg, key)
        if isinstance(value, str) and value not in NORM_NAMES:
            raise InputError(
                f"{source}: {key}={value!r} is not a norm; choose one of {', '.join(map(repr, NORM_NAMES))}"
            )
    check_norm_site_builders(cfg, source)


def _registered_subclass(registry, name, parent):
    return isinstance(dict(registry).get(name), type) and issubclass(dict(registry)[name], parent)


# (norm-site key, the key that names what builds the site, its registry, whether the model builds the site)
NORM_SITE_BUILDERS = (
    ("MODEL.RESNETS.NORM", "MODEL.BACKBONE.NAME", BACKBONE_REGISTRY, lambda cfg: True),
    ("MODEL.RESNETS.NORM", "MODEL.ROI_HEADS.NAME", ROI_HEADS_REGISTRY,  # C4: res5 runs on each RoI
     lambda cfg: _registered_subclass(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, Res5ROIHeads)),
    ("MODEL.FPN.NORM", "MODEL.BACKBONE.NAME", BACKBONE_REGISTRY, lambda cfg: True),
    ("MODEL.RPN.NORM", "MODEL.RPN.HEAD_NAME", RPN_HEAD_REGISTRY,
     lambda cfg: cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"),
    ("MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_BOX_HEAD.NAME", ROI_BOX_HEAD_REGISTRY,
     lambda cfg: _registered_subclass(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, StandardROIHeads)),
    ("MODEL.ROI_MASK_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NAME", ROI_MASK_HEAD_REGISTRY, lambda cfg: cfg.MODEL.MASK_ON),
    ("MODEL.RETINANET.NORM", "MODEL.META_ARCHITECTURE", META_ARCH_REGISTRY,
     lambda cfg: _registered_subclass(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, RetinaNet)),
)


def check_norm_site_builders(cfg, source="config"):
    """Raise a one-line InputError when a norm setting would be silently ignored by what builds its site.

    "GN" follows ``MODEL.GN`` only where gn-det builds the site (a registered object with the class or function
    attribute ``follows_model_gn``); detectron2's own builders make their fixed 32-group GroupNorm, which is the
    same only while ``MODEL.GN`` is detectron2's GN. ``MODEL.RPN.NORM`` is gn-det's key: only gn-det's RPN head
    reads it.
    """
    gn = cfg.MODEL.GN
    own_gn = gn.DIM_PER_GROUP > 0 or gn.NUM_GROUPS != 32 or gn.EPS != 1e-5 or gn.WS
    for site, builder_key, registry, built in NORM_SITE_BUILDERS:
        value = select(cfg, site)
        ignored = (value == "GN" and own_gn) or (site == "MODEL.RPN.NORM" and value != "")
        builder = select(cfg, builder_key)
        if ignored and built(cfg) and not getattr(dict(registry).get(builder), "follows_model_gn", False):
            what = "MODEL.GN" if value == "GN" and own_gn else site
            raise InputError(
                f"{source}: {site}={value!r} is built by {builder_key}={builder!r}, which ignores {what}; name one "
                f"of {registered_with(registry, 'follows_model_gn')} (or a subclass)"
            )


def registered_with(registry, capability):
    """The names registered in ``registry`` whose class has the class attribute ``capability`` set."""
    return sorted(name for name, obj in registry if getattr(obj, capability, False))


def check_speed_keys(cfg, source="config"):
    """Raise a one-line InputError when a speed key is set on a model that would silently ignore it. What a
    registered class honours is its class attribute (``honours_precision_switches``, ``builds_cpu_fast_path``),
    so subclasses inherit it."""
    switched = cfg.MODEL.PRECISION != "fp32" or cfg.MODEL.CHANNELS_LAST
    meta_arch = dict(META_ARCH_REGISTRY).get(cfg.MODEL.META_ARCHITECTURE)
    if switched and not getattr(meta_arch, "honours_precision_switches", False):
        raise InputError(
            f"{source}: MODEL.PRECISION={cfg.MODEL.PRECISION!r} / MODEL.CHANNELS_LAST={cfg.MODEL.CHANNELS_LAST} "
            f"need a MODEL.META_ARCHITECTURE of {registered_with(META_ARCH_REGISTRY, 'honours_precision_switches')}"
            f" or a subclass, not {cfg.MODEL.META_ARCHITECTURE!r}"
        )
    roi_heads = dict(ROI_HEADS_REGISTRY).get(cfg.MODEL.ROI_HEADS.NAME)
    if cfg.MODEL.CPU_FAST_PATH and not getattr(roi_heads, "builds_cpu_fast_path", False):
        raise InputError(
            f"{source}: MODEL.CPU_FAST_PATH=True needs a MODEL.ROI_HEADS.NAME of "
            f"{registered_with(ROI_HEADS_REGISTRY, 'builds_cpu_fast_path')} or a subclass, not "
            f"{cfg.MODEL.ROI_HEADS.NAME!r}"
        )


@functools.lru_cache(maxsize=None)  # the CPU does not change; models ask at every bf16 forward
def cpu_has_bf16_kernels():
    """Whether oneDNN has bf16 kernels for this CPU (torch's check: AVX512 or newer on x86; AVX512-BF16 and AMX
    make them fast). Without them torch's fallback kernels compute bf16 convolutions and matrix products far
    slower than fp32 (docs/SPEED.md)."""
    import torch  # late: reading and checking config keys needs no torch

    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is None or bool(supported())  # a torch without the query: trust the config


@functools.lru_cache(maxsize=None)  # a GPU does not change; models ask at every bf16 forward
def gpu_compute_capability(index):
    """(major, minor) CUDA compute capability of GPU ``index``."""
    import torch

    return torch.cuda.get_device_capability(index)


def missing_bf16_kernels(device):
    """Why ``device`` (a ``torch.device``) has no bf16 kernels, as the opening words of a log line, or None
    where it has them. Without them torch emulates bf16 in float32: on a CPU without oneDNN's bf16 kernels
    (docs/SPEED.md), and on an NVIDIA GPU below compute capability 8.0 (Ampere), which has no bf16 tensor cores
    and no bf16 convolutions in cuDNN (torch's ``torch.cuda.is_bf16_supported(including_emulation=False)``
    draws the same line). ROCm GPUs count as having them, as torch counts them."""
    import torch

    if device.type == "cpu" and not cpu_has_bf16_kernels():
        return "No oneDNN bf16 kernels for this CPU (x86: AVX512 or newer)"
    if device.type == "cuda" and not torch.version.hip:
        major, minor = gpu_compute_capability(torch.cuda.current_device() if device.index is None else device.index)
        if major < 8:
            return f"No bf16 tensor cores on this GPU (compute capability {major}.{minor}; bf16 needs 8.0 or newer)"
    return None


def adapt_to_this_machine(cfg, device=None, keep_precision=False):
    """Adapt a YAML config (``MODEL.DEVICE``, ``MODEL.PRECISION``) or a Python config (``train.device``,
    ``model.precision``) in place to this machine, and return one line per change, naming the key. The one place
    where both config systems' tools (train_net, predict, visualize) do it:

    * CUDA named where there is no CUDA device runs on the CPU;
    * "bf16" on a device without bf16 kernels (:func:`missing_bf16_kernels`) runs in "fp32" (emulated bf16 is
      slower there, never a speed-up: docs/SPEED.md), unless ``keep_precision`` (an export, built for the
      machine that serves it).

    ``device`` (a tool's ``--device``) replaces the config's device, and the line names ``--device``. A model
    without gn-det's precision switch (a Python config's model without ``precision``) keeps its precision.
    """
    import torch  # late: reading and checking config keys needs no torch

    lazy = OmegaConf.is_config(cfg)
    if lazy:  # detectron2's tools/lazyconfig_train_net.py reads train.device; a model may have no precision
        device_key, precision_key = "train.device", "model.precision"
        config_device = OmegaConf.select(cfg, "train.device", default="cpu")
        precision = OmegaConf.select(cfg, "model.precision", default=None)
    else:
        device_key, precision_key = "MODEL.DEVICE", "MODEL.PRECISION"
        config_device, precision = cfg.MODEL.DEVICE, cfg.MODEL.PRECISION
    if device:
        device_key = "--device"
    else:
        device = config_device
    adjustments = []
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        adjustments.append(f"No CUDA device: {device_key}={device!r} runs on CPU")
        device = "cpu"
    missing = missing_bf16_kernels(torch.device(device)) if precision == "bf16" and not keep_precision else None
    if missing:
        adjustments.append(f"{missing}: {precision_key}='bf16' runs in 'fp32' (emulated bf16 would be slower)")
        precision = "fp32"
    if lazy:
        OmegaConf.update(cfg, "train.device", device, force_add=True)
        if precision is not None:
            cfg.model.precision = precision
    else:
        cfg.MODEL.DEVICE, cfg.MODEL.PRECISION = device, precision
    return adjustments


def select(cfg, dotted_key):
    """The value at a dotted key such as "MODEL.GN.NUM_GROUPS"."""
    node = cfg
    for part in dotted_key.split("."):
        node = node[part]
    return node
