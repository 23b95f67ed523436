#!/usr/bin/env python3
"""The paper's protocol in miniature, in one command: pretrain GN and BN ResNet-18 classifiers on shape crops,
convert them (GN -> GN, BN -> BN*), fine-tune Mask R-CNN from each on the shapes dataset, compare box/mask AP.

    python tools/paper_protocol.py                          # the full chain with the configs' schedules
    python tools/paper_protocol.py --scratch                # + GN and BN* trained from scratch, for reference
    python tools/paper_protocol.py --pretrain-iters 200 SOLVER.MAX_ITER 100    # shorter

Steps (each is skipped when its result is already there, so an interrupted protocol continues; a classifier or
run kept from before must have been made with these settings, as its summary JSON or the run's sweep_cell.json
record says, else the protocol stops in one line before anything is trained or written):
 1. tools/pretrain_classifier.py for each norm -> WEIGHTS_DIR/shapes_resnet18_{gn,bn}.pth (+ .json summary)
 2. tools/convert_weights.py -> WEIGHTS_DIR/shapes_resnet18_{gn,bn}.pkl, checked against the fine-tuning config:
    every ResNet parameter matched, INPUT.FORMAT / PIXEL_MEAN / PIXEL_STD / STRIDE_IN_1X1 as in pretraining
 3. tools/train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN_{gn,bnstar}_pretrained.yaml into
    OUT/<config name> (MODEL.WEIGHTS pointing at step 2's file); trailing KEY VALUE options go to these runs
 4. OUT/comparison.{md,csv,png}: box/mask AP side by side (tools/compare_runs.py's table, Δ to the first row)
"""
import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from gn_det.analysis.pretrain import (
    FINETUNE_CONFIGS,
    SCRATCH_CONFIGS,
    WEIGHTS_NAMES,
    check_pretrain_settings,
    check_pretrained_as_asked,
    convert_and_check,
    ensure_pretrain_data,
    pretrain_and_save,
    pretrain_data_root,
    summary_path,
)
from gn_det.analysis.runs import Run, comparison_rows, markdown_table, plot_runs, write_csv
from gn_det.analysis.sweep import (
    CELL_FILE,
    other_options_state,
    record_options,
    run_finished,
    train_in_subprocess,
    train_net_command,
)
from gn_det.config import get_gn_cfg
from gn_det.errors import InputError, exit_on_input_error
from gn_det.fileio import atomic_write, read_json

TOOLS = os.path.dirname(os.path.abspath(__file__))
SHAPES_CONFIGS = os.path.join(os.path.dirname(TOOLS), "configs", "shapes")
FINETUNE_LABELS = {"GN": "GN, pretrained GN", "BN": "BN*, pretrained BN"}
SCRATCH_LABELS = {"GN": "GN, from scratch", "BN": "BN*, from scratch"}


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/shapes/paper_protocol", help="fine-tuning runs and comparison "
                                                                             "(default: %(default)s)")
    parser.add_argument("--weights-dir", default="weights", help="pretrained and converted weights (default: "
                                                                 "%(default)s, where the configs' MODEL.WEIGHTS look)")
    parser.add_argument("--norms", nargs="+", choices=("GN", "BN"), default=["GN", "BN"],
                        help="pretrained norms to run (default: GN BN)")
    parser.add_argument("--scratch", action="store_true",
                        help="also train the GN and BN* configs from scratch with the same options, for reference")
    parser.add_argument("--pretrain-iters", type=int, default=400, help="classifier iterations (default: 400)")
    parser.add_argument("--pretrain-batch-size", type=int, default=64, help="crops per iteration (default: 64)")
    parser.add_argument("--pretrain-data", default=None, help=f"pretraining shapes folder, generated if absent "
                                                              f"(default: {pretrain_data_root()})")
    parser.add_argument("--pretrain-images", nargs=2, type=int, default=[1000, 200], metavar=("TRAIN", "VAL"),
                        help="images generated for pretraining and its validation (default: 1000 200)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE",
                        help="config options for the fine-tuning runs, e.g. SOLVER.MAX_ITER 100")
    return parser


def pretrain(args, norm, state_dict):
    if os.path.isfile(state_dict):
        print(f"[{norm}] pretrained classifier: {state_dict} exists, kept")
        return
    print(f"[{norm}] pretraining a ResNet-18 classifier ({args.pretrain_iters} iterations of "
          f"{args.pretrain_batch_size} crops) ...", flush=True)
    data = ensure_pretrain_data(args.pretrain_data, *args.pretrain_images)
    result = pretrain_and_save(norm, data, state_dict, iters=args.pretrain_iters,
                               batch_size=args.pretrain_batch_size)
    print(f"[{norm}] validation accuracy {100 * result.val_accuracy:.1f}% ({result.seconds / 60:.1f} min); "
          f"wrote {state_dict}", flush=True)


