"""Summary tables and plots of finished runs, in the paper's figure forms.

A *group* is one configuration run with one or more seeds; each run is its list of evaluation records (the
``log.jsonl`` lines). Curves are the mean over seeds with a min-max band. matplotlib is imported only when a
plot is drawn.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prsgd.errors import InvalidArgument

Records = Sequence[Mapping[str, Any]]
Groups = Mapping[str, Sequence[Records]]

X_AXES = {  # name -> (record field, axis label, scale)
    "joint_epoch": ("joint_epoch", "epochs jointly accessed by all workers", 1.0),
    "wall_clock": ("wall_clock", "training wall-clock (s)", 1.0),
    "comm_rounds": ("comm_rounds", "communication rounds", 1.0),
    "bytes": ("comm_bytes", "MB sent per worker", 1e-6),
    "step": ("step", "iterations", 1.0),
}
# config keys that name where or how a run was made, not what was trained: never in titles or legends
_RUN_KEYS = {"out", "progress", "resume", "overwrite", "seeds", "sweep", "logger", "worker_timeout", "training.seed"}
_TITLE_KEYS = ("data.dataset", "data.split", "model.model", "training.workers", "algorithm.sync", "algorithm.period")
METRICS = {
    "train_loss": "training loss (averaged model)",
    "test_accuracy": "test accuracy",
    "consensus_distance": "consensus distance before a round",
    "state_spread": "optimizer state spread before a round",
}
DRIFT = ("consensus_distance", "state_spread")
"""Measured just before each round (:mod:`prsgd.algorithm.drift`); a record holds the mean over the rounds since the
previous one, or null (no round yet; not measurable by the engine)."""


def plotted_metrics(groups: Groups) -> tuple[str, ...]:
    """Training loss and test accuracy, and each drift measure some record of the groups holds (runs without
    rounds, logs written before drift was measured, and rounds LocalSGD cannot measure hold none)."""
    held = [m for m in DRIFT if any(rec.get(m) is not None for runs in groups.values() for r in runs for rec in r)]
    return ("train_loss", "test_accuracy", *held)


def read_log(folder: str | Path) -> list[dict[str, Any]]:
    lines = [line for line in (Path(folder) / "log.jsonl").read_text().splitlines() if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k < len(lines) - 1:
                raise
            warnings.warn(f"{folder}/log.jsonl: its last line is torn (a run killed mid-write); skipped", stacklevel=2)
    return records


def discover(paths: Sequence[str | Path]) -> dict[str, list[list[dict[str, Any]]]]:
    """Groups from run folders: a folder with ``log.jsonl`` is one run; a folder whose subfolders are runs
    (``seed0``, ``seed1``, ...) is one group of seeds; any other folder is searched for such groups."""
    return {label: [read_log(folder) for folder in folders] for label, folders in run_folders(paths).items()}


def run_folders(paths: Sequence[str | Path]) -> dict[str, list[Path]]:
    """Each group's run folders (see :func:`discover`), by label."""
    groups: dict[str, list[Path]] = {}

    def visit(folder: Path, label: str) -> None:
        if (folder / "log.jsonl").is_file():
            groups[label] = [folder]
            return
        subfolders = [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
        children = sorted(subfolders, key=lambda p: natural_key(p.name))
        runs = [c for c in children if (c / "log.jsonl").is_file()]
        if runs and all(c.name.startswith("seed") for c in runs):
            groups[label] = runs
            return
        for child in children:
            visit(child, f"{label}/{child.name}" if label else child.name)

    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"run folder {str(path)!r} does not exist")
        visit(path, path.name)
    if not groups:
        raise FileNotFoundError(f"no log.jsonl under {', '.join(map(str, paths))}")
    return groups


def group_configs(paths: Sequence[str | Path]) -> dict[str, dict[str, Any]]:
    """Each group's flattened config (``{"algorithm.period": 8, ...}``, from its first run's ``config.json``,
    without the keys that only say where or how it ran); empty for a run without one."""
    configs = {}
    for label, folders in run_folders(paths).items():
        file = folders[0] / "config.json"
        values = json.loads(file.read_text()) if file.is_file() else {}
        flat = {}
        for key, value in values.items():
            for name, leaf in value.items() if isinstance(value, dict) else [(None, value)]:
                flat[f"{key}.{name}" if name else key] = leaf
        configs[label] = {k: v for k, v in flat.items() if k not in _RUN_KEYS}
    return configs


def describe_groups(configs: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, str], str]:
    """(a legend label per group: the config values that differ between groups, e.g. ``period=8``; a title: the
    main settings they share). Groups without a config keep their folder name."""

    def short(key: str) -> str:
        return key.rpartition(".")[2]

    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    known = [c for c in configs.values() if c]
    keys = sorted({k for c in known for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in known}) > 1]
    labels = {
        label: (", ".join(f"{short(k)}={shown(c.get(k))}" for k in differing) or label) if c else label
        for label, c in configs.items()
    }
    shared = [k for k in _TITLE_KEYS if k not in differing and known and k in known[0]]
    title = ", ".join(f"{short(k)}={shown(known[0][k])}" for k in shared)
    return labels, title


