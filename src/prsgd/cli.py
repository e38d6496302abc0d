"""The ``prsgd`` command: ``prsgd train ...`` and ``prsgd demo ...`` (the same as ``python -m prsgd.train|demo``)."""

from __future__ import annotations

import sys

from prsgd import demo, train

COMMANDS = {"train": train.main, "demo": demo.main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        sys.exit(f"usage: prsgd {{{','.join(COMMANDS)}}} [options]; got {given}")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
