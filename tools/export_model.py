#!/usr/bin/env python3
"""Export a trained gn-det model to TorchScript, ONNX or OpenVINO IR, float or int8 (detectron2's
tools/deploy/export_model.py flags), and optionally evaluate the exported file (COCO box / mask AP on the
config's test set):

    python3 tools/export_model.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.yaml --format torchscript \\
        --output exported/ --run-eval MODEL.WEIGHTS output/shapes/mask_rcnn_R_18_FPN_gn/model_final.pth

The traced image is --sample-image or the first image of the config's test set. docs/DEPLOY.md: formats,
runtimes, the ONNX opsets and what the fast path exports to.
"""
import argparse
import sys

from gn_det.deploy.export import FORMATS, ONNX_TARGETS, export_from_config
from gn_det.errors import exit_on_input_error


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's YAML or Python config")
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="output format")
    parser.add_argument("--export-method", choices=["tracing"], default="tracing",
                        help="how to export (tracing, with detectron2's TracingAdapter)")
    parser.add_argument("--onnx-runtime", choices=list(ONNX_TARGETS), default="onnxruntime",
                        help="runtime an ONNX file is for; it sets the opset and GroupNorm's form (default: %(default)s)")
    parser.add_argument("--calibration-images", type=int, default=300, metavar="N",
                        help="openvino-int8: calibrate on the first N training images (default: %(default)s)")
    parser.add_argument("--sample-image", metavar="FILE", help="image to trace with (default: first test image)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="folder for model.ts / model.onnx / model.xml or model_int8.xml + .bin")
    parser.add_argument("--run-eval", action="store_true",
                        help="evaluate the exported file on the config's test set (COCO box / mask AP)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, last: KEY VALUE pairs (YAML) or key=value strings (Python config)")
    if "--opts" in argv:  # detectron2's tools take trailing overrides bare; gn-det's predict.py after --opts
        argv = argv[:argv.index("--opts")] + argv[argv.index("--opts") + 1:]
    args = parser.parse_args(argv)
    from detectron2.utils.logger import setup_logger

    setup_logger(name="gn_det")
    setup_logger(name="detectron2")
    path, metrics = export_from_config(args.config_file, args.format, args.output, args.opts,
                                       args.onnx_runtime, args.sample_image, args.run_eval,
                                       args.calibration_images)
    print(f"wrote {path}")
    if metrics:
        from detectron2.evaluation import print_csv_format

        print_csv_format(metrics)
        for task, values in metrics.items():
            print(f"{task} AP: {values.get('AP', float('nan')):.2f}")


if __name__ == "__main__":
    with exit_on_input_error("export_model.py"):
        main(sys.argv[1:])
