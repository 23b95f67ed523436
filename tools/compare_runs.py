#!/usr/bin/env python3
"""Compare training runs side by side: a paper-style Markdown table (Δ to the first run), CSV and a plot.

The runs are compared on one test set: --dataset, by default the first run's first DATASETS.TEST; a run not
evaluated on it is an error.

    python tools/compare_runs.py output/shapes/mask_rcnn_R_18_FPN_gn output/shapes/mask_rcnn_R_18_FPN_bnstar \\
        --labels GN "BN*"
"""
import argparse
import os

from gn_det.analysis.runs import (comparison_dataset, comparison_rows, load_runs, markdown_table, plot_runs,
                                  write_csv)
from gn_det.errors import exit_on_input_error
from gn_det.fileio import check_output_location


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIR of each run; the first is the reference")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="names of the runs in the table and plot, one per RUN_DIR (default: the folder names, "
                             "with parent folders where names repeat)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="test set whose AP is compared (default: the first run's first DATASETS.TEST)")
    parser.add_argument("--out", default="comparison", help="prefix of the CSV and PNG written (default: %(default)s)")
    args = parser.parse_args()
    check_output_location(args.out + ".csv", "--out", folder=False)
    runs = load_runs(args.run_dirs, args.labels)
    dataset = comparison_dataset(runs, args.dataset)
    rows = comparison_rows(runs, dataset)
    print(markdown_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_csv(rows, args.out + ".csv")
    plot_runs(runs, args.out + ".png", dataset)
    on = f"AP on {dataset}; " if dataset else ""
    print(f"\n{on}wrote {args.out}.csv and {args.out}.png")


if __name__ == "__main__":
    with exit_on_input_error("compare_runs.py"):
        main()
