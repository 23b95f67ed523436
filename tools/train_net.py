#!/usr/bin/env python3
"""Train and evaluate gn-det models (detectron2's usual flags; runs on CPU when there is no CUDA).

    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.yaml
    python tools/train_net.py --config-file CONFIG --num-gpus 8 [KEY VALUE ...]
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file CONFIG --dataset mine=ann.json,images/ DATASETS.TRAIN "('mine',)"
    python tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.py train.max_iter=100  # LazyConfig
"""
import sys

from detectron2.engine import launch

from gn_det.engine import INPUT_ERRORS, argument_parser, train_or_evaluate
from gn_det.engine.lazy_train import is_lazy_config, train_or_evaluate_lazy


def main():
    args = argument_parser().parse_args()
    try:
        # a Python config file is a LazyConfig: detectron2's other config system
        body = train_or_evaluate_lazy if is_lazy_config(args.config_file) else train_or_evaluate
        launch(body, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except INPUT_ERRORS as err:  # bad input: one line naming the offender, no traceback
        sys.exit(f"train_net.py: error: {err.args[0]}")


if __name__ == "__main__":
    main()
