"""The argument parser every ``prsgd`` command starts from: named as the user typed it, described by the first line
of its module's docstring (reStructuredText's double backticks dropped, as ``--help`` shows plain text)."""

from __future__ import annotations

import argparse


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    description = (doc or "").strip().split("\n")[0].replace("``", "")
    return argparse.ArgumentParser(prog=prog, description=description)
