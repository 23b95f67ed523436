"""Side-by-side speed and memory of stock detectron2 GN Mask R-CNN and gn-det's variants (tools/benchmark.py).

The variants (``VARIANTS``): stock detectron2 GN in fp32, and as a user would speed it up without gn-det
(``d2_gn_bf16_nhwc``: channels_last weights under bf16 autocast; on CUDA also ``d2_gn_amp``, detectron2's own
``AMPTrainer``); gn-det in fp32, with only ``MODEL.PRECISION bf16`` + ``MODEL.CHANNELS_LAST`` (``gn_switches``)
and with the CPU fast path as well (``gn_fast``); BN* in fp32. To time another commit, run the same command in a
worktree of it with ``PYTHONPATH=.`` (the variants run the gn_det the parent imported).

Every variant runs in a fresh subprocess, so its peak memory (RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own, on the same deterministic inputs: ``--images``
random images of exactly ``--size`` x ``--size`` px with box and mask ground truth, and the test resize set
to that size, so the network sees ``--size`` px in training and inference.

Each variant is built from random weights (``MODEL.WEIGHTS ""``). Three settings give every variant the work
it has with trained weights: the optimizer's LR is 0 (the SGD step costs the same, but weights that do not
move cannot diverge and change the number of proposals); the test score threshold is 0 (a random classifier
scores ~1/81 per class, under the default 0.05, which would skip the mask head); and FrozenBN statistics are
set to those of the benchmark batch (random BN* weights have identity statistics, their activations grow
~1000x through the ResNet, and the degenerate proposals leave inference almost nothing to do).

Times are wall-clock; the JSON also has each run's process CPU time, which is less sensitive to other
processes sharing the machine (``--threads 1`` makes it more so).
"""
import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from tabulate import tabulate

from gn_det.errors import InputError

D2_GN_CONFIG = "detectron2://Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"
GN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_gn.yaml"
SWITCHES = ["MODEL.PRECISION", "bf16", "MODEL.CHANNELS_LAST", "True"]

# name -> config, extra options, and for stock detectron2 models how the benchmark wraps them ("wrap"):
# "bf16_nhwc" converts the weights to channels_last and runs every step under bf16 autocast (what a user gets
# without gn-det), "amp" trains with detectron2's own AMPTrainer (SOLVER.AMP.ENABLED, fp16, CUDA only) and
# infers under fp16 autocast. A config starting with "detectron2://" is a detectron2 model-zoo file; others are
# relative to gn-det's configs/ directory.
VARIANTS = {
    "d2_gn_fp32": {"config": D2_GN_CONFIG, "options": []},
    "d2_gn_bf16_nhwc": {"config": D2_GN_CONFIG, "options": [], "wrap": "bf16_nhwc"},
    "d2_gn_amp": {"config": D2_GN_CONFIG, "options": ["SOLVER.AMP.ENABLED", "True"], "wrap": "amp", "cuda": True},
    # the bf16_nhwc peer with torch.compile (inductor) on its backbone, timed with --protocol export
    "d2_gn_bf16_nhwc_compile": {"config": D2_GN_CONFIG, "options": [], "wrap": "bf16_nhwc", "compile": True},
    "gn_fp32": {"config": GN_CONFIG, "options": []},
    "gn_switches": {"config": GN_CONFIG, "options": SWITCHES},
    "gn_fast": {"config": GN_CONFIG, "options": SWITCHES + ["MODEL.CPU_FAST_PATH", "True"]},
    "bnstar_fp32": {"config": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x_bnstar.yaml", "options": []},
    # Exported models (gn_det.deploy), inference only, timed with --protocol export. "export": (format, ONNX
    # runtime the file is for, backend that runs it, OpenVINO precision hint).
    "d2_gn_onnxruntime": {"config": D2_GN_CONFIG, "options": [], "export": ("onnx", "onnxruntime", "onnxruntime", "")},
    "d2_gn_openvino_f32": {"config": D2_GN_CONFIG, "options": [],
                           "export": ("onnx", "onnxruntime", "openvino", "f32")},
    "d2_gn_openvino": {"config": D2_GN_CONFIG, "options": [], "export": ("onnx", "onnxruntime", "openvino", "default")},
    "gn_onnxruntime": {"config": GN_CONFIG, "options": [], "export": ("onnx", "onnxruntime", "onnxruntime", "")},
    # gn-det's OpenVINO IR (--format openvino: the RoI coordinates kept in f32 under bf16)
    "gn_openvino_f32": {"config": GN_CONFIG, "options": [], "export": ("openvino", "openvino", "openvino", "f32")},
    "gn_openvino": {"config": GN_CONFIG, "options": [], "export": ("openvino", "openvino", "openvino", "default")},
    "gn_fast_torchscript": {"config": GN_CONFIG, "options": SWITCHES + ["MODEL.CPU_FAST_PATH", "True"],
                            "export": ("torchscript", None, "torchscript", "")},
    # int8 (gn_det.deploy.quantize), calibrated on the timed image: calibration sets ranges, not the work
    "gn_openvino_int8": {"config": GN_CONFIG, "options": [],
                         "export": ("openvino-int8", "openvino", "openvino", "default")},
    "gn_openvino_int8_f32": {"config": GN_CONFIG, "options": [],
                             "export": ("openvino-int8", "openvino", "openvino", "f32")},
}
# --protocol export: detectron2's export protocol (one image per call, model.inference(..., do_postprocess=False),
# no mask pasting), inference only; these variants by default, in this order.
EXPORT_PROTOCOL_VARIANTS = ["d2_gn_fp32", "d2_gn_bf16_nhwc", "d2_gn_bf16_nhwc_compile", "d2_gn_onnxruntime",
                            "d2_gn_openvino_f32", "d2_gn_openvino", "gn_fast", "gn_fast_torchscript",
                            "gn_onnxruntime", "gn_openvino_f32", "gn_openvino", "gn_openvino_int8"]
# The stock peer every variant is also compared with, when it runs.
PEER = "d2_gn_bf16_nhwc"
DEFAULT_CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "configs")


