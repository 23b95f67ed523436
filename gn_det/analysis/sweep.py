"""Ablation sweeps: a grid of training runs over norm, group setting and images per batch, and its tables.

Each cell of the grid is one ordinary training run (``tools/train_net.py`` in a subprocess, so memory and
detectron2's registries start clean every time) in its own folder named after the cell, e.g.
``OUT/norm=GN,G=32,ims=4``. Cells differ from the base config only by the options :meth:`Cell.opts` returns,
and every cell trains with ``SOLVER.LINEAR_LR_SCALING`` so that all batch sizes see the same number of images at
the same LR per image (the paper's Sec. 4 recipe for Figure 1 / Table 2). The results read back as paper-style
tables: box/mask AP by norm and images per batch (Table 2), and by group setting (Table 3).
"""
import csv
import dataclasses
import os
import subprocess
import sys
import time
from typing import List, Optional

from detectron2.modeling import build_model
from tabulate import tabulate

from ..config import NORM_SITE_KEYS, get_gn_cfg, select
from ..errors import InputError
from ..fileio import atomic_write, read_json, save_figure, write_json_atomically
from .feature_stats_hook import check_hook_settings, resolve_feature_layer
from .runs import Run

RESULTS_FILE = "results.json"  # written by GNTrainer.test after each evaluation
FINAL_CHECKPOINT = "model_final.pth"
CELL_FILE = "sweep_cell.json"  # the options a cell was started with, to notice a re-run with other options
CONSOLE_FILE = "console.txt"  # the training subprocess's stdout and stderr
TABLE_METRICS = ("bbox/AP", "segm/AP")
CSV_METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")

# The norm at each site (MODEL.RESNETS/FPN/ROI_BOX_HEAD/ROI_MASK_HEAD.NORM) and MODEL.GN.WS of every norm
# setting a sweep knows, in the order tables list them. BN* is configs/shapes/mask_rcnn_R_18_FPN_bnstar.yaml:
# frozen BN in the backbone and no norm elsewhere. SyncBN is resolved per machine by :func:`sync_bn_name`.
SITE_KEYS = tuple(key for key in NORM_SITE_KEYS if key not in ("MODEL.RPN.NORM", "MODEL.RETINANET.NORM"))
NORM_SETTINGS = {
    "GN": (("GN",) * 4, False),
    "GN+WS": (("GN",) * 4, True),
    "BN": (("BN",) * 4, False),
    "BN*": (("FrozenBN", "", "", ""), False),
    "SyncBN": (("SyncBN",) * 4, False),
}
# Norms whose cells take a group setting (MODEL.GN.NUM_GROUPS or DIM_PER_GROUP).
GROUPED_NORMS = ("GN", "GN+WS")
# Folder-safe spelling of each norm in cell names ("*" is a shell wildcard); also accepted on the command line.
NORM_SLUGS = {"GN": "GN", "GN+WS": "GN+WS", "BN": "BN", "BN*": "BNstar", "SyncBN": "SyncBN"}
# SyncBN only synchronises across processes, so its cells train in this many processes (GPUs, or CPU
# processes with gloo), each with IMS_PER_BATCH / SYNC_BN_PROCESSES images.
SYNC_BN_PROCESSES = 2


def norm_label(name):
    """The norm label ("BN*") of a label or slug ("BNstar"), in any case; InputError naming the choices otherwise."""
    by_slug = {slug.lower(): label for label, slug in NORM_SLUGS.items()}
    by_label = {label.lower(): label for label in NORM_SLUGS}
    label = by_label.get(name.lower()) or by_slug.get(name.lower())
    if label is None:
        raise InputError(f"norm {name!r} is not one of {', '.join(NORM_SLUGS)} (BN* also as BNstar, any case)")
    return label


