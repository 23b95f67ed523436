"""Read finished training runs (an OUTPUT_DIR each) and compare them the way the paper's tables do."""
import collections
import csv
import json
import os
import statistics

from tabulate import tabulate

from gn_det.errors import InputError
from gn_det.fileio import atomic_write, read_json, save_figure

METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "segm/AP", "segm/AP50", "segm/AP75")
EVAL_TASKS = ("bbox", "segm", "keypoints")  # COCOEvaluator's tasks: the first part of an evaluation metric's key
# tabulate's number format of each column of :func:`comparison_rows` (AP to one decimal as in the paper's tables)
FLOAT_FORMATS = {**{key: ".1f" for key in METRICS}, "Δ bbox/AP": "+.1f", "Δ segm/AP": "+.1f", "s/iter": ".3g",
                 "peak MB": ".0f"}


class Run:
    """What one OUTPUT_DIR holds: final results (results.json) and the training log (metrics.json).

    ``datasets`` are the test sets the run was evaluated on, in its ``DATASETS.TEST`` order (the keys of
    results.json, else the dataset prefixes of metrics.json's evaluation keys; empty when neither names one);
    ``dataset`` is the first, or None. Evaluation metrics are read for one test set, by default ``dataset``.
    """

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
        self.datasets = list(self.final) or _logged_datasets(self.log)

    @property
    def dataset(self):
        return self.datasets[0] if self.datasets else None

    def series(self, key, dataset=None):
        """(iteration, value) pairs of one logged scalar: a training one such as "total_loss", or an evaluation
        metric such as "bbox/AP" of ``dataset`` (default: :attr:`dataset`; none for a test set the run was not
        evaluated on)."""
        if key.split("/")[0] not in EVAL_TASKS:
            return [(row["iteration"], row[key]) for row in self.log if key in row]
        dataset = dataset or self.dataset
        if self.datasets and dataset not in self.datasets:
            return []
        # detectron2 logs the evaluation of several test sets as "<dataset>/bbox/AP", of one as "bbox/AP"
        logged = ([f"{dataset}/{key}"] if dataset else []) + ([key] if len(self.datasets) <= 1 else [])
        points = []
        for row in self.log:
            found = next((k for k in logged if k in row), None)
            if found is not None:
                points.append((row["iteration"], row[found]))
        return points

    def metric(self, key, dataset=None):
        """Final value of "bbox/AP" etc. on ``dataset`` (default: :attr:`dataset`): results.json, else the last
        evaluation of that test set in metrics.json; None without one."""
        dataset = dataset or self.dataset
        if key in self.final.get(dataset, {}):
            return self.final[dataset][key]
        points = self.series(key, dataset)
        return points[-1][1] if points else None

    @property
    def seconds_per_iter(self):
        times = [row["time"] for row in self.log if "time" in row]
        return statistics.median(times) if times else None

    @property
    def peak_memory_mb(self):
        peaks = [row["peak_memory_mb"] for row in self.log if "peak_memory_mb" in row]
        return max(peaks) if peaks else None


def distinct_tails(paths):
    """Per path, its last components (a tuple), as few as tell it from the other paths: the name alone, parent
    folders added where names repeat (``vis/a/run`` and ``vis/b/run``: ``("a", "run")`` and ``("b", "run")``).
    Paths naming the same file keep the same tail (its whole absolute path)."""
    parts = [os.path.abspath(p).split(os.sep) for p in paths]
    depths = [1] * len(paths)
    while True:
        tails = [tuple(p[-depth:]) for p, depth in zip(parts, depths)]
        counts = collections.Counter(tails)
        repeated = [i for i, tail in enumerate(tails) if counts[tail] > 1 and depths[i] < len(parts[i])]
        if not repeated:
            return tails
        for i in repeated:
            depths[i] += 1


def run_labels(run_dirs, labels=None):
    """``labels`` (one distinct label per run folder) or, without, the folder names, with parent folders
    (``a/run``, ``b/run``) where names repeat."""
    if labels is None:
        tails = distinct_tails(run_dirs)
        for i, tail in enumerate(tails):
            if tail in tails[:i]:
                raise InputError(f"{run_dirs[i]}: the same run folder is given twice "
                                 f"(as {run_dirs[tails.index(tail)]} too); give each run once")
        return ["/".join(tail) for tail in tails]
    if len(labels) != len(run_dirs) or len(set(labels)) != len(labels):
        raise InputError(f"--labels: {len(labels)} labels ({', '.join(labels)}) for {len(run_dirs)} run folders; "
                         "give one distinct label per run")
    return list(labels)