def at_least(minimum):
    """An argparse type: a whole number >= ``minimum`` (0 rounds or repeats would leave nothing to take a
    median of, and fail deep inside instead of naming the option)."""
    def parse(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not a whole number >= {minimum}")
        return value

    parse.__name__ = f"whole number >= {minimum}"  # argparse names the type when int() fails
    return parse


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", type=at_least(1), default=512, help="square image side in px, as the network sees it")
    parser.add_argument("--images", type=at_least(1), default=2,
                        help="images per training iteration and per inference call")
    parser.add_argument("--warmup", type=at_least(0), default=1, help="untimed iterations before timing, per phase")
    parser.add_argument("--repeats", type=at_least(1), default=3,
                        help="timed iterations per phase; the median is reported")
    parser.add_argument("--rounds", type=at_least(1), default=1,
                        help="run the whole sequence of variants this many times, each in fresh processes; the "
                             "median is taken over the timed iterations of every round")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="variants to run; ratios are to the first one and to d2_gn_bf16_nhwc. Default: all "
                             "but, on CPU, d2_gn_amp")
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY VALUE",
                        help="config overrides applied to every variant, e.g. MODEL.ROI_HEADS.NUM_CLASSES 3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per variant; 0: torch's default")
    parser.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR, help="gn-det's configs/ directory")
    parser.add_argument("--output", help="write the results (and the settings) to this JSON file")
    parser.add_argument("--protocol", choices=["train_infer", "export"], default="train_infer",
                        help="train_infer: a training step and an inference call on --images images (postprocessed); "
                             "export: detectron2's export protocol, inference only, one image per call before mask "
                             "pasting (eager and exported variants alike)")
    return parser


def check_device(device):
    """An InputError naming ``--device`` unless it is ``cpu`` or a CUDA device this machine has: each variant's
    process would otherwise fail on it, one after the other."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:  # torch's message for an unparsable device string
        raise InputError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device}: only cpu and cuda are benchmarked")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def chosen_variants(args):
    """The variants to run: ``--variants``, or the default set for the device."""
    if args.variants:
        return args.variants
    if args.protocol == "export":
        return list(EXPORT_PROTOCOL_VARIANTS)
    on_cuda = args.device.startswith("cuda")
    return [name for name, spec in VARIANTS.items()
            if (on_cuda or not spec.get("cuda")) and "export" not in spec and not spec.get("compile")]


def is_detectron2_config(name):
    """Whether variant ``name`` is stock detectron2 (a model-zoo config) rather than one of gn-det's."""
    return VARIANTS[name]["config"].startswith("detectron2://")


