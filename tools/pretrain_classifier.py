#!/usr/bin/env python3
"""Pretrain a small GN or BN ResNet-18 on shape crops: the "ImageNet" of the paper's protocol in miniature.

    python tools/pretrain_classifier.py --norm GN --out weights/shapes_resnet18_gn.pth
    python tools/pretrain_classifier.py --norm BN --out weights/shapes_resnet18_bn.pth --iters 400

The classification data is the synthetic shapes dataset generated with seed 1 (the detection data is seed 0):
every instance cropped around its box at 64 px, labelled with its class. The state dict (torchvision ResNet
names) goes to --out, a summary with the validation accuracy next to it (.json); convert it with
tools/convert_weights.py (GN -> GN backbone, BN -> BN* backbone). tools/paper_protocol.py runs the whole chain.
"""
import argparse

from detectron2.utils.logger import setup_logger

from gn_det.analysis.pretrain import (
    check_pretrain_settings,
    ensure_pretrain_data,
    pretrain_and_save,
    pretrain_data_root,
    summary_path,
)
from gn_det.errors import InputError, exit_on_input_error
from gn_det.fileio import check_output_location


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--norm", choices=("GN", "BN"), required=True, help="GroupNorm (32 groups) or BatchNorm")
    parser.add_argument("--out", required=True, help="state dict to write (.pth)")
    parser.add_argument("--iters", type=int, default=400, help="SGD iterations (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per iteration (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.05, help="peak LR of the warm-up + cosine schedule")
    parser.add_argument("--data", default=None, help="pretraining shapes folder, generated if absent (default: one "
                                                     f"per image count, e.g. {pretrain_data_root()})")
    parser.add_argument("--num-train", type=int, default=1000, help="images generated for training (default: 1000)")
    parser.add_argument("--num-val", type=int, default=200, help="images generated for validation (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and sampling seed (default: 0)")
    return parser


def main():
    args = argument_parser().parse_args()
    if not args.out.endswith((".pth", ".pt")):
        raise InputError(f"--out {args.out} must end in .pth or .pt (a torch.save state dict)")
    check_pretrain_settings(args.iters, args.batch_size, args.lr)  # before the data is generated
    check_output_location(args.out, "--out", folder=False)
    setup_logger(name="gn_det", abbrev_name="gn_det")
    # Checks --num-train/--num-val and an existing --data folder before generating anything.
    data = ensure_pretrain_data(args.data, num_train=args.num_train, num_val=args.num_val)
    result = pretrain_and_save(args.norm, data, args.out, iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                               seed=args.seed)
    print(f"{args.norm} ResNet-18: validation accuracy {100 * result.val_accuracy:.1f}% after {args.iters} "
          f"iterations ({result.seconds / 60:.1f} min, {result.num_train_crops} training crops from {data})")
    print(f"wrote {args.out} and {summary_path(args.out)}")


if __name__ == "__main__":
    with exit_on_input_error("pretrain_classifier.py"):
        main()