def mean_sd(values: Sequence[float] | np.ndarray, fmt: str = ".4f") -> str:
    """``mean +- sd`` (sample standard deviation) of ``values``; just the mean for one value. ``fmt`` formats the
    mean (a sign flag such as ``"+.4f"`` applies to the mean only)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return format(values.mean(), fmt)
    return f"{format(values.mean(), fmt)} +- {format(values.std(ddof=1), fmt.replace('+', ''))}"


def natural_key(text: str) -> list:
    """Sort key that orders period=2 before period=16."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _stack(runs: Sequence[Records], key: str) -> np.ndarray:
    length = min(len(r) for r in runs)
    return np.array([[rec.get(key) for rec in r[:length]] for r in runs], dtype=float)  # null or missing: nan


def summary_table(groups: Groups) -> str:
    """Markdown: each group's final metrics, mean over seeds (with min-max when there are several)."""

    def cell(values: np.ndarray, fmt: str) -> str:
        text = format(values.mean(), fmt)
        return text if len(values) == 1 else f"{text} ({format(values.min(), fmt)}-{format(values.max(), fmt)})"

    lines = [
        "| run | seeds | final train loss | test accuracy | comm rounds | MB sent / worker | peak MB / step "
        "| train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in groups.items():
        last = {k: np.array([r[-1].get(k, np.nan) for r in runs], dtype=float) for k in runs[0][-1]}
        peak = last.get("comm_peak_step_bytes")  # logs written before it was counted have none
        peak_cell = "-" if peak is None or np.isnan(peak).any() else f"{peak.max() / 1e6:.2f}"
        lines.append(
            f"| {name} | {len(runs)} | {cell(last['train_loss'], '.4f')} | {cell(last['test_accuracy'], '.4f')} "
            f"| {int(last['comm_rounds'].mean())} | {last['comm_bytes'].mean() / 1e6:.2f} | {peak_cell} "
            f"| {cell(last['wall_clock'], '.1f')} |"
        )
    return "\n".join(lines)


def plot_groups(
    groups: Groups,
    path: str | Path,
    x_axes: Sequence[str] = ("joint_epoch",),
    metrics: Sequence[str] = ("train_loss", "test_accuracy"),
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Path]:
    """One panel per (metric, x axis): mean over seeds with a min-max band. Saved as PNG and PDF. With the groups'
    ``configs`` (:func:`group_configs`) the legend names what differs between them and the title what they share."""
    import matplotlib.pyplot as plt

    fig = figure(groups, x_axes, metrics, configs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in (".png", ".pdf"):
        target = path.with_suffix(suffix)
        fig.savefig(target, dpi=120)
        written.append(target)
    plt.close(fig)
    return written


def figure(
    groups: Groups,
    x_axes: Sequence[str],
    metrics: Sequence[str],
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """The matplotlib figure :func:`plot_groups` saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    for x in x_axes:
        if x not in X_AXES:
            raise InvalidArgument(f"x axis {x!r} is not known; allowed: {', '.join(X_AXES)}")
    labels, title = describe_groups(configs) if configs else ({name: name for name in groups}, "")
    plain = FuncFormatter(lambda value, _: f"{value:.4g}")
    fig, axes = plt.subplots(len(metrics), len(x_axes), figsize=(5.5 * len(x_axes), 3.6 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for col, x in enumerate(x_axes):
            ax = axes[row][col]
            field, axis_label, scale = X_AXES[x]
            for name, runs in groups.items():
                xs = _stack(runs, field).mean(axis=0) * scale
                ys = _stack(runs, metric)
                # drift is null in records with no round since the one before: joined over them, not broken
                kept = np.isfinite(ys).all(axis=0) if metric in DRIFT else np.ones(len(xs), dtype=bool)
                xs, ys = xs[kept], ys[:, kept]
                (line,) = ax.plot(xs, ys.mean(axis=0), label=labels.get(name, name))
                if len(runs) > 1:
                    ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.2)
            if metric in DRIFT:
                ax.set_yscale("log")  # spans decades between periods: matplotlib's own 10^k labels
            elif metric.endswith("loss"):
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(plain)  # 0.5, not 5x10^-1; narrow ranges label minor ticks too
                ax.yaxis.set_minor_formatter(plain)
            ax.set_xlabel(axis_label)
            ax.set_ylabel(METRICS.get(metric, metric))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    lines = [title] if title else []
    seeds = sorted({len(runs) for runs in groups.values()})
    if max(seeds) > 1:
        lines.append(f"mean over {'/'.join(map(str, seeds))} seeds; shaded band: min-max over the seeds")
    if lines:
        fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    return fig