def fine_tune_command(config, run_dir, opts):
    return [*train_net_command(TOOLS), "--config-file", config, "--resume", *opts, "OUTPUT_DIR", run_dir]


def check_kept_run(config, run_dir, opts):
    """A run the protocol would keep or resume must have been started with these options (the record it writes,
    as a sweep's cells do): an InputError naming the folder otherwise."""
    state = other_options_state(run_dir, fine_tune_command(config, run_dir, opts))
    if state:
        raise InputError(f"{run_dir} holds a {state} run started with other options (see "
                         f"{os.path.join(run_dir, CELL_FILE)}); delete the folder or give another --out")


def fine_tune(label, config, run_dir, opts):
    """Train ``config`` into ``run_dir`` unless it finished already; returns an error line or None."""
    if run_finished(run_dir):
        print(f"[{label}] {run_dir} finished already, kept")
        return None
    print(f"[{label}] training {os.path.relpath(config)} into {run_dir} (log in {run_dir}/log.txt) ...", flush=True)
    command = fine_tune_command(config, run_dir, opts)
    record_options(run_dir, command)
    error, seconds = train_in_subprocess(command, run_dir)
    print(f"[{label}] {'failed: ' + error if error else 'trained'} ({seconds / 60:.1f} min)", flush=True)
    return error


def planned_runs(args):
    """(label, config, run dir, options) of every run the protocol trains, in order."""
    runs = []
    for norm in args.norms:
        checkpoint = os.path.join(args.weights_dir, WEIGHTS_NAMES[norm]) + ".pkl"
        runs.append((FINETUNE_LABELS[norm], os.path.join(SHAPES_CONFIGS, FINETUNE_CONFIGS[norm]),
                     os.path.join(args.out, FINETUNE_CONFIGS[norm][:-len(".yaml")]),
                     [*args.opts, "MODEL.WEIGHTS", checkpoint]))
    if args.scratch:
        for norm in args.norms:
            runs.append((SCRATCH_LABELS[norm], os.path.join(SHAPES_CONFIGS, SCRATCH_CONFIGS[norm]),
                         os.path.join(args.out, SCRATCH_CONFIGS[norm][:-len(".yaml")]), list(args.opts)))
    return runs


def main():
    args = argument_parser().parse_args()
    check_pretrain_settings(args.pretrain_iters, args.pretrain_batch_size)
    # bad input stops here, before anything is trained or written: a bad KEY VALUE, and kept files or runs that
    # were made with other settings than these
    pretrain_data = args.pretrain_data or pretrain_data_root(*args.pretrain_images)
    for norm in args.norms:
        check_pretrained_as_asked(os.path.join(args.weights_dir, WEIGHTS_NAMES[norm]) + ".pth", pretrain_data,
                                  args.pretrain_iters, args.pretrain_batch_size)
    runs = planned_runs(args)
    for _, config, run_dir, opts in runs:
        get_gn_cfg(config, opts)
        check_kept_run(config, run_dir, opts)
    setup_logger(name="gn_det", abbrev_name="gn_det")
    failed = False
    for norm in args.norms:
        base = os.path.join(args.weights_dir, WEIGHTS_NAMES[norm])
        state_dict, checkpoint = base + ".pth", base + ".pkl"
        pretrain(args, norm, state_dict)
        _, match = convert_and_check(state_dict, checkpoint, os.path.join(SHAPES_CONFIGS, FINETUNE_CONFIGS[norm]),
                                     args.opts)
        print(f"[{norm}] converted to {checkpoint}: all {len(match.matched)} ResNet parameters of "
              f"{FINETUNE_CONFIGS[norm]} matched", flush=True)
    for label, config, run_dir, opts in runs:
        failed |= fine_tune(label, config, run_dir, opts) is not None

    finished = [Run(run_dir, name=label) for label, _, run_dir, _ in runs if run_finished(run_dir)]
    if finished:
        table = markdown_table(comparison_rows(finished))
        accuracies = []
        for norm in args.norms:
            path = summary_path(os.path.join(args.weights_dir, WEIGHTS_NAMES[norm]) + ".pth")
            if os.path.isfile(path):
                accuracies.append(f"{norm} {100 * read_json(path, 'pretraining summary')['val_accuracy']:.1f}%")
        pretraining = f"Pretraining (shape-crop classification) validation accuracy: {', '.join(accuracies)}"
        print(f"\n{table}\n\n{pretraining}")
        prefix = os.path.join(args.out, "comparison")
        with atomic_write(prefix + ".md", "w") as f:
            f.write(f"{table}\n\n{pretraining}\n")
        write_csv(comparison_rows(finished), prefix + ".csv")
        plot_runs(finished, prefix + ".png")
        print(f"\nwrote {prefix}.md, {prefix}.csv and {prefix}.png")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    with exit_on_input_error("paper_protocol.py"):
        main()
