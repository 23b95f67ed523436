#!/usr/bin/env python3
"""Feature distributions over training (the paper's Figure 3): record them while training, plot runs side by side.

    python tools/feature_stats.py train --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.yaml [--layer MODULE]
        [--where output|input] [--period 10] [train_net.py flags] [KEY VALUE ...]
    python tools/feature_stats.py plot RUN_DIR [RUN_DIR ...] --out feature_stats.png [--separate-y-axes]

`train` is tools/train_net.py that also writes OUTPUT_DIR/feature_stats.json: every --period iterations, the
1/20/80/99th percentiles (and mean, std) of what the training forward passes into (--where input) or gets out of
(--where output, the default for a given --layer) one module, e.g. backbone.bottom_up.res4 or backbone.fpn_output3.
Without --layer it records the paper's conv5_3 before normalization: the last conv of res5 at its norm's input.
tools/sweep.py --feature-stats trains every cell this way. `plot` draws one panel per run (shared y axis).
"""
import argparse
import os
import sys

from gn_det.analysis.feature_stats import plot_feature_stats_of_runs
from gn_det.engine import argument_parser, launch
from gn_det.analysis.feature_stats_hook import WHERE, train_with_feature_stats
from gn_det.errors import InputError, exit_on_input_error
from gn_det.fileio import check_output_location


def train_argument_parser():
    parser = argument_parser()
    parser.prog = "feature_stats.py train"
    parser.add_argument("--layer", metavar="MODULE", help="module path in the model (default: the last res5 conv, "
                                                          "before its norm)")
    parser.add_argument("--where", choices=WHERE, help="record the module's output or its input")
    parser.add_argument("--period", type=int, default=10, help="record every N iterations (default: %(default)s)")
    return parser


def plot_argument_parser():
    parser = argparse.ArgumentParser(prog="feature_stats.py plot", description="plot runs' feature_stats.json")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIR of each run")
    parser.add_argument("--out", default="feature_stats.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--columns", type=int, default=4, help="panels per row (default: %(default)s)")
    parser.add_argument("--separate-y-axes", action="store_true",
                        help="give each panel its own y axis (default: shared, to compare the spreads)")
    return parser


def plot(args):
    """The `plot` command: its input is checked before anything is written."""
    if args.columns < 1:
        raise InputError(f"--columns {args.columns} must be >= 1")
    missing = [d for d in args.run_dirs if not os.path.isdir(d)]
    if missing:
        raise InputError(f"{missing[0]} is not a folder")
    check_output_location(args.out, "--out", folder=False)  # save_figure creates the missing folders
    plotted = plot_feature_stats_of_runs(args.run_dirs, args.out, args.columns, not args.separate_y_axes)
    if not plotted:
        raise InputError("none of the runs has a feature_stats.json with records (train them with "
                         "`feature_stats.py train` or `sweep.py --feature-stats`)")
    print(f"wrote {args.out} ({plotted} of {len(args.run_dirs)} runs)")


def main():
    command, argv = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else (None, [])
    if command == "train":
        args = train_argument_parser().parse_args(argv)
        with exit_on_input_error("feature_stats.py"):
            launch(train_with_feature_stats, args)
    elif command == "plot":
        args = plot_argument_parser().parse_args(argv)
        with exit_on_input_error("feature_stats.py"):
            plot(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
