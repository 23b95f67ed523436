#!/usr/bin/env python3
"""tools/train_net.py whose every process also saves its model's weights after training, to
``$GN_DET_TEST_WEIGHTS.<global rank>.pth``: the multi-machine test compares the ranks' weights (test-only)."""
import os

import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from gn_det.engine import GNTrainer, argument_parser, launch, train_or_evaluate
from gn_det.errors import exit_on_input_error


class SaveWeightsHook(HookBase):
    def after_train(self):
        model = getattr(self.trainer.model, "module", self.trainer.model)  # unwrap DDP
        torch.save(model.state_dict(), f"{os.environ['GN_DET_TEST_WEIGHTS']}.{comm.get_rank()}.pth")


class WeightsSavingTrainer(GNTrainer):
    def build_hooks(self):
        return super().build_hooks() + [SaveWeightsHook()]


def train(args):
    return train_or_evaluate(args, WeightsSavingTrainer)


if __name__ == "__main__":
    parsed = argument_parser().parse_args()
    with exit_on_input_error("train_net.py"):
        launch(train, parsed)
