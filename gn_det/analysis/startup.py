"""Start-up time at COCO scale: stock detectron2 against gn-det's train_net (tools/startup_benchmark.py).

:func:`generate_coco_scale` writes a COCO-format instances file the size of ``coco_2017_train`` (118,287 images,
860,001 annotations with small polygon segmentations, 80 categories) whose image files are hard links to one
small JPEG (to byte-identical copies of it, 50,000 links each: ext4 allows 65,000 links to a file): the JSON
costs what COCO's costs to parse and check, and the images cost three inodes.

:func:`run_startup_benchmark` times, for 1 and 2 processes (detectron2's ``launch``; gloo on CPU), from the
moment a fresh process is started to the end of the first training iteration:

* ``stock``: detectron2 as its own tools/train_net.py runs it: ``register_coco_instances``, ``default_setup``,
  ``DefaultTrainer(cfg).resume_or_load()``, ``train()``;
* ``gn``: gn-det's tools/train_net.py with ``--dataset NAME=JSON,IMAGE_DIR`` (every up-front check included),
  in its first start after the JSON was written (``gn_first``: an empty gn-det cache) and in a later start
  (``gn_again``: the cache the first start left).

Both sides train the same model with the same settings (:data:`CONFIG`, :data:`TINY_OPTS`: stock detectron2's
GN Mask R-CNN config at R-18, 64 px inputs, one iteration, no data-loader workers, no evaluation), so only the
start-up differs. The end of the first iteration is taken by a first hook of a subclass of each side's trainer
(:func:`timed`); every process of a run writes its time, and the run's time is the slowest process's.

This module is experiment code: nothing in gn-det's plugin imports it.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from gn_det.fileio import atomic_write, write_json_atomically

COCO_TRAIN_IMAGES = 118287
COCO_TRAIN_ANNOTATIONS = 860001
COCO_CATEGORIES = 80
IMAGE_SIZE = 64
POLYGON_POINTS = 8
LINKS_PER_FILE = 50000

CONFIG = "Misc/mask_rcnn_R_50_FPN_3x_gn.yaml"  # detectron2's model zoo; at R-18 below
TINY_OPTS = [
    "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.ROI_HEADS.NUM_CLASSES", str(COCO_CATEGORIES), "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "INPUT.MIN_SIZE_TRAIN", f"({IMAGE_SIZE},)", "INPUT.MAX_SIZE_TRAIN", str(IMAGE_SIZE),
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.CHECKPOINT_PERIOD", "1000000", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
    "TEST.EVAL_PERIOD", "0",
]
DATASET_NAME = "startup_coco"
SIDES = ("stock", "gn_first", "gn_again")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Set by the benchmark for the measured processes: when the process was started (time.time()), and the folder
# each of its processes writes ``rank<N>.json`` into at the end of its first iteration.
T0_ENV = "GN_DET_STARTUP_T0"
RECORD_ENV = "GN_DET_STARTUP_RECORD"


def generate_coco_scale(root, num_images=COCO_TRAIN_IMAGES, num_annotations=COCO_TRAIN_ANNOTATIONS,
                        num_categories=COCO_CATEGORIES, image_size=IMAGE_SIZE, seed=0):
    """Write ``root/instances.json`` and ``root/images/`` (every image a hard link to ``root/one.jpg`` or a copy) unless
    they are there; returns ``(json_file, image_dir)``.

    Annotations are spread evenly over the images (each gets ``num_annotations // num_images`` or one more),
    each a random box with an ``POLYGON_POINTS``-point polygon inside it. The JSON is streamed to a temporary
    file and renamed into place last (:func:`~gn_det.fileio.atomic_write`), so an interrupted generation is
    redone.
    """
    from PIL import Image

    root = os.path.abspath(root)
    json_file, image_dir = os.path.join(root, "instances.json"), os.path.join(root, "images")
    if os.path.isfile(json_file):
        return json_file, image_dir
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    one = os.path.join(root, "one.jpg")
    Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)).save(one, quality=90)
    file_names = [f"{i:012d}.jpg" for i in range(1, num_images + 1)]
    for i, name in enumerate(file_names):
        # ext4 allows 65,000 links to a file: every LINKS_PER_FILE images share a byte-identical copy of one.jpg
        jpeg = one if i < LINKS_PER_FILE else os.path.join(root, f"one_{i // LINKS_PER_FILE}.jpg")
        if not os.path.exists(jpeg):
            shutil.copyfile(one, jpeg)
        path = os.path.join(image_dir, name)
        if not os.path.exists(path):
            os.link(jpeg, path)

    per_image = np.full(num_images, num_annotations // num_images)
    per_image[rng.permutation(num_images)[: num_annotations % num_images]] += 1
    image_ids = np.repeat(np.arange(1, num_images + 1), per_image)
    category_ids = rng.integers(1, num_categories + 1, num_annotations)
    xy = rng.uniform(0, image_size * 0.7, (num_annotations, 2))
    wh = rng.uniform(4, image_size * 0.3, (num_annotations, 2))
    # a star-shaped polygon inside each box: POLYGON_POINTS points on an ellipse with random radii
    angles = np.linspace(0, 2 * np.pi, POLYGON_POINTS, endpoint=False)
    radii = rng.uniform(0.5, 1.0, (num_annotations, POLYGON_POINTS))
    centre, half = xy + wh / 2, wh / 2
    px = np.round(centre[:, :1] + half[:, :1] * radii * np.cos(angles), 1)
    py = np.round(centre[:, 1:] + half[:, 1:] * radii * np.sin(angles), 1)

    with atomic_write(json_file) as f:
        f.write('{"info": {"description": "generated COCO-scale start-up benchmark set"}, "licenses": [], ')
        f.write('"images": ')
        f.write(json.dumps([{"id": i + 1, "file_name": name, "width": image_size, "height": image_size}
                            for i, name in enumerate(file_names)]))
        f.write(', "annotations": [')
        chunk = 50000
        for start in range(0, num_annotations, chunk):
            stop = min(start + chunk, num_annotations)
            entries = []
            for k in range(start, stop):
                polygon = np.empty(2 * POLYGON_POINTS)
                polygon[0::2], polygon[1::2] = px[k], py[k]
                x, y, w, h = (round(float(v), 1) for v in (xy[k, 0], xy[k, 1], wh[k, 0], wh[k, 1]))
                entries.append(json.dumps({
                    "id": k + 1, "image_id": int(image_ids[k]), "category_id": int(category_ids[k]),
                    "bbox": [x, y, w, h], "area": round(w * h * 0.6, 1), "iscrowd": 0,
                    "segmentation": [polygon.tolist()],
                }))
            f.write(("" if start == 0 else ", ") + ", ".join(entries))
        f.write('], "categories": ')
        f.write(json.dumps([{"id": c, "name": f"class_{c}", "supercategory": "thing"}
                            for c in range(1, num_categories + 1)]))
        f.write("}")
    return json_file, image_dir


def dataset_size(json_file, image_dir):
    """Images, annotations and JSON megabytes of a generated set (counted without parsing the JSON)."""
    with open(json_file, "rb") as f:
        data = f.read()
    return {"images": len(os.listdir(image_dir)), "annotations": data.count(b'"iscrowd"'),
            "json_mb": round(len(data) / 1e6, 1)}


# ---- the measured processes ----

def record_first_iteration(trainer):
    """At the end of the first iteration: the seconds since ``$GN_DET_STARTUP_T0`` and the CPU seconds (user +
    system) of this process, into ``$GN_DET_STARTUP_RECORD/rank<N>.json``."""
    from detectron2.utils import comm

    if trainer.iter != trainer.start_iter:
        return
    seconds = time.time() - float(os.environ[T0_ENV])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rank = comm.get_rank()
    with open(os.path.join(os.environ[RECORD_ENV], f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime}, f)


def timed(trainer_class):
    """``trainer_class`` with :func:`record_first_iteration` as its first hook."""
    from detectron2.engine import hooks

    class Timed(trainer_class):
        def build_hooks(self):
            return [hooks.CallbackHook(after_step=record_first_iteration)] + super().build_hooks()

    Timed.__name__ = Timed.__qualname__ = f"Timed{trainer_class.__name__}"
    return Timed


def stock_main(args):
    """detectron2's tools/train_net.py, with the dataset registered by ``register_coco_instances``: in every
    process of ``launch``."""
    from detectron2.config import get_cfg
    from detectron2.data.datasets import register_coco_instances
    from detectron2.engine import DefaultTrainer, default_setup
    from detectron2.utils import comm

    from gn_det.engine.trainer import AnyDeviceTrainer

    name, paths = args.dataset[0].split("=")
    json_file, image_dir = paths.split(",")
    register_coco_instances(name, {}, json_file, image_dir)
    cfg = get_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # Stock DefaultTrainer cannot wrap a CPU model in DDP (create_ddp_model passes device_ids): with several CPU
    # processes the stock side runs AnyDeviceTrainer, DefaultTrainer but for that one argument.
    several_cpu_processes = comm.get_world_size() > 1 and cfg.MODEL.DEVICE == "cpu"
    trainer = timed(AnyDeviceTrainer if several_cpu_processes else DefaultTrainer)(cfg)
    trainer.resume_or_load(resume=False)
    return trainer.train()


def gn_main(args):
    """gn-det's tools/train_net.py body with the first-iteration record: in every process of ``launch``."""
    from gn_det.engine import GNTrainer, train_or_evaluate

    return train_or_evaluate(args, make_trainer=timed(GNTrainer))


def child_main(argv):
    """One measured run: ``stock ARGS`` or ``gn ARGS`` (train_net's arguments)."""
    side, argv = argv[0], argv[1:]
    if side == "stock":  # detectron2's own parser and launch
        from detectron2.engine import default_argument_parser, launch

        parser = default_argument_parser()
        parser.add_argument("--dataset", action="append", default=[])
        args = parser.parse_args(argv)
        launch(stock_main, args.num_gpus, num_machines=1, machine_rank=0, dist_url=args.dist_url, args=(args,))
    else:  # gn-det's, as tools/train_net.py
        from gn_det.engine import argument_parser, launch

        launch(gn_main, argument_parser().parse_args(argv))


# ---- the benchmark ----

def run_once(side, processes, json_file, image_dir, workdir, cache_dir, config_file):
    """``(seconds, cpu_seconds)``: from starting a fresh process to the end of the first iteration in the slowest
    process, and the CPU time the run's training processes used until then, summed (with 2 processes, without
    the launching process's own, which is the same on both sides: imports and argument parsing)."""
    record = tempfile.mkdtemp(dir=workdir, prefix=f"{side}_{processes}p_")
    argv = ["--config-file", config_file, "--num-gpus", str(processes),
            "--dataset", f"{DATASET_NAME}={json_file},{image_dir}",
            *TINY_OPTS, "DATASETS.TRAIN", f"('{DATASET_NAME}',)", "OUTPUT_DIR", os.path.join(record, "output")]
    env = dict(os.environ, GN_DET_CACHE=cache_dir, **{RECORD_ENV: record})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "gn_det.analysis.startup", "stock" if side == "stock" else "gn", *argv]
    env[T0_ENV] = repr(time.time())
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} with {processes} process(es) failed:\n{proc.stderr[-4000:]}")
    ranks = []
    for rank in range(processes):
        with open(os.path.join(record, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    with open(os.path.join(record, "log.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    return max(r["seconds"] for r in ranks), sum(r["cpu_seconds"] for r in ranks)


def load_average():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def run_startup_benchmark(root, processes=(1, 2), repeats=2, sides=SIDES, on_result=print, generate_kwargs=None):
    """Generate (or reuse) the set under ``root`` (``generate_kwargs`` to :func:`generate_coco_scale`) and time
    every side with every process count ``repeats`` times, alternating the sides within each round; each
    result goes to ``on_result`` as it comes. Returns the report dict."""
    from detectron2 import model_zoo

    config_file = model_zoo.get_config_file(CONFIG)
    json_file, image_dir = generate_coco_scale(root, **(generate_kwargs or {}))
    with open(json_file, "rb") as f:  # the page cache holds the JSON for every side alike
        while f.read(1 << 24):
            pass
    workdir = os.path.join(root, "runs")
    os.makedirs(workdir, exist_ok=True)
    report = {"dataset": dataset_size(json_file, image_dir), "config": CONFIG, "options": TINY_OPTS,
              "cpus": os.cpu_count(), "runs": []}
    for repeat in range(repeats):
        for n in processes:
            # one cache per (round, process count): gn_first starts with it empty, gn_again with what gn_first left
            cache_dir = tempfile.mkdtemp(dir=workdir, prefix="cache_")
            for side in sides:
                load_before = load_average()
                seconds, cpu_seconds = run_once(side, n, json_file, image_dir, workdir, cache_dir, config_file)
                result = {"side": side, "processes": n, "round": repeat + 1, "seconds": round(seconds, 2),
                          "cpu_seconds": round(cpu_seconds, 2), "load_before": load_before,
                          "load_after": load_average()}
                report["runs"].append(result)
                if on_result is not None:
                    on_result(result)
    return report


def summary_rows(report, clock="seconds"):
    """Per process count: every run's ``clock`` ("seconds" or "cpu_seconds") per side, in run order, their
    median and its ratio to stock's median."""
    rows = []
    for n in sorted({r["processes"] for r in report["runs"]}):
        runs = {side: [r[clock] for r in report["runs"] if r["processes"] == n and r["side"] == side]
                for side in SIDES}
        stock = statistics.median(runs["stock"]) if runs["stock"] else None
        row = [n]
        for side in SIDES:
            if runs[side]:
                median = statistics.median(runs[side])
                ratio = f" ({median / stock:.2f}x)" if stock and side != "stock" else ""
                row.append(" / ".join(f"{s:.1f}" for s in runs[side]) + f"; median {median:.1f}{ratio}")
            else:
                row.append("-")
        rows.append(row)
    return rows


def markdown_table(report, clock="seconds"):
    from tabulate import tabulate

    unit = "s" if clock == "seconds" else "CPU s"
    headers = ["processes", f"stock detectron2 ({unit})", f"gn-det, first start ({unit})",
               f"gn-det, later start ({unit})"]
    return tabulate(summary_rows(report, clock), headers=headers, tablefmt="github")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="folder for the generated set and the runs (outside the repo)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--generate-only", action="store_true", help="write the set and stop")
    parser.add_argument("--output", help="write the report as JSON here")
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' folders (logs) under ROOT/runs")
    return parser


def main(argv):
    args = build_parser().parse_args(argv)
    if args.generate_only:
        json_file, image_dir = generate_coco_scale(args.root)
        print(json.dumps(dataset_size(json_file, image_dir)))
        return None
    print(f"load average before: {load_average()}", flush=True)
    report = run_startup_benchmark(args.root, args.processes, args.repeats, args.sides,
                                   on_result=lambda r: print(json.dumps(r), flush=True))
    report["load_average_after"] = load_average()
    print(json.dumps(report["dataset"]))
    print(markdown_table(report))
    print(markdown_table(report, clock="cpu_seconds"))
    if args.output:
        write_json_atomically(args.output, report)
    if not args.keep_runs:
        shutil.rmtree(os.path.join(args.root, "runs"), ignore_errors=True)
    return report


if __name__ == "__main__":
    child_main(sys.argv[1:])
