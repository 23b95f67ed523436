#!/usr/bin/env python3
"""The paper's protocol in miniature, in one command: pretrain GN and BN ResNet-18 classifiers on shape crops,
convert them (GN -> GN, BN -> BN*), fine-tune Mask R-CNN from each on the shapes dataset, compare box/mask AP.

    python tools/paper_protocol.py                          # the full chain with the configs' schedules
    python tools/paper_protocol.py --scratch                # + GN and BN* trained from scratch, for reference
    python tools/paper_protocol.py --pretrain-iters 200 SOLVER.MAX_ITER 100    # shorter

Steps (each is skipped when its result is already there, so an interrupted protocol continues):
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
    convert_and_check,
    ensure_pretrain_data,
    pretrain_and_save,
    pretrain_data_root,
    summary_path,
)
from gn_det.analysis.runs import Run, comparison_rows, markdown_table, plot_runs, write_csv
from gn_det.analysis.sweep import run_finished, train_in_subprocess, train_net_command
from gn_det.config import get_gn_cfg
from gn_det.errors import exit_on_input_error
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


def fine_tune(label, config, run_dir, opts):
    """Train ``config`` into ``run_dir`` unless it finished already; returns an error line or None."""
    if run_finished(run_dir):
        print(f"[{label}] {run_dir} finished already, kept")
        return None
    print(f"[{label}] training {os.path.relpath(config)} into {run_dir} (log in {run_dir}/log.txt) ...", flush=True)
    command = [*train_net_command(TOOLS), "--config-file", config, "--resume", *opts, "OUTPUT_DIR", run_dir]
    error, seconds = train_in_subprocess(command, run_dir)
    print(f"[{label}] {'failed: ' + error if error else 'trained'} ({seconds / 60:.1f} min)", flush=True)
    return error


def main():
    args = argument_parser().parse_args()
    check_pretrain_settings(args.pretrain_iters, args.pretrain_batch_size)
    for norm in args.norms:  # a bad KEY VALUE stops here, before anything is trained or written
        get_gn_cfg(os.path.join(SHAPES_CONFIGS, FINETUNE_CONFIGS[norm]), args.opts)
        if args.scratch:
            get_gn_cfg(os.path.join(SHAPES_CONFIGS, SCRATCH_CONFIGS[norm]), args.opts)
    setup_logger(name="gn_det", abbrev_name="gn_det")
    runs, failed = [], False
    for norm in args.norms:
        base = os.path.join(args.weights_dir, WEIGHTS_NAMES[norm])
        state_dict, checkpoint = base + ".pth", base + ".pkl"
        config = os.path.join(SHAPES_CONFIGS, FINETUNE_CONFIGS[norm])
        pretrain(args, norm, state_dict)
        _, match = convert_and_check(state_dict, checkpoint, config, args.opts)
        print(f"[{norm}] converted to {checkpoint}: all {len(match.matched)} ResNet parameters of "
              f"{FINETUNE_CONFIGS[norm]} matched", flush=True)
        run_dir = os.path.join(args.out, FINETUNE_CONFIGS[norm][:-len(".yaml")])
        opts = [*args.opts, "MODEL.WEIGHTS", checkpoint]
        failed |= fine_tune(FINETUNE_LABELS[norm], config, run_dir, opts) is not None
        runs.append((FINETUNE_LABELS[norm], run_dir))
    if args.scratch:
        for norm in args.norms:
            run_dir = os.path.join(args.out, SCRATCH_CONFIGS[norm][:-len(".yaml")])
            config = os.path.join(SHAPES_CONFIGS, SCRATCH_CONFIGS[norm])
            failed |= fine_tune(SCRATCH_LABELS[norm], config, run_dir, args.opts) is not None
            runs.append((SCRATCH_LABELS[norm], run_dir))

    finished = [Run(run_dir, name=label) for label, run_dir in runs if run_finished(run_dir)]
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
