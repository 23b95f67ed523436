#!/usr/bin/env python3
"""Run a trained model on images, folders or globs: one PNG per image with the predictions drawn, and
DIR/predictions.json with every prediction as COCO results (box, RLE mask, score, category id and name).

    python tools/predict.py --config-file configs/shapes/mask_rcnn_R_18_FPN_gn.yaml \\
        --weights output/shapes/mask_rcnn_R_18_FPN_gn/model_final.pth my_images/ "more/*.jpg" --out predictions/
    python tools/predict.py --config-file ... --backend onnxruntime --weights exported/model.onnx my_images/ --out p/
"""
import argparse

from gn_det.errors import exit_on_input_error
from gn_det.fileio import check_output_location
from gn_det.predict import BACKENDS, expand_inputs, load_predictor, predict_images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's YAML or Python config")
    parser.add_argument("--weights", required=True, metavar="FILE",
                        help="checkpoint to load (e.g. model_final.pth), or with --backend other than torch the file "
                             "tools/export_model.py wrote (model.ts, model.onnx, model.xml, model_int8.xml)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="what runs the model: torch (the config's model), or an exported file in torchscript, "
                             "onnxruntime or openvino (CPU; default: %(default)s)")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of images or globs")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the PNGs and predictions.json")
    parser.add_argument("--device", help="cpu or cuda[:N] (default: the config's; CPU where there is no CUDA)")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="draw predictions scoring at least this (the JSON keeps all; default: %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the drawn PNGs relative to the images")
    parser.add_argument("--coco-json", metavar="FILE",
                        help="COCO file listing the images: image and category ids of the JSON are its ids")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, last: KEY VALUE pairs (YAML) or key=value strings (Python config)")
    args = parser.parse_args()
    check_output_location(args.out, "--out")
    paths = expand_inputs(args.inputs)  # checked before the model loads and before --out is created
    predictor = load_predictor(args.config_file, args.weights, args.opts, args.device, args.backend)
    json_path = predict_images(predictor, paths, args.out, args.score_threshold, args.scale, args.coco_json)
    print(f"wrote {len(paths)} PNGs and {json_path}")


if __name__ == "__main__":
    with exit_on_input_error("predict.py"):
        main()
