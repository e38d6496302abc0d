"""docs/results.md's tables from the CPU twins' runs with seeds, and the per-run summaries they are made from.

    prsgd results RUNS [--doc docs/results.md] [--summaries docs/results/runs.jsonl]
    prsgd results runs/gpt --summaries docs/results/gpt_runs.jsonl
    prsgd results --check [--doc ...] [--summaries ...]

``RUNS`` holds one folder per experiment (``RUNS/<config>/<key>=<value>/seed<k>/``, as ``prsgd run --seeds`` writes
them). Every finished run (its ``summary.json``) becomes one line of ``--summaries``: experiment, group, seed, the
settings that define it, final metrics and where the time went. Then every table block of ``--doc``, a line
``<!-- table EXPERIMENT KIND [BASELINE] -->`` followed by the table and ``<!-- end -->``, is rewritten from those
lines:

- ``summary``: each group's final metrics, mean +- sd over seeds;
- ``paired BASELINE``: each group minus the baseline group, seed by seed (same seed: same data order and
  initialisation), mean +- sd of the differences and in how many seeds the group was better;
- ``lm``, ``lm_paired BASELINE``: the same for language models (validation loss, perplexity, next-token accuracy),
  paired within each data case: group ``ARM/split=S`` minus ``BASELINE/split=S``;
- ``skipping POLYAK NESTEROV``: the drop in test accuracy from period 1 to each longer period, for the Polyak runs
  of experiment POLYAK and the Nesterov runs of experiment NESTEROV (the paper's Figs. 8-9: Nesterov is more robust
  to skipping communication).

``--check`` rewrites nothing: it exits with status 1 if any table of the doc differs from what the committed
summaries give (the tests run it), so every number in the doc can be traced to a run. The tables draw on every
``*.jsonl`` in the summaries' folder, so one set of experiments is regenerated without the others.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from prsgd.errors import InvalidArgument
from prsgd.experiments.report import mean_sd as pm
from prsgd.experiments.report import natural_key
from prsgd.training import command
from prsgd.training.checkpoint import atomic_write

BLOCK = re.compile(r"(<!-- table (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end -->)", re.S)
SETTINGS = {
    "data": ("dataset", "train_subset", "split"),
    "model": ("model",),
    "algorithm": ("sync", "period", "optimizer", "momentum", "nesterov", "topology"),
    "training": ("workers", "batch_size", "epochs", "lr", "lr_schedule"),
}


def collect(runs: Path) -> list[dict[str, Any]]:
    """One compact record per finished run under ``runs`` (sorted by experiment, group, seed)."""
    rows = []
    if not runs.is_dir():
        raise InvalidArgument(f"run folder {str(runs)!r} does not exist or is not a folder")
    for summary in sorted(runs.glob("**/summary.json")):
        folder = summary.parent
        parts = folder.relative_to(runs).parts
        seed_part = parts[-1] if parts[-1].startswith("seed") else None
        group_parts = parts[1:-1] if seed_part else parts[1:]
        data = json.loads(summary.read_text())
        config, final, times = data["config"], data["final"], data["time_s"]
        rows.append(
            {
                "experiment": parts[0],
                "group": "/".join(group_parts) or parts[0],
                "seed": config["training"]["seed"],
                "settings": {f"{s}.{k}": config[s][k] for s, keys in SETTINGS.items() for k in keys},
                "final": {
                    k: final[k]
                    for k in ("joint_epoch", "step", "train_loss", "test_loss", "test_accuracy", "comm_rounds")
                }
                | {"comm_mb": final["comm_bytes"] / 1e6},
                "time_s": {k: round(v, 3) for k, v in times.items()},
            }
        )
    rows.sort(key=lambda r: (r["experiment"], natural_key(r["group"]), r["seed"]))
    return rows


def _groups(rows: list[dict[str, Any]], experiment: str) -> dict[str, dict[int, dict[str, Any]]]:
    groups: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["experiment"] == experiment:
            groups[row["group"]][row["seed"]] = row
    if not groups:
        raise InvalidArgument(f"no runs of experiment {experiment!r} in the summaries")
    return groups


def summary_table(rows: list[dict[str, Any]], experiment: str) -> str:
    lines = [
        "| run | seeds | final train loss | test accuracy | comm rounds | MB sent / worker | train s | eval s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, by_seed in _groups(rows, experiment).items():
        runs = list(by_seed.values())

        def values(kind: str, key: str, runs=runs) -> np.ndarray:
            return np.array([r[kind][key] for r in runs], dtype=float)

        lines.append(
            f"| {group} | {len(runs)} | {pm(values('final', 'train_loss'))} | {pm(values('final', 'test_accuracy'))} "
            f"| {values('final', 'comm_rounds').mean():.0f} | {values('final', 'comm_mb').mean():.2f} "
            f"| {pm(values('time_s', 'train'), '.1f')} | {pm(values('time_s', 'evaluation'), '.1f')} |"
        )
    return "\n".join(lines)


def paired_table(rows: list[dict[str, Any]], experiment: str, baseline: str) -> str:
    groups = _groups(rows, experiment)
    if baseline not in groups:
        raise InvalidArgument(f"baseline {baseline!r} is not a group of {experiment!r}: {', '.join(groups)}")
    lines = [
        f"| run - {baseline} | seeds | test accuracy difference | better in | train loss difference | lower in |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = groups[baseline]
    for group, by_seed in groups.items():
        if group == baseline:
            continue
        seeds = sorted(set(by_seed) & set(base))
        acc = np.array([by_seed[s]["final"]["test_accuracy"] - base[s]["final"]["test_accuracy"] for s in seeds])
        loss = np.array([by_seed[s]["final"]["train_loss"] - base[s]["final"]["train_loss"] for s in seeds])
        lines.append(
            f"| {group} | {len(seeds)} | {pm(acc, '+.4f')} | {int((acc > 0).sum())} of {len(seeds)} "
            f"| {pm(loss, '+.4f')} | {int((loss < 0).sum())} of {len(seeds)} |"
        )
    return "\n".join(lines)


def _period(group: str) -> int | None:
    match = re.search(r"period=(\d+)", group)
    return int(match.group(1)) if match else None


def skipping_table(rows: list[dict[str, Any]], polyak: str, nesterov: str) -> str:
    """Accuracy at each period minus at period 1, per seed, for both momentum options, and their difference."""
    drops: dict[str, dict[int, dict[int, float]]] = {}
    for name, experiment in (("Polyak", polyak), ("Nesterov", nesterov)):
        by_period = {_period(g): runs for g, runs in _groups(rows, experiment).items() if _period(g) is not None}
        if 1 not in by_period:
            raise InvalidArgument(f"experiment {experiment!r} has no period=1 group to measure the drop from")
        drops[name] = {
            p: {s: runs[s]["final"]["test_accuracy"] - by_period[1][s]["final"]["test_accuracy"] for s in runs}
            for p, runs in by_period.items()
            if p != 1
        }
    lines = [
        "| period | Polyak: accuracy - at I = 1 | Nesterov: accuracy - at I = 1 | Nesterov - Polyak (paired) "
        "| Nesterov dropped less in |",
        "|---:|---:|---:|---:|---:|",
    ]
    for p in sorted(set(drops["Polyak"]) & set(drops["Nesterov"])):
        seeds = sorted(set(drops["Polyak"][p]) & set(drops["Nesterov"][p]))
        a = np.array([drops["Polyak"][p][s] for s in seeds])
        b = np.array([drops["Nesterov"][p][s] for s in seeds])
        lines.append(
            f"| {p} | {pm(a, '+.4f')} | {pm(b, '+.4f')} | {pm(b - a, '+.4f')} | {int((b > a).sum())} of {len(seeds)} |"
        )
    return "\n".join(lines)


def lm_table(rows: list[dict[str, Any]], experiment: str) -> str:
    """A language model's final validation loss, perplexity (exp of each seed's loss) and next-token accuracy."""
    lines = [
        "| run | seeds | validation loss | perplexity | next-byte accuracy | rounds | MB sent / worker | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group, by_seed in _groups(rows, experiment).items():
        runs = list(by_seed.values())
        loss = np.array([r["final"]["test_loss"] for r in runs])
        acc = np.array([r["final"]["test_accuracy"] for r in runs])
        lines.append(
            f"| {group} | {len(runs)} | {pm(loss)} | {pm(np.exp(loss), '.3f')} | {pm(acc)} "
            f"| {np.mean([r['final']['comm_rounds'] for r in runs]):.0f} "
            f"| {np.mean([r['final']['comm_mb'] for r in runs]):.1f} "
            f"| {pm([r['time_s']['train'] for r in runs], '.1f')} |"
        )
    return "\n".join(lines)


def lm_paired_table(rows: list[dict[str, Any]], experiment: str, baseline: str) -> str:
    """Each group ``ARM/REST`` minus ``BASELINE/REST`` (the same data case), seed by seed: validation loss."""
    groups = _groups(rows, experiment)
    lines = [
        f"| run - {baseline} (same data) | seeds | validation loss difference | lower in | MB sent ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for group, by_seed in groups.items():
        arm, _, rest = group.partition("/")
        base = groups.get(f"{baseline}/{rest}" if rest else baseline)
        if arm == baseline or base is None:
            continue
        seeds = sorted(set(by_seed) & set(base))
        diff = np.array([by_seed[s]["final"]["test_loss"] - base[s]["final"]["test_loss"] for s in seeds])
        ratio = np.mean([by_seed[s]["final"]["comm_mb"] / base[s]["final"]["comm_mb"] for s in seeds])
        lines.append(
            f"| {group} | {len(seeds)} | {pm(diff, '+.4f')} | {int((diff < 0).sum())} of {len(seeds)} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def render(spec: str, rows: list[dict[str, Any]]) -> str:
    words = spec.split()
    if len(words) == 2 and words[1] == "summary":
        return summary_table(rows, words[0])
    if len(words) == 3 and words[1] == "paired":
        return paired_table(rows, words[0], words[2])
    if len(words) == 2 and words[1] == "lm":
        return lm_table(rows, words[0])
    if len(words) == 3 and words[1] == "lm_paired":
        return lm_paired_table(rows, words[0], words[2])
    if len(words) == 3 and words[0] == "skipping":
        return skipping_table(rows, words[1], words[2])
    raise InvalidArgument(
        f"table block {spec!r} is not known; write 'EXPERIMENT summary', 'EXPERIMENT paired BASELINE', "
        "'EXPERIMENT lm', 'EXPERIMENT lm_paired BASELINE' or 'skipping POLYAK NESTEROV'"
    )


def fill(doc: str, rows: list[dict[str, Any]]) -> str:
    """``doc`` with every table block rewritten from ``rows``."""
    return BLOCK.sub(lambda m: f"{m.group(1)}{render(m.group('spec'), rows)}\n{m.group(4)}", doc)


def read_summaries(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidArgument(f"{path} cannot be read as per-run summaries (JSON lines): {error}") from None


def every_summary(path: Path, replaced: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The summaries of every ``*.jsonl`` beside ``path`` (the doc's tables draw on all of them: one file per set of
    experiments, so regenerating one set keeps the others), with ``path``'s own lines ``replaced`` if given."""
    rows = []
    for file in sorted(path.parent.glob("*.jsonl")):
        if file != path:
            rows += read_summaries(file)
    return rows + (replaced if replaced is not None else read_summaries(path) if path.exists() else [])


