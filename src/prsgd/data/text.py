"""A byte-level language-modelling dataset from the Python standard library's own source files, offline.

Every Python installation carries its standard library as source: a fixed list of modules (:data:`TRAIN_MODULES`,
:data:`VALIDATION_MODULES`) is read from ``path`` (default: this interpreter's ``sysconfig`` stdlib folder), split
into train and validation by file, and cut into windows of ``context + 1`` bytes: an example's input is its first
``context`` bytes and its target the same window shifted by one (next-byte prediction; 256 classes). The text
depends on the Python version (the record of a run names the folder; the figures in docs/ were made with 3.11).

Each training window remembers its module (:attr:`~prsgd.data.types.ArraySplit.labels`), so the ``classes`` split
gives each worker whole modules: with ``classes_per_worker = 24 / N`` the workers hold disjoint sets of modules that
together cover all of them (non-identical data); ``identical`` and ``disjoint`` mix windows of every module.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from prsgd.data.types import ArraySplit, DataError, Dataset

TRAIN_MODULES = (
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "fractions.py",
    "functools.py",
    "gettext.py",
    "heapq.py",
    "json/decoder.py",
    "json/encoder.py",
    "pathlib.py",
    "pprint.py",
    "random.py",
    "shlex.py",
    "shutil.py",
    "statistics.py",
    "textwrap.py",
    "threading.py",
    "tokenize.py",
    "traceback.py",
    "uuid.py",
    "weakref.py",
)
"""The 24 training modules (about 0.8 MB in Python 3.11), paths relative to the stdlib folder."""

VALIDATION_MODULES = ("copy.py", "glob.py", "queue.py", "tempfile.py")
"""The held-out modules (about 60 kB in Python 3.11): validation is on files the workers never saw."""

CONTEXT = 64
"""Bytes of context per example."""


def stdlib_folder() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _windows(text: bytes, context: int) -> torch.Tensor:
    """Non-overlapping windows of ``context + 1`` bytes, shape (M, context + 1), int64; the tail is dropped."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    count = len(data) // (context + 1)
    return data[: count * (context + 1)].view(count, context + 1)


def _read(folder: Path, modules: tuple[str, ...], context: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows, labels = [], []
    for index, module in enumerate(modules):
        file = folder / module
        if not file.is_file():
            raise DataError(
                f"stdlib_text: expected the file {str(file)!r}, which does not exist; data.path must be a Python "
                "standard library folder (default: this interpreter's)"
            )
        w = _windows(file.read_bytes(), context)
        windows.append(w)
        labels.append(torch.full((len(w),), index, dtype=torch.int64))
    return torch.cat(windows), torch.cat(labels)


def load_stdlib_text(path: str = "", seed: int = 0, context: int = CONTEXT) -> Dataset:
    """The standard library's source as next-byte prediction: train on :data:`TRAIN_MODULES`, validate on
    :data:`VALIDATION_MODULES`, windows of ``context`` bytes (inputs and targets both int64, shape (context,))."""
    folder = Path(path) if path else stdlib_folder()
    if not folder.is_dir():
        raise DataError(f"stdlib_text: data.path={str(folder)!r} is not a folder (a Python standard library folder)")
    train, modules = _read(folder, TRAIN_MODULES, context)
    test, _ = _read(folder, VALIDATION_MODULES, context)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"stdlib_text: the files under {str(folder)!r} are shorter than one window of {context} bytes")
    return Dataset(
        "stdlib_text",
        ArraySplit(train[:, :-1].contiguous(), train[:, 1:].contiguous(), labels=modules),
        ArraySplit(test[:, :-1].contiguous(), test[:, 1:].contiguous()),
        256,
        (context,),
    )