def variant_cfg(name, args):
    """The config of variant ``name`` at the benchmark's size and device."""
    from detectron2.model_zoo import get_config_file

    from gn_det.config import get_gn_cfg

    config, extra = VARIANTS[name]["config"], VARIANTS[name]["options"]
    if is_detectron2_config(name):
        path = get_config_file(config[len("detectron2://"):])
    else:
        path = os.path.join(args.config_dir, config)
    size = str(args.size)
    return get_gn_cfg(path, [
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device,
        "INPUT.MIN_SIZE_TRAIN", f"({size},)", "INPUT.MAX_SIZE_TRAIN", size,
        "INPUT.MIN_SIZE_TEST", size, "INPUT.MAX_SIZE_TEST", size,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        *extra, *args.config,
    ])


def peak_memory_mib(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def timed_calls(step, warmup, repeats, device):
    """Wall and process CPU times of ``repeats`` calls of ``step()``, after ``warmup`` untimed ones."""
    import torch

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    wall, cpu = [], []
    for _ in range(repeats):
        synchronize()
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return {"wall_s": wall, "cpu_s": cpu}


def with_medians(result, images):
    """``result`` with its medians added: train s/iter and inference s/image (a call runs ``images`` images),
    wall-clock and process CPU time, over every timed call in its ``train_times`` / ``infer_times``."""
    per_call = {"train": ("train_s_per_iter", "train_cpu_s_per_iter", 1),
                "infer": ("infer_s_per_image", "infer_cpu_s_per_image", images)}
    for phase, (wall_key, cpu_key, divisor) in per_call.items():
        if result.get(f"{phase}_times") is None:  # --protocol export: no training; one image per call
            result[wall_key] = result[cpu_key] = None
            continue
        divisor = 1 if result.get("protocol") == "export" else divisor
        result[wall_key] = statistics.median(result[f"{phase}_times"]["wall_s"]) / divisor
        result[cpu_key] = statistics.median(result[f"{phase}_times"]["cpu_s"]) / divisor
    return result


def calibrate_frozen_batchnorm(model, batch):
    """Set each FrozenBatchNorm2d's statistics to the per-channel mean/variance of its input on ``batch``, as
    ImageNet-trained BN* weights would have them (see the module docstring)."""
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    def use_input_statistics(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)))

    hooks = [m.register_forward_pre_hook(use_input_statistics) for m in model.modules()
             if isinstance(m, FrozenBatchNorm2d)]
    if not hooks:  # GN and BN models: nothing to calibrate, and no pass to count in their peak memory
        return
    with torch.no_grad():
        model.backbone(model.preprocess_image(batch).tensor)
    for hook in hooks:
        hook.remove()