def sync_bn_name(cuda_devices):
    """The norm name SyncBN cells use: torch's SyncBatchNorm runs on GPUs only, so on CPU detectron2's
    NaiveSyncBatchNorm (an all-reduce of the batch statistics, which gloo can do) stands in for it."""
    return "SyncBN" if cuda_devices >= SYNC_BN_PROCESSES else "naiveSyncBN"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of a sweep: a norm, its group setting (grouped norms only) and images per batch."""

    norm: str  # a key of NORM_SETTINGS
    ims: int  # SOLVER.IMS_PER_BATCH, summed over processes
    num_groups: Optional[int] = None  # G (MODEL.GN.NUM_GROUPS)
    dim_per_group: Optional[int] = None  # C/G (MODEL.GN.DIM_PER_GROUP)

    @property
    def group_label(self):
        """ "G=32", "C/G=16", or "" for norms without groups."""
        if self.num_groups is not None:
            return f"G={self.num_groups}"
        if self.dim_per_group is not None:
            return f"C/G={self.dim_per_group}"
        return ""

    @property
    def row_label(self):
        """The norm with its group setting: a row of the batch-size table, a line of the plot."""
        return f"{self.norm} ({self.group_label})" if self.group_label else self.norm

    @property
    def name(self):
        """The cell's folder name, e.g. ``norm=GN,G=32,ims=4`` or ``norm=BNstar,ims=2``."""
        parts = [f"norm={NORM_SLUGS[self.norm]}"]
        if self.num_groups is not None:
            parts.append(f"G={self.num_groups}")
        if self.dim_per_group is not None:
            parts.append(f"C_per_G={self.dim_per_group}")
        parts.append(f"ims={self.ims}")
        return ",".join(parts)

    @property
    def processes(self):
        return SYNC_BN_PROCESSES if self.norm == "SyncBN" else 1

    def unsupported_reason(self):
        """Why this cell cannot run, or None."""
        if self.ims % self.processes:
            return (f"SyncBN trains in {self.processes} processes that must each get the same number of images "
                    f"(at least one); {self.ims} image(s) per batch cannot be split {self.processes} ways")
        return None

    def opts(self, cuda_devices=0):
        """The config options (KEY, VALUE, ...) that make the base config this cell."""
        sites, ws = NORM_SETTINGS[self.norm]
        if self.norm == "SyncBN":
            sites = (sync_bn_name(cuda_devices),) * len(SITE_KEYS)
        opts = []
        for key, value in zip(SITE_KEYS, sites):
            opts += [key, value]
        opts += ["MODEL.GN.WS", str(ws)]
        if self.num_groups is not None:
            opts += ["MODEL.GN.NUM_GROUPS", str(self.num_groups), "MODEL.GN.DIM_PER_GROUP", "-1"]
        if self.dim_per_group is not None:
            opts += ["MODEL.GN.DIM_PER_GROUP", str(self.dim_per_group)]
        opts += ["SOLVER.IMS_PER_BATCH", str(self.ims), "SOLVER.LINEAR_LR_SCALING", "True"]
        return opts


def expand_grid(norms, ims, groups=None, dims_per_group=None):
    """The cells of a sweep, ordered norm, group setting, images per batch.

    Grouped norms (GN, GN+WS) get one cell per G of ``groups`` and per C/G of ``dims_per_group`` (G=32, the
    paper's default, when neither is given); the others one cell per batch size. Repeated values count once.
    """
    norms = list(dict.fromkeys(norm_label(n) for n in norms))
    ims = list(dict.fromkeys(ims))
    groups, dims_per_group = list(dict.fromkeys(groups or ())), list(dict.fromkeys(dims_per_group or ()))
    for value, what in [(n, "images per batch") for n in ims] + [(g, "G") for g in groups] + [
            (d, "C/G") for d in dims_per_group]:
        if value < 1:
            raise InputError(f"{what} must be >= 1, got {value}")
    if not groups and not dims_per_group:
        groups = [32]
    group_settings = [{"num_groups": g} for g in groups] + [{"dim_per_group": d} for d in dims_per_group]
    cells = []
    for norm in norms:
        for setting in group_settings if norm in GROUPED_NORMS else [{}]:
            cells.extend(Cell(norm, n, **setting) for n in ims)
    return cells


def run_finished(run_dir):
    """Whether a training run in ``run_dir`` ran to the end: its results.json is from the final evaluation,
    which comes after model_final.pth is saved (an earlier periodic evaluation also writes results.json)."""
    results, final = os.path.join(run_dir, RESULTS_FILE), os.path.join(run_dir, FINAL_CHECKPOINT)
    return (os.path.isfile(results) and os.path.isfile(final)
            and os.stat(results).st_mtime_ns >= os.stat(final).st_mtime_ns)


def has_checkpoint(run_dir):
    """Whether an unfinished run left a checkpoint that ``--resume`` continues from."""
    return os.path.isfile(os.path.join(run_dir, "last_checkpoint"))


@dataclasses.dataclass
class CellReport:
    """What happened to one cell: ``status`` is "finished" (already done, skipped), "other options" (its folder
    holds a finished or interrupted run started with other options, left as it is), "unsupported", "started",
    "trained" or "failed"; ``detail`` says why or where, ``seconds`` how long it trained."""

    cell: Cell
    run_dir: str
    status: str
    detail: str = ""
    seconds: float = 0.0


