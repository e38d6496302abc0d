"""Where a run's evaluation records go besides ``OUT/log.jsonl``: ``--logger csv`` and ``--logger tensorboard``.

``log.jsonl`` is always written (with ``--out``): resuming and ``prsgd plot`` read it. The others are copies for the
tools people already use: ``OUT/log.csv`` (one row per record, header first) and TensorBoard event files in
``OUT/tensorboard`` (every numeric field of a record as a scalar at its ``step``; ``tensorboard --logdir OUT``).
For any other tracker (W&B, MLflow, ...) pass ``on_record`` to :func:`prsgd.train.run`: it gets each record as it
is made. A resumed run rewrites ``log.csv`` from the records it continues from and purges TensorBoard events from
the resumed step on, so no tracker shows the steps an interrupted attempt took after its last checkpoint twice.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path
from typing import Any, Protocol

from prsgd.training import checkpoint

LOGGERS = ("jsonl", "csv", "tensorboard")
Record = dict[str, Any]


def check_loggers(value: str) -> tuple[str, ...]:
    """The loggers listed in ``value`` (comma-separated), each known; the message names what is allowed. Raises
    ``ValueError`` (the config turns it into a :class:`prsgd.training.config.ConfigError`)."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names:
        raise ValueError(f"logger={value!r} is not known; allowed: a comma-separated list of {', '.join(LOGGERS)}")
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise ValueError(
            "logger=tensorboard needs the tensorboard package: pip install 'prsgd[tensorboard]' (with torch pinned, "
            "as scripts/bootstrap.sh does)"
        )
    return names


class Tracker(Protocol):
    def record(self, record: Record) -> None: ...

    def close(self) -> None: ...


class CsvTracker:
    """``OUT/log.csv``: the header, then one row per record; rewritten whole (atomically) at the start, and again
    when a record brings a field the header lacks (a run resumed from records an older prsgd wrote: their rows keep
    that column empty)."""

    def __init__(self, out: Path, earlier: list[Record]) -> None:
        self.path = out / "log.csv"
        self.records = list(earlier)
        self.fields: list[str] = list(dict.fromkeys(k for r in earlier for k in r))
        checkpoint.atomic_write(self.path, self._rows(self.records, header=True).encode())

    def _rows(self, records: list[Record], header: bool) -> str:
        if not records:
            return ""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fields, lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(records)
        return buffer.getvalue()

    def record(self, record: Record) -> None:
        self.records.append(record)
        new = [k for k in record if k not in self.fields]
        if new or len(self.records) == 1:
            self.fields += new
            checkpoint.atomic_write(self.path, self._rows(self.records, header=True).encode())
        else:
            checkpoint.append_line(self.path, self._rows([record], header=False).rstrip("\n"))

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files in ``OUT/tensorboard``: each numeric field of a record as the scalar of that name at the
    record's step; flushed at every record, so a killed run keeps what it logged."""

    def __init__(self, out: Path, purge_from: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=purge_from)

    def record(self, record: Record) -> None:
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_out_for(names: tuple[str, ...], out: str) -> None:
    """Loggers other than jsonl write files into ``--out``: refuse them without one."""
    if not out and set(names) - {"jsonl"}:
        raise ValueError(f"logger={','.join(names)} writes into the run's folder: set --out too")


def open_trackers(names: tuple[str, ...], out: Path, earlier: list[Record], purge_from: int | None) -> list[Tracker]:
    """The trackers ``names`` asks for besides ``jsonl`` (which the run writes itself), writing into ``out`` and
    continuing after the ``earlier`` records of a resumed run (``purge_from``: the first step the resumed run
    logs, whose TensorBoard events from an interrupted attempt are dropped; None for a fresh run)."""
    trackers: list[Tracker] = []
    if "csv" in names:
        trackers.append(CsvTracker(out, earlier))
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(out, purge_from))
    return trackers