def load_runs(run_dirs, labels=None):
    """A :class:`Run` per folder, named by ``labels`` (see :func:`run_labels`)."""
    return [Run(d, name) for d, name in zip(run_dirs, run_labels(run_dirs, labels))]


def _final_results(path):
    """results.json ({dataset: {task: {metric: value}}}) as {dataset: {"bbox/AP": value, ...}}, in its order."""
    per_dataset = read_json(path, "results file")
    shaped = isinstance(per_dataset, dict) and all(
        isinstance(tasks, dict) and all(isinstance(values, dict) for values in tasks.values())
        for tasks in per_dataset.values())
    if not shaped:
        raise InputError(f"results file {path} is not {{dataset: {{task: {{metric: value}}}}}} (gn-det's results.json)")
    return {dataset: {f"{task}/{metric}": value for task, values in tasks.items() for metric, value in values.items()}
            for dataset, tasks in per_dataset.items()}


def _logged_datasets(log):
    """The test sets named in metrics.json's evaluation keys ("<dataset>/bbox/AP", logged when a run has several),
    in the order they first appear."""
    datasets = {}
    for row in log:
        for key in row:
            parts = key.rsplit("/", 2)
            if len(parts) == 3 and parts[1] in EVAL_TASKS:
                datasets.setdefault(parts[0])
    return list(datasets)


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


def comparison_dataset(runs, dataset=None):
    """The test set ``runs`` are compared on: ``dataset``, else the first run's first test set (the first one any
    run names when the first run names none); None when no run names one. An InputError names each run not
    evaluated on it, with the test sets it was evaluated on; a run whose results name no test set is taken as
    evaluated on it."""
    # A Δ to the reference run means something only on the same images: refusing tells the researcher at once,
    # where a dataset column beside Δ columns computed across test sets would leave the mismatch to be noticed.
    given = dataset is not None
    if not given:
        dataset = next((run.dataset for run in runs if run.dataset), None)
    others = [run for run in runs if run.datasets and dataset not in run.datasets]
    if others:
        what = "--dataset" if given else "the first run's test set"
        raise InputError(f"runs evaluated on different datasets: {dataset} ({what}) is not among the test sets of "
                         + ", ".join(f"{run.name} ({run.output_dir}: {', '.join(run.datasets)})" for run in others)
                         + "; compare runs on a test set each was evaluated on (--dataset)")
    return dataset


def comparison_rows(runs, dataset=None):
    """Rows of the comparison table of ``runs`` on ``dataset`` (see :func:`comparison_dataset`); Δ columns are
    against the first run."""
    dataset = comparison_dataset(runs, dataset)
    base = runs[0]
    rows = []
    for run in runs:
        row = {"run": run.name}
        for key in METRICS:
            row[key] = run.metric(key, dataset)
        for key in ("bbox/AP", "segm/AP"):
            ours, theirs = run.metric(key, dataset), base.metric(key, dataset)
            row[f"Δ {key}"] = None if ours is None or theirs is None else ours - theirs
        row["s/iter"] = run.seconds_per_iter
        row["peak MB"] = run.peak_memory_mb
        rows.append(row)
    return rows


def markdown_table(rows):
    headers = list(rows[0])
    return tabulate([list(r.values()) for r in rows], headers=headers, tablefmt="pipe",
                    floatfmt=[FLOAT_FORMATS.get(header, "g") for header in headers], missingval="–")


def write_csv(rows, path):
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_runs(runs, path, dataset=None):
    """Total loss and box/mask AP on ``dataset`` (see :func:`comparison_dataset`) against iteration, one line
    per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = comparison_dataset(runs, dataset)
    fig, (loss_ax, ap_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        loss = run.series("total_loss")
        line = loss_ax.plot([i for i, _ in loss], [v for _, v in loss], label=run.name)[0] if loss else None
        color = line.get_color() if line else None
        for key, style in (("bbox/AP", "-o"), ("segm/AP", "--s")):
            points = run.series(key, dataset)
            if points:
                ap_ax.plot([i for i, _ in points], [v for _, v in points], style, color=color,
                           label=f"{run.name} {key.split('/')[0]}")
    loss_ax.set(xlabel="iteration", ylabel="total loss", title="training loss")
    ap_ax.set(xlabel="iteration", ylabel="AP",
              title="box (solid) and mask (dashed) AP" + (f" on {dataset}" if dataset else ""))
    for ax in (loss_ax, ap_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