def cell_command(cell, run_dir, config_file, train_command, opts=(), cuda_devices=0):
    """The command line that trains ``cell`` into ``run_dir``: ``train_command`` (e.g. ``[python,
    tools/train_net.py]``) with ``--resume``, so an interrupted cell continues from its last checkpoint."""
    return [*train_command, "--config-file", config_file, "--num-gpus", str(cell.processes), "--resume",
            *cell.opts(cuda_devices), *opts, "OUTPUT_DIR", run_dir]


def cell_keys():
    """Every config key a cell sets (:meth:`Cell.opts`): the norm sites, MODEL.GN.*, images per batch, LR scaling."""
    return {key for cell in (Cell("GN", 1, num_groups=1), Cell("GN", 1, dim_per_group=1)) for key in cell.opts()[::2]}


def check_trailing_options(opts):
    """InputError for a KEY of ``opts`` that a cell sets itself (or a parent node of one, e.g. ``MODEL.GN``):
    coming after the cell's options it would win, and the cell would train with it under its own name."""
    keys = cell_keys()
    for key in list(opts)[::2]:
        if any(k == key or k.startswith(f"{key}.") for k in keys):
            raise InputError(f"command line: {key} is set by each cell of the sweep (--norms, --groups, "
                             "--dim-per-group, --ims); remove it from the options for every cell")


def check_sweep_options(cells, config_file, opts=(), cuda_devices=0):
    """Reject ``opts`` that override a cell's own settings (:func:`check_trailing_options`), then load the config
    of every supported cell (``config_file``, the cell's options, then ``opts``), so a bad KEY VALUE (unknown key,
    wrong type, invalid setting) is an InputError before any cell is trained, as is a norm at a site the cells do
    not set (``MODEL.RPN.NORM``, ``MODEL.RETINANET.NORM``)."""
    check_trailing_options(opts)
    for cell in cells:
        if not cell.unsupported_reason():
            cfg = get_gn_cfg(config_file, [*cell.opts(cuda_devices), *opts])
            for key in (key for key in NORM_SITE_KEYS if key not in SITE_KEYS):
                norm = select(cfg, key)
                if norm:  # the same in every cell: a BN* cell would not be BN*
                    source = "command line" if key in list(opts)[::2] else config_file
                    raise InputError(f"{source}: {key}={norm!r}: a sweep sets the norm of the "
                                     f"backbone, FPN, box and mask heads in each cell and would keep this one in "
                                     f"every cell; set {key} '' for the sweep")


def check_feature_stats_options(cells, config_file, layer, period, opts=(), cuda_devices=0):
    """``--feature-period`` and ``--feature-layer`` (None: the default layer, which every ResNet has) as
    tools/feature_stats.py would check them in each cell, here before any cell is trained: a layer is looked up
    in every supported cell's model (a norm module exists only in the cells that have that norm)."""
    check_hook_settings(None, period)
    if layer is None:
        return
    for cell in cells:
        if not cell.unsupported_reason():
            model = build_model(get_gn_cfg(config_file, [*cell.opts(cuda_devices), *opts, "MODEL.DEVICE", "cpu"]))
            try:
                resolve_feature_layer(model, layer)
            except InputError as err:
                raise InputError(f"--feature-layer in cell {cell.name}: {err}") from None


def run_sweep(cells, out_dir, config_file, train_command, opts=(), cuda_devices=0):
    """Train every cell not finished yet, one subprocess at a time; yields a :class:`CellReport` per event
    (a "started" report before each training, so callers can show progress).

    ``opts`` (KEY VALUE ...) go to every cell after the cell's own options. A failed cell does not stop the
    sweep; its console output is in ``run_dir/console.txt``. A cell whose folder holds a run started with other
    options, finished or interrupted, is reported as "other options" and left as it is.
    """
    opts = list(opts)
    check_trailing_options(opts)
    for cell in cells:
        run_dir = os.path.join(out_dir, cell.name)
        reason = cell.unsupported_reason()
        if reason:
            yield CellReport(cell, run_dir, "unsupported", reason)
            continue
        command = cell_command(cell, run_dir, config_file, train_command, opts, cuda_devices)
        other = other_options_state(run_dir, command)
        if other:
            # resuming would continue one setting's checkpoint under another's and overwrite its record
            yield CellReport(cell, run_dir, "other options", other_options_detail(other, run_dir))
            continue
        if run_finished(run_dir):
            yield CellReport(cell, run_dir, "finished")
            continue
        record_options(run_dir, command, cell=cell.name)
        resuming = has_checkpoint(run_dir)
        yield CellReport(cell, run_dir, "started", "resuming from its last checkpoint" if resuming else "")
        error, seconds = train_in_subprocess(command, run_dir)
        yield CellReport(cell, run_dir, "failed" if error else "trained", error or "", seconds)


