"""Summary tables and plots of finished runs. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

Records = Sequence[Mapping[str, Any]]

X_AXES = {
    "joint_epoch": "epochs jointly accessed by all workers",
    "wall_clock": "training wall-clock (s)",
    "comm_rounds": "communication rounds",
}


def summary_table(runs: Mapping[str, Records]) -> str:
    """A markdown table of each run's final record: loss, accuracy, rounds and MB sent per worker."""
    lines = [
        "| run | final train loss | test accuracy | comm rounds | MB sent / worker | train time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, records in runs.items():
        last = records[-1]
        lines.append(
            f"| {name} | {last['train_loss']:.4f} | {last['test_accuracy']:.4f} | {last['comm_rounds']} "
            f"| {last['comm_bytes'] / 1e6:.2f} | {last['wall_clock']:.1f} |"
        )
    return "\n".join(lines)


def plot_runs(runs: Mapping[str, Records], path: str | Path, x_axes: Sequence[str] = ("joint_epoch",)) -> Path:
    """Training loss (log scale) and test accuracy of each run against each of ``x_axes``; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x in x_axes:
        if x not in X_AXES:
            raise ValueError(f"x axis {x!r} is not known; allowed: {', '.join(X_AXES)}")
    fig, axes = plt.subplots(2, len(x_axes), figsize=(5.5 * len(x_axes), 7), squeeze=False)
    for col, x in enumerate(x_axes):
        for name, records in runs.items():
            xs = [r[x] for r in records]
            axes[0][col].plot(xs, [r["train_loss"] for r in records], label=name)
            axes[1][col].plot(xs, [r["test_accuracy"] for r in records], label=name)
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("training loss of the averaged model")
        axes[1][col].set_ylabel("test accuracy")
        for row in (0, 1):
            axes[row][col].set_xlabel(X_AXES[x])
            axes[row][col].grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
