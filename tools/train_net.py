#!/usr/bin/env python3
"""Train and evaluate gn-det models (detectron2's usual flags; runs on CPU when there is no CUDA).

    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.yaml
    python tools/train_net.py --config-file CONFIG --num-gpus 8 [KEY VALUE ...]
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CONFIG --dataset mine=ann.json,images/ DATASETS.TRAIN "('mine',)"
    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.py train.max_iter=100  # LazyConfig

Bad input (config, datasets, weights, images) exits with one line naming the offender.
"""
from gn_det.engine import argument_parser, launch, train_or_evaluate
from gn_det.errors import exit_on_input_error


def main():
    args = argument_parser().parse_args()
    with exit_on_input_error("train_net.py"):
        launch(train_or_evaluate, args)  # a YAML or a Python (LazyConfig) config: one run pipeline


if __name__ == "__main__":
    main()
