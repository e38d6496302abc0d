"""The ``prsgd`` command: ``run`` (a config), ``plot`` (finished runs), ``results`` (docs/results.md's tables),
``train`` (flags), ``demo``, ``theory``."""

from __future__ import annotations

import sys

from prsgd import demo, plot, results, runner, theory, train
from prsgd.errors import PrsgdError

COMMANDS = {
    "run": runner.main,
    "plot": plot.main,
    "results": results.main,
    "train": train.main,
    "demo": demo.main,
    "theory": theory.main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        sys.exit(f"usage: prsgd {{{','.join(COMMANDS)}}} [options]; got {given}")
    try:
        COMMANDS[argv[0]](argv[1:])
    except (PrsgdError, FileNotFoundError) as error:
        sys.exit(f"prsgd {argv[0]}: error: {error}")


if __name__ == "__main__":
    main()
