"""prsgd predict: the cost model against hand-computed cases (ring all-reduce moves 2(N-1)/N of the payload, latency
terms, overlap hiding), the units people write, the traced collectives against what a run counts, and the command's
errors (one line each, before any work)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd
from prsgd.algorithm.contract import Collective
from prsgd.data import load_dataset
from prsgd.errors import InvalidArgument
from prsgd.planning.cost_model import Layout, Profile, collective_seconds, failure_cost, predict, step_seconds
from prsgd.planning.network import Network, parse_bandwidth, parse_duration

MB_PER_S = Network(bandwidth=8e6, goodput=1.0)  # 1e6 payload bytes per second, no latency


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_all_reduce_sends_2_n_minus_1_over_n_of_the_payload_and_pays_2_n_minus_1_latencies(n):
    size = 1_200_000
    assert collective_seconds(Collective("all_reduce", size), Layout(n, n), MB_PER_S) == pytest.approx(
        2 * (n - 1) / n * size / 1e6
    )
    slow = Network(bandwidth=8e6, latency=1e-3, goodput=1.0)
    assert collective_seconds(Collective("all_reduce", size), Layout(n, n), slow) == pytest.approx(
        2 * (n - 1) / n * size / 1e6 + 2 * (n - 1) * 1e-3
    )


def test_all_gather_sends_each_row_to_every_other_worker_and_point_to_point_shares_the_link():
    row = 50_000
    assert collective_seconds(Collective("all_gather", row), Layout(4, 4), MB_PER_S) == pytest.approx(3 * row / 1e6)
    lat = Network(bandwidth=8e6, latency=2e-3, goodput=1.0)
    assert collective_seconds(Collective("all_gather", row), Layout(4, 4), lat) == pytest.approx(3 * (row / 1e6 + 2e-3))
    # gossip: 'bytes' is already the sum over out-neighbours; one latency (the sends go at once)
    assert collective_seconds(Collective("p2p", 2 * row), Layout(8, 8), lat) == pytest.approx(2 * row / 1e6 + 2e-3)


def test_the_goodput_share_and_bit_rates_in_bytes():
    link = Network(bandwidth=100e6)  # 100 Mbit/s, TCP over Ethernet by default
    expected = 2 * 1 / 2 * 1e6 / (100e6 / 8 * 1448 / 1514)
    assert collective_seconds(Collective("all_reduce", 1_000_000), Layout(2, 2), link) == pytest.approx(expected)


def test_rounds_within_a_node_use_its_links_and_rounds_across_nodes_the_slowest():
    net = Network(bandwidth=8e6, latency=1e-3, intra_bandwidth=80e6, intra_latency=1e-5, goodput=1.0)
    layout = Layout(workers=8, nodes=2)  # 4 workers per node
    size = 400_000
    inner = collective_seconds(Collective("all_reduce", size, "node"), layout, net)
    assert inner == pytest.approx(2 * 3 * (size / 4 / 1e7 + 1e-5))
    outer = collective_seconds(Collective("all_reduce", size), layout, net)  # a ring over 8 crosses node links
    assert outer == pytest.approx(2 * 7 * (size / 8 / 1e6 + 1e-3))
    assert collective_seconds(Collective("all_reduce", size, "node"), Layout(8, 8), net) == 0.0  # 1 per node
    one_node = collective_seconds(Collective("all_reduce", size), Layout(4, 1), net)
    assert one_node == pytest.approx(2 * 3 * (size / 4 / 1e7 + 1e-5))


def test_an_overlapped_round_adds_only_what_exceeds_the_compute_it_runs_behind():
    layout, net = Layout(2, 2), MB_PER_S
    c = Collective("all_reduce", 5_000, overlapped=True)  # 2 * 1/2 * 5000 / 1e6 = 5 ms
    assert step_seconds([c], 1e-3, 2, layout, net) == pytest.approx((1e-3 + 3e-3, 3e-3))
    assert step_seconds([c], 1e-3, 5, layout, net) == pytest.approx((1e-3, 0.0))
    plain = Collective("all_reduce", 5_000)
    assert step_seconds([plain], 1e-3, 5, layout, net) == pytest.approx((6e-3, 5e-3))


def _profile(cycle, compute_s=2e-3, steps=400, delay=0, period=4, workers=2):
    return Profile(steps, compute_s, cycle, delay, period, Layout(workers, workers), 1_000_000, 100)


def test_a_prediction_is_the_mean_step_of_the_cycle_times_the_steps():
    size = 20_000  # 20 ms over 1 MB/s with N = 2
    found = predict(_profile([[], [], [], [Collective("all_reduce", size)]]), MB_PER_S)
    per_step = (4 * 2e-3 + 20e-3) / 4
    assert found.seconds_per_step == pytest.approx(per_step)
    assert found.train_s == pytest.approx(400 * per_step)
    assert found.compute_utilization == pytest.approx(2e-3 / per_step)
    assert found.bytes_per_step == size / 4 and found.peak_step_bytes == size
    assert found.communication_s == pytest.approx(100 * 20e-3)
    assert found.rounds_per_step == 0.25


def test_failures_cost_a_restart_and_redone_steps_or_a_live_recovery():
    profile = _profile([[], [], [], [Collective("all_reduce", 20_000)]], workers=4)
    profile = Profile(400, 2e-3, profile.cycle, 0, 4, Layout(4, 4), 1_000_000, 100)
    found = predict(profile, MB_PER_S)
    cost = failure_cost(profile, found, MB_PER_S, mtbf_s=3600.0, restart_s=60.0)
    failures = 4 * found.train_s / 3600
    assert cost["failures"] == pytest.approx(failures)
    assert cost["restart_s"] == pytest.approx(failures * (60 + 50 * found.seconds_per_step))
    live = 60 / 4 + 1_000_000 / 1e6 + 4 * found.seconds_per_step / 2 / 4
    assert cost["live_recovery_s"] == pytest.approx(failures * live)


def test_units_people_write():
    assert parse_bandwidth("--bandwidth", "100Mbit") == 100e6
    assert parse_bandwidth("--bandwidth", "1Gbps") == 1e9
    assert parse_bandwidth("--bandwidth", "12.5MB/s") == 100e6
    assert parse_bandwidth("--bandwidth", "400gbit") == 400e9
    assert parse_duration("--latency", "0.1ms") == pytest.approx(1e-4)
    assert parse_duration("--latency", "50us") == pytest.approx(5e-5)
    assert parse_duration("--mtbf", "6h") == 6 * 3600
    assert parse_duration("--latency", "0s") == 0.0


@pytest.mark.parametrize(
    ("flag", "text", "says"),
    [
        ("--bandwidth", "100", "needs a number and a unit (no unit)"),
        ("--bandwidth", "100furlongs", "unit 'furlongs'"),
        ("--bandwidth", "0Mbit", "above zero"),
        ("--bandwidth", "-5Mbit", "below zero"),
        ("--latency", "-1ms", "below zero"),
        ("--latency", "0.1", "no unit"),
        ("--latency", "fast", "needs a number"),
    ],
)
def test_bad_units_are_one_clear_error(flag, text, says):
    parse = parse_bandwidth if flag == "--bandwidth" else parse_duration
    with pytest.raises(InvalidArgument, match=flag) as error:
        parse(flag, text)
    assert says in str(error.value)


@pytest.mark.parametrize(
    ("options", "kinds"),
    [
        (dict(sync="gradients"), [("all_reduce", "all", False)] * 8),
        (dict(period=4), [None, None, None, ("all_reduce", "all", False)] * 2),
        (dict(period=4, compression="int8"), [None, None, None, ("all_reduce", "all", False)] * 2),
        (dict(period=4, compression="topk:0.1"), [None, None, None, ("all_gather", "all", False)] * 2),
        (dict(period=4, overlap=1), [None, None, None, None, ("all_reduce", "all", True), None, None, None]),
        (dict(period=2, fragments=2), [("all_reduce", "all", False)] * 8),
        (
            dict(period=4, inner_period=2, nodes=2),
            [None, ("all_reduce", "node", False), None, ("all_reduce", "all", False)] * 2,
        ),
        (dict(sync="gossip", topology="ring"), [("p2p", "all", False)] * 8),
    ],
)
def test_the_trace_holds_each_counted_round_as_the_engine_sent_it(options, kinds):
    """Kind, scope and overlap of every round, step by step, and the trace adds up to the counts (the distributed
    engine's trace equals the simulator's: tests/test_distributed.py)."""
    sim = prsgd.Simulator(mlp(), num_workers=4, lr=0.1, momentum=0.9, **options)
    sim.comm.trace = [[]]
    for x, y in batches(4, 8):
        sim.step(x, y, F.cross_entropy)
    trace = sim.comm.trace[:8]
    assert [(s[0].kind, s[0].scope, s[0].overlapped) if s else None for s in trace] == kinds
    assert sum(c.bytes for s in trace for c in s) == sim.comm.bytes
    assert sum(map(len, trace)) == sim.comm.rounds
    assert max(sum(c.bytes for c in s) for s in trace) == sim.comm.peak_step_bytes


def predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prsgd", "predict", *args], capture_output=True, text=True, timeout=300, check=False
    )


TINY = ["--dataset", "digits", "--model", "mlp", "--hidden", "16", "--workers", "4", "--epochs", "1"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--bandwidth", "100"], "--bandwidth '100': a bandwidth needs a number and a unit"),
        (["--bandwidth", "1Gbit", "--latency=-1ms"], "--latency '-1ms': a duration cannot be below zero"),
        (["--bandwidth", "1Gbit", "--nodes", "3"], "--nodes 3 does not divide the 4 workers"),
        (["--bandwidth", "1Gbit", "--mtbf", "6h"], "--mtbf and --restart-s go together"),
        (["--bandwidth", "1Gbit", "--mtbf", "0s", "--restart-s", "1"], "--mtbf '0s'"),
        (["--bandwidth", "1Gbit", "--step-s", "0"], "--step-s 0.0"),
        (["--bandwidth", "1Gbit", "--step-s", "inf"], "--step-s inf"),
        (["--bandwidth", "1Gbit", "--mtbf", "6h", "--restart-s", "nan"], "--restart-s nan"),
        (["--bandwidth", "1Gbit", "--fault-tolerant"], "--fault-tolerant: the quorum"),
        (["--bandwidth", "1Gbit", "--engine", "simulator"], "--engine simulator: prsgd predict times a distributed"),
        (["--bandwidth", "1Gbit", "--local-workers", "1"], "--local-workers 1"),
        (["--bandwidth", "1Gbit", "--period", "0"], "period=0 is not allowed"),
        (["--bandwidth", "1Gbit", "--compression", "int3"], "compression"),
    ],
)
def test_bad_input_is_one_error_line_before_any_work(args, says):
    out = predict_cli(*TINY, *args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prsgd predict: error: "), out.stderr
    assert says in lines[0], lines[0]


@pytest.mark.slow
def test_predict_json_counts_the_bytes_a_real_run_sends(tmp_path):
    """The predicted bytes per step, times the steps, are what the same run logs (here on the simulator, whose
    counts equal a distributed run's); training time is compute plus communication on the given link."""
    flags = [*TINY, "--period", "4", "--fragments", "2", "--compression", "int8", "--batch-size", "8"]
    out = predict_cli(*flags, "--bandwidth", "100Mbit", "--latency", "0.1ms", "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    for key in ("train_s", "seconds_per_step", "compute_utilization", "bytes_per_step", "peak_step_bytes"):
        assert key in found
    steps = found["steps"]
    train_size = len(load_dataset("digits", "", seed=0).train)
    assert steps == -(-train_size // (4 * 8))  # one joint epoch
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "prsgd",
            "train",
            *flags,
            "--evals",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    final = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    cycles, rest = divmod(steps, 4)  # a round's two fragments go after steps 2 and 4 of each period
    assert rest < 2  # 45 steps: the last period's first step sends nothing
    assert final["comm_bytes"] == cycles * 4 * found["bytes_per_step"]
    assert final["comm_peak_step_bytes"] == found["peak_step_bytes"]
    assert found["train_s"] == pytest.approx(steps * found["seconds_per_step"])
    assert found["seconds_per_step"] > found["compute_s_per_step"] > 0
    given = [*flags, "--step-s", "0.001", "--json"]
    slow, fast = (json.loads(predict_cli(*given, "--bandwidth", rate).stdout) for rate in ("10Mbit", "100Mbit"))
    assert slow["compute_s_per_step"] == fast["compute_s_per_step"] == 0.001
    assert slow["communication_s"] == pytest.approx(10 * fast["communication_s"])  # no latency: bytes / rate
    assert slow["train_s"] == pytest.approx(steps * 0.001 + slow["communication_s"])


def test_tune_candidates_are_every_valid_combination_up_to_half_the_run():
    from prsgd.planning.tune import candidates
    from prsgd.training.config import RunConfig

    found = candidates(RunConfig(), steps=20)  # periods 2, 4, 8 (16 > 20 / 2)
    names = [c.name for c in found]
    assert names[0] == "--sync gradients"
    assert found[0].flags == (
        "--sync",
        "gradients",
        "--period",
        "1",
        "--compression",
        "none",
        "--overlap",
        "0",
        "--fragments",
        "1",
    )  # every option spelled: none of the run's own is left in place
    assert "--sync params_and_momentum --period 8 --compression int4 --overlap 1 --fragments 2" in names
    assert not any("--period 16" in n for n in names)
    # overlap 1 with 2 fragments of period 2: a fragment's share is 1 step, overlap 1 fits; all 2 x 4 x 2 x 2 + 1
    assert len(names) == len(set(names)) == 1 + 3 * 4 * 2 * 2
    for c in found:
        c.config.algorithm.round_spec()  # each one a valid run
    adamw = candidates(RunConfig().with_overrides({"algorithm.sync": "params_only"}), steps=8)
    assert {c.config.algorithm.sync for c in adamw} == {"gradients", "params_only"}


@pytest.mark.parametrize(("text", "value"), [("2%", 0.02), ("0.5%", 0.005), ("0.03", 0.03), ("0%", 0.0)])
def test_loss_budget(text, value):
    from prsgd.planning.tune import parse_budget

    assert parse_budget(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1%", "two", "nan", "%"])
def test_bad_loss_budget(text):
    from prsgd.planning.tune import parse_budget

    with pytest.raises(InvalidArgument, match="--loss-budget"):
        parse_budget(text)


def test_tune_command_line_keeps_the_run_and_drops_the_network():
    from prsgd.planning.tune import Candidate, command_line
    from prsgd.training.config import RunConfig

    argv = ["--dataset", "digits", "--workers", "4", "--bandwidth", "100Mbit", "--latency=1ms", "--json", "--lr", "0.1"]
    argv += ["--compression", "bf16"]  # the run's own: the choice's --compression none comes after it
    flags = ("--sync", "params_and_momentum", "--period", "8", "--compression", "none", "--overlap", "0")
    choice = Candidate((*flags, "--fragments", "1"), RunConfig())
    assert choice.name == "--sync params_and_momentum --period 8"
    assert command_line(argv, choice) == (
        "prsgd train --engine distributed --dataset digits --workers 4 --lr 0.1 --compression bf16 "
        "--sync params_and_momentum --period 8 --compression none --overlap 0 --fragments 1"
    )


@pytest.mark.slow
def test_tune_ranks_by_predicted_time_and_picks_the_fastest_checked_within_the_loss_budget():
    """With another device's compute (--step-s: no timing here) on a slow link, the ranking is the cost model's
    order; a binary search over periods runs exact-round candidates on the simulator, then faster ones; the choice is
    the fastest checked within budget, any checked candidate ranked above it was over budget, and it is no slower
    than the exact-round candidate the search found within budget."""
    args = [*TINY, "--batch-size", "8", "--epochs", "3", "--bandwidth", "10Mbit", "--step-s", "0.001"]
    out = subprocess.run(
        [sys.executable, "-m", "prsgd", "tune", *args, "--loss-budget", "5%", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    ranked = found["ranked"]
    times = [r["train_s"] for r in ranked]
    assert times == sorted(times)
    gradients = next(r for r in ranked if r["flags"][:2] == ["--sync", "gradients"])
    assert gradients["train_s"] > 3 * ranked[0]["train_s"]  # every step at 10 Mbit/s
    chosen = next(i for i, r in enumerate(ranked) if r["flags"] == found["choice"])
    assert ranked[chosen]["loss_change"] <= 0.05
    assert all(r["loss_change"] is None or r["loss_change"] > 0.05 for r in ranked[:chosen])
    checked = [r for r in ranked if r["loss_change"] is not None]
    assert 2 <= len(checked) <= 1 + 2 + 6  # gradients, a binary search over 3 periods, at most 6 faster ones
    exact = [i for i, r in enumerate(ranked) if r["loss_change"] is not None and "none" in r["flags"]]
    assert any(i >= chosen and ranked[i]["loss_change"] <= 0.05 for i in exact)  # the choice is no slower
