"""``--logger csv,tensorboard``: the copies of log.jsonl, read back with the csv module and TensorBoard's own
EventAccumulator, also across a resume."""

from __future__ import annotations

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from prsgd.train import main

SMALL = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--workers", "2", "--evals", "3", "--no-progress"]


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def tensorboard_scalars(out) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_copies_of_the_log(out):
    records = log(out)
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))

    def number(value):  # a field not measured yet (the drift before any round) is null in JSON, empty in CSV
        return None if value in (None, "") else float(value)

    assert [{k: number(v) for k, v in row.items()} for row in rows] == [
        {k: number(v) for k, v in r.items()} for r in records
    ]
    scalars = tensorboard_scalars(out)
    assert set(scalars) == {k for r in records for k, v in r.items() if v is not None} - {"step"}
    assert {"consensus_distance", "state_spread"} <= set(scalars)  # the runs here have rounds and momentum
    for name, points in scalars.items():
        logged = [r for r in records if r[name] is not None]  # TensorBoard takes numbers only
        assert [step for step, _ in points] == [r["step"] for r in logged], name
        assert [value for _, value in points] == pytest.approx([r[name] for r in logged], rel=1e-6), name


def test_csv_and_tensorboard_hold_every_record_also_after_a_resume(tmp_path):
    out = tmp_path / "run"
    main([*SMALL, "--epochs", "1", "--logger", "csv,tensorboard", "--out", str(out)])
    assert len(log(out)) == 4
    assert_copies_of_the_log(out)
    # the same run continued to 2 epochs: the trackers continue too, the step resumed from is not logged twice
    main([*SMALL, "--epochs", "2", "--logger", "jsonl,csv,tensorboard", "--out", str(out), "--resume"])
    assert [r["step"] for r in log(out)] == [0, 15, 30, 45, 60, 90]  # evals over 90 steps, after 45
    assert_copies_of_the_log(out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--logger", "wandb"], r"logger='wandb' is not known; allowed: a comma-separated list of jsonl, csv, tens"),
        (["--logger", "csv"], r"logger=csv writes into the run's folder: set --out too"),
    ],
)
def test_bad_loggers_are_refused_before_training(flags, message, tmp_path):
    with pytest.raises(SystemExit, match=f"prsgd train: error: {message}"):
        main([*SMALL, "--epochs", "1", *flags])
    assert not list(tmp_path.iterdir())


def test_csv_takes_a_field_the_earlier_records_lack_instead_of_failing(tmp_path):
    """A run resumed from records an older prsgd wrote (without the drift fields) keeps writing its CSV."""
    from prsgd.training.trackers import CsvTracker

    tracker = CsvTracker(tmp_path, [{"step": 0, "train_loss": 2.0}])
    tracker.record({"step": 5, "train_loss": 1.5, "consensus_distance": 0.25})
    tracker.record({"step": 10, "train_loss": 1.0, "consensus_distance": 0.5})
    with (tmp_path / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"step": "0", "train_loss": "2.0", "consensus_distance": ""},
        {"step": "5", "train_loss": "1.5", "consensus_distance": "0.25"},
        {"step": "10", "train_loss": "1.0", "consensus_distance": "0.5"},
    ]
