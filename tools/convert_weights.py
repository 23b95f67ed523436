#!/usr/bin/env python3
"""Convert a timm or torchvision ResNet state dict into a detectron2 checkpoint for gn-det's backbones.

    python tools/convert_weights.py resnet50_gn.pth weights/timm_resnet50_gn.pkl
    python tools/convert_weights.py resnet50.safetensors weights/torchvision_resnet50.pkl --source torchvision
    python tools/convert_weights.py IN OUT --config-file configs/.../mask_rcnn_R_50_FPN_2x_gn_timm.yaml

GN weights become a GN backbone, BN weights a BN* (FrozenBN) one. The result is checked against gn-det's ResNet
of the same depth and norm (and, with --config-file, against that config's model): the exit status is 1 when
any ResNet parameter is missing or left over, with one line naming the first such key (and for any other bad
input: a missing file, a bad config).
"""
import argparse

from detectron2.modeling import build_model

from gn_det.checkpoint import convert_weights
from gn_det.config import get_gn_cfg
from gn_det.errors import InputError, exit_on_input_error
from gn_det.fileio import check_output_location


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", help="timm/torchvision ResNet state dict: .pth, .pt or .safetensors")
    parser.add_argument("output", help="detectron2 checkpoint to write (.pkl)")
    parser.add_argument("--source", choices=("auto", "timm", "torchvision"), default="auto",
                        help="recorded in the checkpoint (both libraries name ResNets identically)")
    parser.add_argument("--norm", choices=("auto", "GN", "BN"), default="auto",
                        help="norm of the source; auto: BN when it has running statistics, else GN")
    parser.add_argument("--depth", type=int, choices=(18, 34, 50, 101, 152),
                        help="expected ResNet depth (default: inferred from the blocks per layer)")
    parser.add_argument("--num-groups", type=int, default=32, metavar="G",
                        help="groups of the source's GroupNorms, recorded and checked against the model (default: "
                             "%(default)s, timm's resnet*_gn)")
    parser.add_argument("--config-file", metavar="FILE",
                        help="also check that this gn-det config's model loads every ResNet weight from OUTPUT")
    return parser


def main(argv=None):
    args = argument_parser().parse_args(argv)
    if not args.output.endswith(".pkl"):
        raise InputError(f"OUTPUT {args.output} must end in .pkl (detectron2's format for converted weights)")
    check_output_location(args.output, "OUTPUT", folder=False)
    # the config is read and its model checked against the result before anything is written
    cfg = get_gn_cfg(args.config_file, ["MODEL.DEVICE", "cpu"]) if args.config_file else None
    model = build_model(cfg) if cfg is not None else None
    converted = convert_weights(args.input, args.output, source=args.source, norm=args.norm, depth=args.depth,
                                model=model, num_groups=args.num_groups)
    meta = converted.metadata
    match = converted.reference_match
    matched, total = len(match.matched), len(match.matched) + len(match.missing)
    print(f"{args.input}: {meta['source']} ResNet-{meta['depth']}, {meta['norm']}")
    print(f"matched {matched}/{total} parameters of gn-det's ResNet-{meta['depth']} ({meta['norm']})")
    print(f"unused: {', '.join(converted.unused_keys) or 'none'}")
    if converted.dropped_keys:
        print(f"dropped {len(converted.dropped_keys)} BN counters (num_batches_tracked)")
    print(f"wrote {args.output}; the model should use INPUT.FORMAT {meta['input_format']}, "
          f"MODEL.PIXEL_MEAN {meta['pixel_mean']}, MODEL.PIXEL_STD {meta['pixel_std']}, "
          f"MODEL.RESNETS.STRIDE_IN_1X1 {meta['stride_in_1x1']}")
    if model is not None:
        print(f"{args.config_file}: all {len(converted.model_match.matched)} ResNet weights of the model matched")


if __name__ == "__main__":
    with exit_on_input_error("convert_weights.py"):
        main()