def measure_variant(name, args):
    """Inference s/image, train s/iter and peak memory of one variant, in this process.

    Inference runs first, so the memory high-water mark read after it is inference's own; the one read after
    training covers both and is training's (the larger).
    """
    import contextlib
    import itertools

    import torch
    from detectron2.engine import AMPTrainer
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    import gn_det  # noqa: F401  (registers gn-det's models)
    from gn_det.analysis.random_inputs import random_detection_batch
    from gn_det.solver import build_gn_optimizer

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = variant_cfg(name, args)
    wrap = VARIANTS[name].get("wrap")
    torch.manual_seed(0)
    model = build_model(cfg)
    device = model.device
    if wrap == "amp" and device.type != "cuda":
        raise ValueError(f"variant {name} (detectron2's AMPTrainer, fp16) needs --device cuda")
    autocast = contextlib.nullcontext
    if wrap == "bf16_nhwc":
        model.to(memory_format=torch.channels_last)
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    elif wrap == "amp":
        autocast = functools.partial(torch.autocast, device.type, dtype=torch.float16)
    if VARIANTS[name].get("compile"):  # what a user adds without gn-det: compile the backbone (most of the work)
        model.backbone = torch.compile(model.backbone)
    batch = random_detection_batch(num_images=args.images, height=args.size, width=args.size,
                                   num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    test_batch = [{key: value for key, value in item.items() if key != "instances"} for item in batch]
    calibrate_frozen_batchnorm(model, test_batch)
    if device.type == "cuda":  # after the calibration pass (on CPU the RSS high-water mark cannot be reset)
        torch.cuda.reset_peak_memory_stats(device)

    model.eval()
    if args.protocol == "export":
        return measure_export_protocol(name, args, model, test_batch[0]["image"], autocast, device)

    def inference_step():
        with torch.no_grad(), autocast():
            model(test_batch)

    infer_times = timed_calls(inference_step, args.warmup, args.repeats, device)
    infer_peak = peak_memory_mib(device)

    model.train()
    # each project's own trainer's optimizer: detectron2's build_optimizer for stock, gn-det's for gn-det's
    optimizer = (build_optimizer if is_detectron2_config(name) else build_gn_optimizer)(cfg, model)
    for group in optimizer.param_groups:
        group["lr"] = 0.0

    def train_step():
        with autocast():
            losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    # "amp": detectron2's own step (autocast, gradient scaler, its metrics)
    step = AMPTrainer(model, itertools.repeat(batch), optimizer).run_step if wrap == "amp" else train_step

    with EventStorage():  # detectron2's heads log training statistics to it
        train_times = timed_calls(step, args.warmup, args.repeats, device)
    return with_medians({
        "config": VARIANTS[name]["config"],
        "options": VARIANTS[name]["options"] + list(args.config),
        "wrap": wrap,
        "gn_det": os.path.dirname(os.path.dirname(os.path.abspath(gn_det.__file__))),
        "threads": torch.get_num_threads(),
        "train_times": train_times,
        "infer_times": infer_times,
        "infer_peak_mib": infer_peak,
        "train_peak_mib": peak_memory_mib(device),
    }, args.images)


def measure_export_protocol(name, args, model, image, autocast, device):
    """Inference s/image of one variant under detectron2's export protocol: one image per call, the output
    before mask pasting (``model.inference(..., do_postprocess=False)`` for R-CNN models). An eager variant
    calls the model so; an exported one (``"export"`` in its spec) is exported by ``gn_det.deploy`` from the
    same model (same random weights) and the file run by its backend (``ExportedDetector.instances``)."""
    import tempfile

    import torch

    import gn_det
    from gn_det.deploy import export_model, load_exported
    from gn_det.deploy.export import export_inference

    export = VARIANTS[name].get("export")
    extra = {}
    if export:
        fmt, target, backend, precision = export
        with tempfile.TemporaryDirectory() as tmp:
            path = export_model(model, image, fmt, tmp, target or "onnxruntime")
            extra["file_mib"] = os.path.getsize(path) / 2**20
            exported = load_exported(path, backend, openvino_precision=precision or "default",
                                     threads=max(args.threads, 0))
        extra["openvino_precision"] = getattr(exported, "openvino_precision", None)
        del model

        def inference_step():
            exported.instances(image)
    else:
        inference = export_inference(model) or (lambda model, inputs: model(inputs))

        def inference_step():
            with torch.no_grad(), autocast():
                inference(model, [{"image": image}])

    infer_times = timed_calls(inference_step, args.warmup, args.repeats, device)
    return with_medians({
        "config": VARIANTS[name]["config"], "options": VARIANTS[name]["options"] + list(args.config),
        "protocol": "export", "export": export, **extra,
        "gn_det": os.path.dirname(os.path.dirname(os.path.abspath(gn_det.__file__))),
        "threads": torch.get_num_threads(), "train_times": None, "infer_times": infer_times,
        "infer_peak_mib": peak_memory_mib(device), "train_peak_mib": None,
    }, 1)


# The child's code: the working directory (sys.path[0] under -c) leaves the path, so a gn_det/ there cannot shadow
# the variant's.
RUN_FILE = ("import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")


def measure_in_subprocess(name, args, argv):
    """``measure_variant`` in a fresh Python process, so peak memory is the variant's alone.

    The process runs this file's measurement code with this checkout's ``gn_det`` first on its path.
    """
    import gn_det

    root = os.path.dirname(os.path.dirname(os.path.abspath(gn_det.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        proc = subprocess.run(
            # run as a file, not as ``-m gn_det...``, so the gn_det on PYTHONPATH is the one imported, and through
            # runpy, so this file's directory (gn_det/analysis) stays off the module path
            [sys.executable, "-c", RUN_FILE, os.path.abspath(__file__), "--measure", name, result_path, *argv],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"variant {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(result_path) as f:
            return json.load(f)


def merge_rounds(rounds, images):
    """One variant's result from its per-round results: timed iterations pooled, medians over the pool, and
    peak memory the highest of any round."""
    merged = dict(rounds[0])
    for phase in ("train", "infer"):
        if rounds[0][f"{phase}_times"] is None:
            continue
        merged[f"{phase}_times"] = {clock: [t for result in rounds for t in result[f"{phase}_times"][clock]]
                                    for clock in ("wall_s", "cpu_s")}
        merged[f"{phase}_peak_mib"] = max(result[f"{phase}_peak_mib"] for result in rounds)
    return with_medians(merged, images)


def run_benchmark(args, argv, on_result=None):
    """Measure every variant of ``args`` (parsed from ``argv``), each in its own process, ``args.rounds`` times.

    Rounds run the whole sequence of variants again, so a slow spell of a shared or virtual machine falls on
    every variant rather than on one. ``on_result(name, result)`` is called as each variant finishes a round.
    Returns the report: settings, baseline (the first variant) and per-variant results over all rounds.
    """
    import torch

    variants = chosen_variants(args)
    per_round = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            per_round[name].append(measure_in_subprocess(name, args, argv))
            if on_result is not None:
                on_result(name, per_round[name][-1])
    results = {name: merge_rounds(rounds, args.images) for name, rounds in per_round.items()}
    return {
        "settings": {"argv": list(argv), "size": args.size, "images": args.images, "warmup": args.warmup,
                     "repeats": args.repeats, "rounds": args.rounds, "device": args.device, "config": args.config,
                     "torch": torch.__version__, "cpus": os.cpu_count(),
                     "platform": platform.platform(),
                     "protocol": args.protocol},
        "baseline": variants[0],
        "variants": results,
    }


def markdown_table(report, clock="wall"):
    """The results as a Markdown table. "x" columns are throughput relative to the baseline (the first variant),
    "x peer" columns relative to ``d2_gn_bf16_nhwc`` when it ran; "peak vs base" is peak memory relative to the
    baseline's.

    ``clock`` "wall" reports wall-clock times, "cpu" the process CPU times of the same runs.
    """
    if report["settings"].get("protocol") == "export":
        return export_protocol_table(report, clock)
    train_key, infer_key = {"wall": ("train_s_per_iter", "infer_s_per_image"),
                            "cpu": ("train_cpu_s_per_iter", "infer_cpu_s_per_image")}[clock]
    unit = "s" if clock == "wall" else "cpu-s"
    base = report["variants"][report["baseline"]]
    peer = report["variants"].get(PEER)
    rows = []
    for name, r in report["variants"].items():
        row = [name, r[train_key], base[train_key] / r[train_key]]
        row += [peer[train_key] / r[train_key]] if peer else []
        row += [r[infer_key], base[infer_key] / r[infer_key]]
        row += [peer[infer_key] / r[infer_key]] if peer else []
        row += [r["train_peak_mib"], r["train_peak_mib"] / base["train_peak_mib"], r["infer_peak_mib"]]
        rows.append(row)
    headers = ["variant", f"train {unit}/iter", "train x", *(["train x peer"] if peer else []),
               f"infer {unit}/img", "infer x", *(["infer x peer"] if peer else []),
               "peak MiB (train)", "peak vs base", "peak MiB (infer)"]
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f")


FILE_KINDS = {"openvino": "OpenVINO IR", "openvino-int8": "int8 OpenVINO IR"}  # the --format names, as tables say them


def export_protocol_table(report, clock="wall"):
    """The ``--protocol export`` results as a Markdown table: inference s/image, "x base" relative to the first
    variant, "x best d2" relative to the fastest stock detectron2 variant (eager or exported) that ran."""
    key = {"wall": "infer_s_per_image", "cpu": "infer_cpu_s_per_image"}[clock]
    unit = "s" if clock == "wall" else "cpu-s"
    variants = report["variants"]
    base = variants[report["baseline"]][key]
    stock = [r[key] for name, r in variants.items() if is_detectron2_config(name)]
    best_stock = min(stock) if stock else None
    rows = []
    for name, r in variants.items():
        fmt, backend = (r["export"][0], r["export"][2]) if r.get("export") else (None, None)
        what = f"{FILE_KINDS.get(fmt, fmt)} in {backend}" if fmt else "eager"
        if VARIANTS.get(name, {}).get("compile"):
            what += ", backbone under torch.compile"
        if r.get("openvino_precision"):
            what += f" ({r['openvino_precision']})"
        rows.append([name, what, r[key], base / r[key], best_stock / r[key] if best_stock else None,
                     r["infer_peak_mib"]])
    return tabulate(rows, headers=["variant", "runs as", f"infer {unit}/img", "x base", "x best d2",
                                   "peak MiB (infer)"], tablefmt="pipe", floatfmt=".3f")


if __name__ == "__main__":
    # Child process of measure_in_subprocess: --measure NAME RESULT_PATH, then the tool's own arguments.
    assert sys.argv[1] == "--measure", sys.argv
    variant, result_file = sys.argv[2], sys.argv[3]
    measured = measure_variant(variant, build_parser().parse_args(sys.argv[4:]))
    with open(result_file, "w") as out:
        json.dump(measured, out)
