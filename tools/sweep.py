#!/usr/bin/env python3
"""Train a grid of runs over norm, group setting and images per batch, then tabulate and plot box/mask AP.

    python tools/sweep.py --norms GN BN BNstar --ims 1 2 4 --out output/sweeps/shapes --name batch_size
    python tools/sweep.py --norms GN --groups 1 8 32 --ims 4 --out output/sweeps/shapes --name groups
    python tools/sweep.py --norms GN GN+WS --ims 4 --feature-stats --out output/sweeps/ws SOLVER.MAX_ITER 150
    python tools/sweep.py ... --dry-run          # list the cells and their state, train nothing

docs/RESULTS.md has the experiments' commands and their cost on a 2-core CPU.

Every cell is one tools/train_net.py run in OUT/<cell>, e.g. OUT/norm=GN,G=32,ims=4, with SOLVER.LINEAR_LR_SCALING
on: the base config's schedule is for SOLVER.REFERENCE_IMS_PER_BATCH images per batch (4 in configs/shapes), and
other batch sizes get the LR x N/4 and the iterations x 4/N. Trailing KEY VALUE options go to every cell (at the
reference batch size: SOLVER.MAX_ITER 100 means 400 iterations at 1 image per batch); the keys each cell sets
itself (norms, MODEL.GN.*, SOLVER.IMS_PER_BATCH, SOLVER.LINEAR_LR_SCALING) are refused there. Running the same
command again skips finished cells, resumes unfinished ones, and rewrites the tables OUT/NAME.{md,csv,png} (--name,
default sweep). Sweeps may share OUT: a cell in several grids trains once. A cell whose folder holds a run started
with other options, finished or interrupted, is left as it is and out of the tables.
"""
import argparse
import os
import sys

import torch

from gn_det.analysis.feature_stats import plot_feature_stats_of_runs
from gn_det.analysis.sweep import (
    GROUPED_NORMS,
    NORM_SLUGS,
    cell_command,
    check_feature_stats_options,
    check_sweep_options,
    expand_grid,
    has_checkpoint,
    other_options_detail,
    other_options_state,
    read_results,
    run_finished,
    run_sweep,
    sweep_markdown,
    train_net_command,
    write_sweep_outputs,
)
from gn_det.errors import exit_on_input_error

TOOLS = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(os.path.dirname(TOOLS), "configs", "shapes", "mask_rcnn_R_18_FPN_gn.yaml")


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="base config of every cell (default: %(default)s)")
    parser.add_argument("--norms", nargs="+", default=["GN", "BN", "BN*"], metavar="NORM",
                        help=f"of {', '.join(NORM_SLUGS)} (BN* also as BNstar; default: GN BN BN*)")
    parser.add_argument("--groups", nargs="+", type=int, metavar="G",
                        help=f"MODEL.GN.NUM_GROUPS values for {' and '.join(GROUPED_NORMS)} cells (default: 32 "
                             "unless --dim-per-group is given)")
    parser.add_argument("--dim-per-group", nargs="+", type=int, metavar="C/G",
                        help="MODEL.GN.DIM_PER_GROUP values (channels per group), cells in addition to --groups")
    parser.add_argument("--ims", nargs="+", type=int, default=[1, 2, 4], metavar="N",
                        help="SOLVER.IMS_PER_BATCH values (default: 1 2 4)")
    parser.add_argument("--out", default="output/sweeps/sweep",
                        help="folder of the cells and tables (default: %(default)s)")
    parser.add_argument("--name", default="sweep", help="tables are written to OUT/NAME.{md,csv,png}, so sweeps "
                                                        "sharing OUT (and their common cells) keep their own tables")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and their state; train nothing")
    parser.add_argument("--feature-stats", action="store_true",
                        help="train through tools/feature_stats.py: each cell also writes feature_stats.json (cells "
                             "finished without it are not retrained), OUT/NAME_feature_stats.png shows them")
    parser.add_argument("--feature-layer", help="module whose features are recorded (default: feature_stats.py's)")
    parser.add_argument("--feature-period", type=int, default=10, help="record every N iterations (default: 10)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config options for every cell, e.g. SOLVER.MAX_ITER 100")
    return parser


def train_command(args):
    if not args.feature_stats:
        return train_net_command(TOOLS)
    command = [sys.executable, os.path.join(TOOLS, "feature_stats.py"), "train", "--period", str(args.feature_period)]
    return command + (["--layer", args.feature_layer] if args.feature_layer else [])


def describe(cell, run_dir, args):
    if cell.unsupported_reason():
        return f"unsupported: {cell.unsupported_reason()}"
    command = cell_command(cell, run_dir, args.config, [], args.opts, torch.cuda.device_count())
    other = other_options_state(run_dir, command)
    if other:
        return f"not trained: {other_options_detail(other, run_dir)}"
    if run_finished(run_dir):
        return "finished"
    return "interrupted (resumes from its last checkpoint)" if has_checkpoint(run_dir) else "to train"


def main():
    args = argument_parser().parse_args()
    cells = expand_grid(args.norms, args.ims, args.groups, args.dim_per_group)
    check_sweep_options(cells, args.config, args.opts, torch.cuda.device_count())
    if args.feature_stats:
        check_feature_stats_options(cells, args.config, args.feature_layer, args.feature_period, args.opts,
                                    torch.cuda.device_count())
    if args.dry_run:
        for cell in cells:
            print(f"{cell.name}: {describe(cell, os.path.join(args.out, cell.name), args)}")
        return

    reports = []
    try:
        for report in run_sweep(cells, args.out, args.config, train_command(args), args.opts,
                                torch.cuda.device_count()):
            reports.append(report)
            detail = f" ({report.detail})" if report.detail else ""
            if report.status == "started":
                print(f"{report.cell.name}: training{detail}, log in {report.run_dir}/log.txt", flush=True)
            elif report.status == "other options":
                print(f"{report.cell.name}: not trained: {report.detail}", flush=True)
            elif report.status == "trained":
                print(f"{report.cell.name}: trained in {report.seconds / 60:.1f} min", flush=True)
            else:
                print(f"{report.cell.name}: {report.status}{detail}", flush=True)
    except KeyboardInterrupt:
        sys.exit("sweep.py: interrupted; run the same command again to resume")

    results = read_results(cells, args.out, args.config, args.opts, torch.cuda.device_count())
    print()
    print(sweep_markdown(results, reports))
    paths = write_sweep_outputs(results, args.out, reports, args.name)
    if args.feature_stats:
        stats_plot = os.path.join(args.out, f"{args.name}_feature_stats.png")
        if plot_feature_stats_of_runs([os.path.join(args.out, c.name) for c in cells], stats_plot):
            paths.append(stats_plot)
    print(f"wrote {', '.join(paths)}")
    if any(report.status == "failed" for report in reports):
        sys.exit(1)


if __name__ == "__main__":
    with exit_on_input_error("sweep.py"):
        main()
