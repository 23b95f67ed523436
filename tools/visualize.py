#!/usr/bin/env python3
"""Draw predictions of finished runs on evaluation images: per image one PNG with the ground truth and each
run's predictions side by side, each panel titled with the run's label and its box / mask AP.

It reads the predictions COCOEvaluator saved in RUN_DIR/inference/<dataset>/instances_predictions.pth; a run
without them is evaluated first when --weights is given. Images are those where the runs differ most in the
ground-truth masks they find (--select differ, default) or evenly spaced through the split (--select even).

    python tools/visualize.py output/shapes/mask_rcnn_R_18_FPN_gn output/shapes/mask_rcnn_R_18_FPN_bnstar \\
        --labels GN "BN*" --images 4 --out output/shapes/pictures
"""
import argparse

from gn_det.analysis.visualize import SELECTIONS, visualize_runs
from gn_det.errors import exit_on_input_error
from gn_det.fileio import check_output_location


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIR of each run")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs")
    parser.add_argument("--labels", nargs="+", metavar="LABEL",
                        help="panel title of each run (default: folder names, with parent folders where names repeat)")
    parser.add_argument("--images", type=int, default=4, metavar="N", help="number of images (default: %(default)s)")
    parser.add_argument("--dataset", metavar="NAME",
                        help="registered dataset drawn, and whose AP titles the panels (default: the first run's "
                             "DATASETS.TEST)")
    parser.add_argument("--select", choices=SELECTIONS, default="differ",
                        help="how images are chosen (default: %(default)s)")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="draw predictions scoring at least this")
    parser.add_argument("--scale", type=float, default=1.0, help="panel size relative to the image")
    parser.add_argument("--weights", metavar="FILE",
                        help="checkpoint for runs without saved predictions: a file, or a name in each run folder")
    parser.add_argument("--config-file", metavar="FILE", help="config for those runs (default: RUN_DIR/config.yaml)")
    parser.add_argument("--sheet", metavar="FILE", help="also write all rows stacked into this one PNG")
    args = parser.parse_args()
    check_output_location(args.out, "--out")
    if args.sheet:
        check_output_location(args.sheet, "--sheet", folder=False)
    paths = visualize_runs(args.run_dirs, args.out, args.labels, args.dataset, args.images, args.select,
                           args.score_threshold, args.scale, args.config_file, args.weights, args.sheet)
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    with exit_on_input_error("visualize.py"):
        main()
