"""comm.peak_step_bytes: the most bytes any one step sent, next to comm.bytes and comm.rounds, on both engines (the
gloo tests compare every CommStats field with the simulator's), in checkpoints, log records and run tables."""

from __future__ import annotations

import json

import pytest
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd

N = 4
FLOAT = 4  # bytes per fp32 value


def _run(steps: int = 8, **options) -> prsgd.Simulator:
    sim = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, **options)
    for x, y in batches(N, steps):
        sim.step(x, y, F.cross_entropy)
    return sim


PARAMS = sum(p.numel() for p in mlp().parameters())


@pytest.mark.parametrize(
    "options, peak, total",
    [
        (dict(period=4), 2 * PARAMS * FLOAT, 2 * 2 * PARAMS * FLOAT),  # params + momentum, rounds after 4 and 8
        (dict(sync="params_only", period=4), PARAMS * FLOAT, 2 * PARAMS * FLOAT),
        (dict(sync="gradients"), PARAMS * FLOAT, 8 * PARAMS * FLOAT),  # every step the same
        (dict(period=4, inner_period=2, nodes=2), 2 * PARAMS * FLOAT, 4 * 2 * PARAMS * FLOAT),  # one round a step
        (dict(sync="params_only", period=4, overlap=1), PARAMS * FLOAT, PARAMS * FLOAT),  # counted when waited for
    ],
    ids=["alg1", "params_only", "gradients", "hierarchical", "overlap"],
)
def test_the_peak_is_the_most_one_step_sent(options, peak, total):
    sim = _run(**options)
    assert sim.comm.bytes == total and sim.comm.peak_step_bytes == peak


def test_an_overlapped_round_counts_in_the_step_that_waits_for_it():
    """overlap = period: the round started after step 4 is waited for after step 8, before the next one starts (which
    is not counted until it is waited for, after step 12)."""
    sim = _run(sync="params_only", period=4, overlap=4)
    assert sim.comm.rounds == 1 and sim.comm.peak_step_bytes == PARAMS * FLOAT
    sim = _run(steps=12, sync="params_only", period=4, overlap=4)
    assert sim.comm.rounds == 2 and sim.comm.peak_step_bytes == PARAMS * FLOAT


def test_synchronize_counts_as_a_step_of_its_own_and_the_peak_survives_a_checkpoint():
    sim = _run(steps=1, period=100)
    assert sim.comm.peak_step_bytes == 0
    sim.synchronize()
    assert sim.comm.peak_step_bytes == 2 * PARAMS * FLOAT
    again = prsgd.Simulator(mlp(), num_workers=N, lr=0.1, momentum=0.9, period=100)
    again.load_state_dict(sim.state_dict())
    assert again.comm == sim.comm
    older = sim.state_dict()
    del older["prsgd"]["peak_step_bytes"]  # a checkpoint written before the peak was counted
    again.load_state_dict(older)
    assert again.comm.peak_step_bytes == 0 and again.comm.bytes == sim.comm.bytes


def test_log_records_the_summary_line_and_the_run_table_carry_the_peak(tmp_path, capsys):
    from prsgd.experiments.report import discover, summary_table
    from prsgd.train import main

    out = tmp_path / "run"
    flags = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--workers", "2", "--period", "4"]
    main([*flags, "--epochs", "0.2", "--evals", "2", "--no-progress", "--out", str(out)])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["comm_peak_step_bytes"] > 0
    assert records[-1]["comm_peak_step_bytes"] * records[-1]["comm_rounds"] == records[-1]["comm_bytes"]
    assert "MiB in one step" in capsys.readouterr().out
    table = summary_table(discover([out]))
    assert "peak MB / step" in table and f"| {records[-1]['comm_peak_step_bytes'] / 1e6:.2f} |" in table
