"""Sections of a generated page rendered from raw runs kept next to it, and the check that they still match.

A :class:`RenderedSection` lives in its page between two comments that name it. Its experiment writes one JSON line
per run (the raw runs, e.g. ``docs/theory/heterogeneity_runs.jsonl``) and renders the section from those lines
alone, so that :meth:`RenderedSection.check` can render it again and compare: a number edited by hand, or raw runs
that changed without the page, are found by a test. :func:`main` is the command line every such experiment shares:
run (``--seeds``, ``--steps``), keep the raw runs, rewrite the section; or ``--check``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prsgd.training import checkpoint, command

Record = dict[str, Any]


@dataclass(frozen=True)
class RenderedSection:
    name: str
    command: str
    runs: str
    """The raw runs' default path, from the repository root."""
    render: Callable[[Sequence[Record]], tuple[list[str], Any]]
    """Raw runs -> (the section's markdown lines, what its figure draws)."""

    @property
    def begin(self) -> str:
        return f"<!-- {self.name}: rendered by {self.command} from {self.runs}; do not edit -->"

    @property
    def end(self) -> str:
        return f"<!-- /{self.name} -->"

    def text(self, records: Sequence[Record]) -> str:
        return "\n".join([self.begin, "", *self.render(records)[0], self.end])

    def _shown(self, doc: str) -> str | None:
        if self.begin not in doc or self.end not in doc:
            return None
        return self.begin + doc.split(self.begin, 1)[1].split(self.end, 1)[0] + self.end

    def replaced(self, doc: str, text: str) -> str:
        """``doc`` with this section replaced by ``text`` (appended when it has none)."""
        if self._shown(doc) is None:
            return doc.rstrip("\n") + "\n\n" + text + "\n"
        head, rest = doc.split(self.begin, 1)
        return head + text + rest.split(self.end, 1)[1]

    def carried(self, doc: str, new: str) -> str:
        """``new`` (a regenerated page) with ``doc``'s copy of this section carried over, if it has one."""
        shown = self._shown(doc)
        return new if shown is None else self.replaced(new, shown)

    def check(self, runs: Path, doc: Path) -> list[str]:
        """The lines of ``doc``'s section that differ from what ``runs`` render (empty: they match)."""
        shown = self._shown(doc.read_text())
        if shown is None:
            return [f"{doc} has no {self.name} section"]
        have, want = shown.splitlines(), self.text(read_runs(runs)).splitlines()
        differ = [f"{doc}: {a!r} != rendered {b!r}" for a, b in zip(have, want, strict=False) if a != b]
        return differ or ([f"{doc}: {len(have)} lines, rendered {len(want)}"] if len(have) != len(want) else [])


def log_log_axes() -> tuple[Any, Any]:
    """A figure and its axes for a section's log-log plot (matplotlib imported here, without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 4))


def save_log_log(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str) -> None:
    import matplotlib.pyplot as plt

    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_runs(path: Path) -> list[Record]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(
    section: RenderedSection,
    doc: str,
    collect: Callable[[int, int], list[Record]],
    draw: Callable[[Any, Path], None],
    figure: str,
    steps: int,
    argv: list[str] | None,
) -> None:
    """The command line of an experiment whose results are ``section`` of ``doc``: run ``collect(seeds, steps)``,
    keep its raw runs, draw ``figure`` (under the page's ``figures/``) and rewrite the section; or ``--check``."""
    parser = command.parser(section.command, doc)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--runs", type=Path, default=Path(section.runs))
    parser.add_argument("--doc", type=Path, default=Path("docs/theory.md"))
    parser.add_argument("--check", action="store_true", help="compare the section with its raw runs; run nothing")
    args = parser.parse_args(argv)
    if args.check:
        _check(parser, section, args)
        return
    if args.seeds < 1 or args.steps < 8:
        parser.error(f"--seeds {args.seeds} --steps {args.steps}: at least 1 seed and 8 steps")
    records = collect(args.seeds, args.steps)
    checkpoint.atomic_write(args.runs, "".join(json.dumps(r) + "\n" for r in records).encode())
    lines, drawn = section.render(records)
    (args.doc.parent / "figures").mkdir(parents=True, exist_ok=True)
    draw(drawn, args.doc.parent / "figures" / figure)
    page = args.doc.read_text() if args.doc.is_file() else "# Theory made measurable\n"
    checkpoint.atomic_write(args.doc, section.replaced(page, section.text(records)).encode())
    print("\n".join(lines))


def _check(parser: argparse.ArgumentParser, section: RenderedSection, args: argparse.Namespace) -> None:
    if not args.runs.is_file() or not args.doc.is_file():
        parser.error(f"--check needs {args.runs} and {args.doc}")
    problems = section.check(args.runs, args.doc)
    if problems:
        parser.exit(1, "\n".join(problems) + "\n")
    print(f"{args.doc}: the {section.name} section matches {args.runs}")