def read_doc(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as error:
        raise InvalidArgument(f"the results doc {path} cannot be read: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd results", __doc__)
    parser.add_argument("runs", nargs="?", help="the folder of experiment folders (omit with --check)")
    parser.add_argument("--doc", default="docs/results.md")
    parser.add_argument("--summaries", default="docs/results/runs.jsonl")
    parser.add_argument("--check", action="store_true", help="only compare the doc's tables with the summaries")
    args = parser.parse_args(argv)
    doc_path, summaries = Path(args.doc), Path(args.summaries)
    if args.check:
        doc = read_doc(doc_path)
        if fill(doc, every_summary(summaries)) != doc:
            print(
                f"{doc_path}: its tables differ from the summaries in {summaries.parent}; "
                "run python -m prsgd results RUNS",
                file=sys.stderr,
            )
            sys.exit(1)
        print(f"{doc_path}: {len(BLOCK.findall(doc))} tables match the summaries in {summaries.parent}")
        return
    if not args.runs:
        parser.error("RUNS is required (or --check)")
    rows = collect(Path(args.runs))
    if not rows:
        parser.error(f"no finished runs (summary.json) under {args.runs}")
    atomic_write(summaries, "".join(json.dumps(r) + "\n" for r in rows).encode())
    atomic_write(doc_path, fill(read_doc(doc_path), every_summary(summaries, rows)).encode())
    print(f"{len(rows)} runs -> {summaries}; tables of {doc_path} rewritten")
