"""Feature distributions over training, as the paper's Figure 3: percentiles of one layer's responses.

The paper plots the {1, 20, 80, 99} percentiles of conv5_3's output *before normalization* over training, to
show that with normalization the distribution stays stable. :class:`gn_det.analysis.feature_stats_hook.
FeatureStatsHook` records them into ``OUTPUT_DIR/feature_stats.json``; this module computes percentiles, reads
the files back and plots several runs side by side.
"""
import os

import torch

from gn_det.errors import InputError
from gn_det.fileio import read_json, save_figure, write_json_atomically

FEATURE_STATS_FILE = "feature_stats.json"
PERCENTILES = (1, 20, 80, 99)  # Figure 3's
# torch.quantile refuses inputs above 2**24 elements, and sorting millions of values every few iterations would
# slow training down; a regular subsample of this many values estimates the percentiles to well under 1%.
MAX_VALUES = 2**20


def feature_percentiles(tensor, percentiles=PERCENTILES):
    """{"p1": ..., "p20": ..., "p80": ..., "p99": ..., "mean": ..., "std": ...} of all values of ``tensor``."""
    values = tensor.detach().flatten().float()
    if values.numel() > MAX_VALUES:
        values = values[:: -(-values.numel() // MAX_VALUES)]  # ceil division: at most MAX_VALUES remain
    quantiles = torch.quantile(values, torch.tensor([p / 100 for p in percentiles], dtype=values.dtype))
    stats = {f"p{p}": q.item() for p, q in zip(percentiles, quantiles)}
    stats.update(mean=values.mean().item(), std=values.std().item())
    return stats


def read_feature_stats(run_dir):
    """The contents of ``run_dir/feature_stats.json``: {"layer", "where", "percentiles", "records": [...]}; an
    InputError naming the file when it is not JSON (e.g. truncated) or lacks one of those keys."""
    path = os.path.join(run_dir, FEATURE_STATS_FILE)
    stats = read_json(path, "feature stats file")
    keys = ("layer", "where", "percentiles", "records")
    missing = [key for key in keys if not isinstance(stats, dict) or key not in stats]
    if missing:
        raise InputError(f"feature stats file {path} lacks {', '.join(missing)}: not one the feature stats hook "
                         "wrote")
    if not isinstance(stats["records"], list):
        raise InputError(f"feature stats file {path}: records is not a list")
    return stats


def write_feature_stats(run_dir, stats):
    """Write ``stats`` atomically, so a run killed mid-write keeps the previous file."""
    write_json_atomically(os.path.join(run_dir, FEATURE_STATS_FILE), stats, indent=1)


def plot_feature_stats(runs, path, columns=4, share_y=True):
    """One panel per run: the percentile bands (1-99 light, 20-80 dark) of its layer against iteration.

    ``runs``: (name, stats) pairs, stats as :func:`read_feature_stats` returns. With ``share_y`` the panels
    share the y axis, so the spreads compare at a glance; without, a run whose features grow by orders of
    magnitude (no normalization) does not flatten the others.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(runs))
    rows = -(-len(runs) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), sharey=share_y,
                             squeeze=False)
    for ax, (name, stats) in zip(axes.flat, runs):
        records = stats["records"]
        low, mid_low, mid_high, high = (f"p{p}" for p in stats["percentiles"])
        iters = [r["iteration"] for r in records]
        ax.fill_between(iters, [r[low] for r in records], [r[high] for r in records], alpha=0.25, color="C0",
                        label=f"{low[1:]}-{high[1:]}th percentile")
        ax.fill_between(iters, [r[mid_low] for r in records], [r[mid_high] for r in records], alpha=0.6,
                        color="C0", label=f"{mid_low[1:]}-{mid_high[1:]}th percentile")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    first = runs[0][1]
    axes[0, 0].set_ylabel(f"{first['layer']} ({first['where']})", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_feature_stats_of_runs(run_dirs, path, columns=4, share_y=True):
    """:func:`plot_feature_stats` of those ``run_dirs`` that have a feature_stats.json with records, named
    after their folders; returns the number of runs plotted (0: nothing written)."""
    runs = [(os.path.basename(os.path.normpath(d)), read_feature_stats(d)) for d in run_dirs
            if os.path.isfile(os.path.join(d, FEATURE_STATS_FILE))]
    runs = [(name, stats) for name, stats in runs if stats["records"]]
    if runs:
        plot_feature_stats(runs, path, columns, share_y)
    return len(runs)
