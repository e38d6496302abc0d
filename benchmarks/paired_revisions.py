"""Run benchmarks of two revisions of prsgd paired, in one run on one machine, and print new / old for every figure.

    .venv/bin/python benchmarks/paired_revisions.py OLD_REV [--new NEW_REV] [--pairs 2] [--only sync_cost,...]

Each revision's own ``benchmarks/`` and ``src/`` are taken from git (``git archive``; the new side is the working tree
unless ``--new`` names a revision), and each benchmark is run alternately old, new, old, new, ... (``--pairs`` times)
with its revision's ``src`` first on ``PYTHONPATH``, so that both see the same machine state. Every table row the
benchmarks print (``| label | number | ... |``) is matched by its first two cells and its column; the figure
reported per cell is the median over the pairs of new / old. Times (ms, s) are better lower, rates (samples/s)
higher: the column header says which.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BENCHMARKS = {
    "simulator_throughput": ["--models", "mlp,resnet20", "--workers", "4,16", "--repeats", "5"],
    "sync_cost": ["--workers", "4", "--repeats", "20", "--model", "resnet20"],
    "mixing": ["--workers", "64", "--numel", "272474", "--repeats", "5"],
}


def export(rev: str, into: Path) -> Path:
    """``rev``'s ``src`` and ``benchmarks`` unpacked under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src", "benchmarks"], check=True, capture_output=True
    ).stdout
    path = into / "tree.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into, filter="data")
    return into


def run(tree: Path, name: str, args: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    script = tree / "benchmarks" / f"{name}.py"
    done = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"{script} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def cells(output: str) -> dict[tuple[str, str], float]:
    """(row label, column header) -> number, for every markdown table row of ``output``. A row's label is its first
    cell, or its first two cells (``mlp N=16``) where the first alone repeats within its table."""
    found: dict[tuple[str, str], float] = {}
    for header, rows in _tables(output):
        firsts = [row[0] for row in rows]
        wide = len(set(firsts)) < len(firsts)
        for row in rows:
            label = f"{row[0]} {header[1]}={row[1]}" if wide else row[0]
            for column, value in zip(header[1 + wide :], row[1 + wide :], strict=False):
                number = re.fullmatch(r"([0-9.]+)x?", value.replace(",", ""))
                if number:
                    found[(label, column)] = float(number.group(1))
    return found


def _tables(output: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table of ``output``: (header cells, rows of cells)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    inside = False
    for line in output.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if not inside:
            tables.append((parts, []))
            inside = True
        elif not set("".join(parts)) <= set("-: "):
            tables[-1][1].append(parts)
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old", help="the old revision (a commit, tag or branch)")
    parser.add_argument("--new", default="", help="the new revision (default: the working tree)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as old_dir, tempfile.TemporaryDirectory() as new_dir:
        old = export(args.old, Path(old_dir))
        new = export(args.new, Path(new_dir)) if args.new else ROOT
        for name in args.only.split(","):
            ratios: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.pairs):
                before, after = cells(run(old, name, BENCHMARKS[name])), cells(run(new, name, BENCHMARKS[name]))
                for key in before.keys() & after.keys():
                    if before[key] > 0:
                        ratios.setdefault(key, []).append(after[key] / before[key])
            print(f"\n{name} {' '.join(BENCHMARKS[name])}: new / old, median of {args.pairs} pairs (ABAB)")
            print("| row | column | new / old |")
            print("|---|---|---:|")
            for (row, column), values in sorted(ratios.items()):
                print(f"| {row} | {column} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