def train_in_subprocess(command, run_dir):
    """Run a training ``command`` whose OUTPUT_DIR is ``run_dir``, its console output appended to
    ``run_dir/console.txt``. Returns (None, seconds) when the run finished, else (its last output line, seconds)."""
    os.makedirs(run_dir, exist_ok=True)
    console_path = os.path.join(run_dir, CONSOLE_FILE)
    start = time.perf_counter()
    with open(console_path, "a") as console:
        returncode = subprocess.run(command, stdout=console, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if returncode == 0 and run_finished(run_dir):
        return None, seconds
    return last_line(console_path), seconds


def command_opts(command):
    """The part of a cell's command that decides its result: everything after the launcher and script."""
    return command[command.index("--config-file"):]


def record_options(run_dir, command, **extra):
    """Write ``run_dir``'s :data:`CELL_FILE`: the options ``command`` starts the run with (what
    :func:`other_options_state` compares a later command against), the command, and ``extra`` fields."""
    write_json_atomically(os.path.join(run_dir, CELL_FILE),
                          {**extra, "opts": command_opts(command), "command": command})


def comparable_opts(opts):
    """A cell's recorded options without what only spells the same run differently: the OUTPUT_DIR (the cell's
    folder, however ``--out`` was written) and a relative config path."""
    opts = list(opts)
    if "OUTPUT_DIR" in opts:
        at = len(opts) - 1 - opts[::-1].index("OUTPUT_DIR")
        del opts[at:at + 2]
    if "--config-file" in opts:
        at = opts.index("--config-file") + 1
        opts[at] = os.path.abspath(opts[at])
    return opts


def other_options_state(run_dir, command):
    """ "finished" or "interrupted" when ``run_dir`` holds a finished run, or one with a checkpoint to resume, that
    its sweep_cell.json says was started with options other than ``command``'s; None otherwise (also without a
    record)."""
    recorded = read_cell_file(run_dir)
    if recorded is None or comparable_opts(recorded["opts"]) == comparable_opts(command_opts(command)):
        return None
    if run_finished(run_dir):
        return "finished"
    return "interrupted" if has_checkpoint(run_dir) else None


def other_options_detail(state, run_dir):
    """The one-line note for a cell whose folder holds a ``state`` ("finished"/"interrupted") run with other
    options."""
    kept = "not in the tables" if state == "finished" else "not resumed"
    return (f"{state} run started with other options (see {os.path.join(run_dir, CELL_FILE)}), {kept}; "
            "delete the folder to train it with these options")


def read_cell_file(run_dir):
    """The record of the options a run in ``run_dir`` was started with (its :data:`CELL_FILE`), or None without
    one; an InputError naming the file when it is not such a record."""
    path = os.path.join(run_dir, CELL_FILE)
    if not os.path.exists(path):
        return None
    recorded = read_json(path, "sweep cell record")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("opts"), list):
        raise InputError(f"sweep cell record {path} holds no list of options ('opts'); delete it with its folder")
    return recorded


def last_line(path):
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else "(no output)"


def train_net_command(tools_dir):
    """How a sweep starts a training run: this Python running tools/train_net.py."""
    return [sys.executable, os.path.join(tools_dir, "train_net.py")]


@dataclasses.dataclass
class CellResult:
    cell: Cell
    run: Optional[Run]  # None until the cell has finished with the sweep's options
    note: str = ""  # why a cell without a run has none, when it is not just unfinished

    def metric(self, key):
        return self.run.metric(key) if self.run else None


def read_results(cells, out_dir, config_file, opts=(), cuda_devices=0):
    """A :class:`CellResult` per cell of a sweep run with ``config_file`` and ``opts`` (as :func:`run_sweep`);
    cells that have not finished, or finished with other options, carry no run."""
    results = []
    for cell in cells:
        run_dir = os.path.join(out_dir, cell.name)
        # A cell from another sweep sharing OUT (e.g. a shorter schedule) is left out of the values rather than
        # flagged: a researcher reads and copies the tables' numbers as one comparison, and a footnote is easily
        # lost; the notes say which cell is missing and why.
        other = other_options_state(run_dir, cell_command(cell, run_dir, config_file, [], opts, cuda_devices))
        if other:
            results.append(CellResult(cell, None, other_options_detail(other, run_dir)))
        else:
            results.append(CellResult(cell, Run(run_dir, name=cell.name) if run_finished(run_dir) else None))
    return results


