"""Read finished training runs (an OUTPUT_DIR each) and compare them the way the paper's tables do."""
import csv
import json
import os
import statistics

from tabulate import tabulate

from gn_det.errors import InputError
from gn_det.fileio import atomic_write, read_json, save_figure

METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")


class Run:
    """What one OUTPUT_DIR holds: final results (results.json) and the training log (metrics.json)."""

    def __init__(self, output_dir, name=None):
        self.output_dir = output_dir
        self.name = name or os.path.basename(os.path.normpath(output_dir))
        results_path = os.path.join(output_dir, "results.json")
        metrics_path = os.path.join(output_dir, "metrics.json")
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise InputError(f"{output_dir}: a file, not a folder (a run's OUTPUT_DIR)")
        if not os.path.exists(results_path) and not os.path.exists(metrics_path):
            raise InputError(f"{output_dir}: neither results.json nor metrics.json; is it a run's OUTPUT_DIR?")
        self.final = _final_results(results_path) if os.path.exists(results_path) else {}
        self.log = _read_metrics(metrics_path) if os.path.exists(metrics_path) else []

    def series(self, key):
        """(iteration, value) pairs of one logged scalar, e.g. "total_loss" or "bbox/AP"."""
        return [(row["iteration"], row[k]) for row in self.log for k in row if k == key or k.endswith("/" + key)]

    def metric(self, key):
        """Final value of "bbox/AP" etc.: results.json, else the last evaluation in metrics.json."""
        if key in self.final:
            return self.final[key]
        points = self.series(key)
        return points[-1][1] if points else None

    @property
    def seconds_per_iter(self):
        times = [row["time"] for row in self.log if "time" in row]
        return statistics.median(times) if times else None

    @property
    def peak_memory_mb(self):
        peaks = [row["peak_memory_mb"] for row in self.log if "peak_memory_mb" in row]
        return max(peaks) if peaks else None


def run_labels(run_dirs, labels=None):
    """``labels`` (one distinct label per run folder) or, without, the folder names."""
    if labels is None:
        return [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise InputError(f"--labels: {len(labels)} labels ({', '.join(labels)}) for {len(run_dirs)} run folders; "
                         "give one distinct label per run")
    return list(labels)


def load_runs(run_dirs, labels=None):
    """A :class:`Run` per folder, named by ``labels`` (see :func:`run_labels`)."""
    return [Run(d, name) for d, name in zip(run_dirs, run_labels(run_dirs, labels))]


def _final_results(path):
    """results.json ({dataset: {task: {metric: value}}}) flattened to {"bbox/AP": ...} for the first dataset."""
    per_dataset = read_json(path, "results file")
    shaped = isinstance(per_dataset, dict) and all(
        isinstance(tasks, dict) and all(isinstance(values, dict) for values in tasks.values())
        for tasks in per_dataset.values())
    if not shaped:
        raise InputError(f"results file {path} is not {{dataset: {{task: {{metric: value}}}}}} (gn-det's results.json)")
    first = next(iter(per_dataset.values()), {})
    return {f"{task}/{metric}": value for task, values in first.items() for metric, value in values.items()}


def _read_metrics(path):
    """detectron2's metrics.json: one JSON object per line; a line cut by a killed run is skipped.

    detectron2 appends to the file, so a run resumed (or restarted) in the same folder logs iterations again;
    when the iteration goes back, the earlier lines from that iteration on are superseded and dropped.
    """
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(row, dict):
                continue
            # rows stay in increasing iteration order, so the superseded lines are a suffix
            while rows and rows[-1].get("iteration", -1) >= row.get("iteration", -1):
                rows.pop()
            rows.append(row)
    return rows


def comparison_rows(runs):
    """Rows of the comparison table; Δ columns are against the first run."""
    base = runs[0]
    rows = []
    for run in runs:
        row = {"run": run.name}
        for key in METRICS:
            row[key] = run.metric(key)
        for key in ("bbox/AP", "segm/AP"):
            ours, theirs = run.metric(key), base.metric(key)
            row[f"Δ {key}"] = None if ours is None or theirs is None else ours - theirs
        row["s/iter"] = run.seconds_per_iter
        row["peak MB"] = run.peak_memory_mb
        rows.append(row)
    return rows


def markdown_table(rows):
    return tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="pipe", floatfmt=".3g",
                    missingval="–")


def write_csv(rows, path):
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_runs(runs, path):
    """Total loss and box/mask AP against iteration, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        loss = run.series("total_loss")
        line = loss_ax.plot([i for i, _ in loss], [v for _, v in loss], label=run.name)[0] if loss else None
        color = line.get_color() if line else None
        for key, style in (("bbox/AP", "-o"), ("segm/AP", "--s")):
            points = run.series(key)
            if points:
                ap_ax.plot([i for i, _ in points], [v for _, v in points], style, color=color,
                           label=f"{run.name} {key.split('/')[0]}")
    loss_ax.set(xlabel="iteration", ylabel="total loss", title="training loss")
    ap_ax.set(xlabel="iteration", ylabel="AP", title="box (solid) and mask (dashed) AP")
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
