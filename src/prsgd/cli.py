"""The ``prsgd`` command: ``run`` (a config), ``plot`` (finished runs), ``results`` (docs/results.md's tables),
``train`` (flags), ``demo``, ``theory``."""

from __future__ import annotations

import sys

from prsgd import demo, plot, results, runner, theory, train
from prsgd.errors import user_error

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
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        sys.exit(f"prsgd {argv[0]}: error: {message}")


if __name__ == "__main__":
    main()