def box_mask(result):
    """ "box / mask" AP of a cell as a table entry; "–" for an AP that is not there."""
    values = [result.metric(key) for key in TABLE_METRICS]
    return " / ".join("–" if v is None else f"{v:.1f}" for v in values)


def batch_size_table(results):
    """Markdown: box / mask AP, one row per norm (with group setting), one column per images per batch
    (the paper's Table 2 / Figure 1)."""
    ims = sorted({r.cell.ims for r in results})
    rows = {}
    for result in results:
        rows.setdefault(result.cell.row_label, {})[result.cell.ims] = box_mask(result)
    body = [[label] + [by_ims.get(n, "") for n in ims] for label, by_ims in rows.items()]
    return tabulate(body, headers=["norm"] + [f"{n} img/batch" for n in ims], tablefmt="pipe",
                    disable_numparse=True)


def group_table(results):
    """Markdown: box / mask AP of the grouped norms, one row per group setting, one column per norm and
    images per batch (the paper's Table 3); None unless some grouped norm has more than one group setting."""
    grouped = [r for r in results if r.cell.group_label]
    columns = list(dict.fromkeys((r.cell.norm, r.cell.ims) for r in grouped))
    settings = list(dict.fromkeys(r.cell.group_label for r in grouped))
    if len(settings) < 2:
        return None
    entries = {(r.cell.group_label, r.cell.norm, r.cell.ims): box_mask(r) for r in grouped}
    body = [[setting] + [entries.get((setting, norm, n), "") for norm, n in columns] for setting in settings]
    headers = ["group setting"] + [f"{norm}, {n} img/batch" for norm, n in columns]
    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)


def sweep_markdown(results, reports=()):
    """The sweep's tables as one Markdown document, with the cells that have no result and why."""
    parts = ["Box AP / mask AP (COCO AP on the test set) by norm and images per batch:", "",
             batch_size_table(results)]
    table = group_table(results)
    if table:
        parts += ["", "Box AP / mask AP by group setting:", "", table]
    missing = {report.cell: report for report in reports if report.status in ("unsupported", "failed")}
    notes = [f"- {r.cell.name}: {missing[r.cell].status}: {missing[r.cell].detail}" if r.cell in missing
             else f"- {r.cell.name}: {r.note or 'not finished'}" for r in results if r.run is None]
    if notes:
        parts += ["", "Cells without results:", "", *notes]
    return "\n".join(parts) + "\n"


def write_sweep_csv(results, path):
    """One row per cell: its settings, the final AP metrics, seconds per iteration and peak memory."""
    with atomic_write(path, "w") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "norm", "num_groups", "dim_per_group", "ims", *CSV_METRICS, "s/iter", "peak MB"])
        for r in results:
            cell, run = r.cell, r.run
            timing = [run.seconds_per_iter, run.peak_memory_mb] if run else [None, None]
            writer.writerow([cell.name, cell.norm, cell.num_groups or "", cell.dim_per_group or "", cell.ims,
                             *[_blank(value) for value in [r.metric(key) for key in CSV_METRICS] + timing]])


def _blank(value):
    return "" if value is None else value


def plot_ap_vs_batch_size(results, path):
    """Box and mask AP against images per batch (log2 axis), one line per norm with its group setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TABLE_METRICS), figsize=(11, 4.2))
    ims = sorted({r.cell.ims for r in results})
    lines = {}
    for result in results:
        lines.setdefault(result.cell.row_label, []).append(result)
    for ax, key in zip(axes, TABLE_METRICS):
        for label, line in lines.items():
            points = sorted((r.cell.ims, r.metric(key)) for r in line if r.metric(key) is not None)
            if points:
                ax.plot([n for n, _ in points], [v for _, v in points], "-o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ims, [str(n) for n in ims])
        ax.minorticks_off()
        ax.set(xlabel="images per batch", ylabel=f"{'box' if key.startswith('bbox') else 'mask'} AP", title=key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def write_sweep_outputs(results, out_dir, reports=(), name="sweep") -> List[str]:
    """Write ``name.md``, ``name.csv`` and ``name.png`` into ``out_dir``; returns their paths. Sweeps that share
    an ``out_dir`` (and so their common cells) keep their tables apart by ``name``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.{ext}") for ext in ("md", "csv", "png")]
    with atomic_write(paths[0], "w") as f:
        f.write(sweep_markdown(results, reports))
    write_sweep_csv(results, paths[1])
    plot_ap_vs_batch_size(results, paths[2])
    return paths
