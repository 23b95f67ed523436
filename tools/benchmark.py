#!/usr/bin/env python3
"""Train s/iter, inference s/image and peak memory of stock detectron2 GN Mask R-CNN vs gn-det's variants.

    python3 tools/benchmark.py --size 512 --images 2 --warmup 1 --repeats 3 --rounds 3 --output benchmark.json
    python3 tools/benchmark.py --protocol export --size 512 --warmup 1 --repeats 3   # eager vs exported models

Each variant runs in its own subprocess; see gn_det/analysis/benchmark.py for what is measured and how. To time
another commit, run the same command in a worktree of it as ``PYTHONPATH=. python3 tools/benchmark.py ...``: the
variants run the gn_det this process imported (the JSON's ``gn_det`` names its folder), and without PYTHONPATH
that is the installed one.
"""
import sys

from gn_det.analysis.benchmark import (VARIANTS, build_parser, check_device, chosen_variants, markdown_table,
                                       run_benchmark, variant_cfg)
from gn_det.errors import exit_on_input_error
from gn_det.fileio import check_output_location, write_json_atomically


def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_device(args.device)  # each variant's process would fail on it, after the others had run
    if args.output:  # written only after every variant has run
        check_output_location(args.output, "--output", folder=False)
    for name in chosen_variants(args):  # a bad --config KEY VALUE stops here, before any variant runs
        if VARIANTS[name].get("cuda") and not args.device.startswith("cuda"):
            parser.error(f"variant {name} (detectron2's AMPTrainer, fp16) needs --device cuda")
        variant_cfg(name, args)
    print(f"benchmark: {chosen_variants(args)} at {args.size}px, {args.images} images, warmup {args.warmup}, "
          f"repeats {args.repeats}, rounds {args.rounds}, device {args.device}, threads {args.threads or 'default'}",
          flush=True)

    def report_progress(name, result):
        if result["train_s_per_iter"] is None:  # --protocol export: inference only
            print(f"  {name}: infer {result['infer_s_per_image']:.3f} s/image, peak {result['infer_peak_mib']:.0f} "
                  "MiB", flush=True)
            return
        print(f"  {name}: train {result['train_s_per_iter']:.3f} s/iter, "
              f"infer {result['infer_s_per_image']:.3f} s/image, peak {result['train_peak_mib']:.0f} MiB",
              flush=True)

    report = run_benchmark(args, argv, on_result=report_progress)
    print()
    print(markdown_table(report))
    print("\nThe same runs in process CPU time (less sensitive to other processes on the machine):\n")
    print(markdown_table(report, clock="cpu"))
    if args.output:
        write_json_atomically(args.output, report)
        print(f"\nwrote {args.output}")


if __name__ == "__main__":
    with exit_on_input_error("benchmark.py"):
        main(sys.argv[1:])
