"""The run plan's types: what the checks read from a config (:class:`RunSettings`) and a checked run
(:class:`RunPlan`), the same for both of detectron2's config systems (:mod:`gn_det.engine.run`)."""
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclasses.dataclass
class RunSettings:
    """What the checks read from a config, each value with the key it was read from."""

    source: str  # the config file, for messages
    device: str  # MODEL.DEVICE / train.device, after the CUDA-absent fallback
    amp: Tuple[str, bool]  # fp16 AMP (detectron2's AMPTrainer)
    batch: Tuple[str, Optional[int]]  # images per training iteration over all processes
    norms: Dict[str, Any]  # every norm site: key -> norm name (or spec)
    train_datasets: List[Tuple[str, str]]  # (key, dataset name) read in training
    test_datasets: List[Tuple[str, str]]  # (key, dataset name) read in evaluation
    weights: Tuple[str, str]  # (key, path) of the weights training or evaluation starts from ("" for none)
    output_dir: str
    seed: int  # SEED / train.seed; < 0: a random seed, as detectron2's default_setup does
    masks: bool = False  # the model predicts masks (MODEL.MASK_ON / a mask head): its datasets need segmentations
    adjustments: List[str] = dataclasses.field(default_factory=list)  # logged once the output folder exists


@dataclasses.dataclass
class RunPlan:
    """A checked run: the config, its settings, the model (built once, in this process) and the weights file
    already read (``preloaded``: ``{local path: content}``, handed to the checkpointer so it is read once)."""

    cfg: Any
    settings: RunSettings
    model: torch.nn.Module
    preloaded: Dict[str, Any]
    rng_state: Tuple
    eval_only: bool
    resume: bool
    lazy: bool  # a Python (LazyConfig) config
