"""``prsgd tune``: the period, compression, overlap and fragments that train fastest on a given network within a
loss budget, ranked by ``prsgd predict``'s cost model and checked by short simulator runs on the run's own model
and data; ends with the command line to run.

    prsgd tune --dataset fashion_mnist --model cnn --workers 8 --bandwidth 100Mbit --loss-budget 2%
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass, replace

from prsgd.errors import InvalidArgument, exit_on_user_error
from prsgd.planning.cost_model import Prediction, predict
from prsgd.planning.predict import Question, add_network_arguments, question
from prsgd.training import command
from prsgd.training.config import ConfigError, RunConfig

PERIODS = (2, 4, 8, 16, 32, 64)
COMPRESSIONS = ("none", "bf16", "int8", "int4")
LOSS_STEPS = 2000
"""The longest simulator run a loss check takes by default."""
OVERLAPS = (0, 1)
FRAGMENTS = (1, 2)
OFF = (("--period", "1"), ("--compression", "none"), ("--overlap", "0"), ("--fragments", "1"))
"""Flag values that leave an option off (a candidate's name leaves them out)."""
NETWORK_FLAGS = {"--bandwidth", "--latency", "--intra-bandwidth", "--intra-latency", "--step-s", "--local-workers"}
TUNE_FLAGS = {"--loss-budget", "--loss-steps", "--json", "--mtbf", "--restart-s", *NETWORK_FLAGS}


@dataclass(frozen=True)
class Candidate:
    """One setting of the round options: its flags (as ``prsgd train`` takes them), the run config, and once
    known its prediction and its loss change vs every-step gradients (a short simulator run)."""

    flags: tuple[str, ...]
    config: RunConfig
    prediction: Prediction | None = None
    loss_change: float | None = None

    @property
    def name(self) -> str:
        """The flags that differ from off (the command line spells every one, so that none of the run's own
        round options is left in place)."""
        pairs = zip(self.flags[::2], self.flags[1::2], strict=True)
        return " ".join(f"{k} {v}" for k, v in pairs if (k, v) not in OFF)


def candidates(base: RunConfig, steps: int) -> list[Candidate]:
    """Every-step gradients, and the base's periodic rule (Algorithm 1 unless it names another averaging rule) at
    each period up to half the run, with each compression, overlap and fragment count the round spec allows."""
    sync = base.algorithm.sync if base.algorithm.sync not in ("gradients", "none") else "params_and_momentum"
    found = [_candidate(base, ("--sync", "gradients", "--period", "1", *_off_flags()))]
    for period in (p for p in PERIODS if 2 * p <= steps):
        for compression in COMPRESSIONS:
            for overlap in OVERLAPS:
                for fragments in FRAGMENTS:
                    flags = ("--sync", sync, "--period", str(period), "--compression", compression)
                    flags += ("--overlap", str(overlap), "--fragments", str(fragments))
                    candidate = _candidate(base, flags)
                    if candidate is not None:
                        found.append(candidate)
    return [c for c in found if c is not None]


def _off_flags() -> tuple[str, ...]:
    return tuple(x for pair in OFF if pair[0] != "--period" for x in pair)


def _candidate(base: RunConfig, flags: tuple[str, ...]) -> Candidate | None:
    values = dict(zip(flags[::2], flags[1::2], strict=True))
    overrides = {f"algorithm.{flag[2:]}": value for flag, value in values.items()}
    try:
        config = base.with_overrides(overrides)
        config.algorithm.round_spec()
    except (ConfigError, InvalidArgument):
        return None  # a combination the round spec refuses (e.g. overlap longer than a fragment's share)
    return Candidate(flags, config)


def loss_after(config: RunConfig, steps: int, train_size: int) -> float:
    """The training loss after ``steps`` steps of ``config`` on the simulator (its N workers, its data of
    ``train_size`` examples)."""
    from prsgd.training.train import run

    per_epoch = config.training.workers * config.training.batch_size
    epochs = steps * per_epoch / train_size
    short = config.with_overrides(
        {"engine": "simulator", "training.epochs": epochs, "training.evals": 1, "out": "", "progress": False}
    )
    return run(short)[-1]["train_loss"]


def parse_budget(text: str) -> float:
    """``"2%"`` or ``"0.02"`` -> 0.02; :class:`InvalidArgument` for anything else or a budget below zero."""
    value = text.strip()
    try:
        budget = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise InvalidArgument(
            f"--loss-budget {text!r}: allowed: a percentage like 2% (or a fraction like 0.02)"
        ) from None
    if not math.isfinite(budget) or budget < 0:
        raise InvalidArgument(f"--loss-budget {text!r}: allowed: a percentage >= 0, like 2%")
    return budget


def rank(q: Question, budget: float, loss_steps: int | None, checks: int = 6) -> list[Candidate]:
    """Every candidate predicted, fastest first, and the loss of a few run on the simulator (``loss_steps`` steps,
    by default the run's own up to :data:`LOSS_STEPS`; every-step gradients as the reference). First a binary
    search over the periods, on each period's fastest candidate with exact rounds, for the longest period P whose
    loss stays within ``budget`` (the loss grows with the period, the time falls); then up to ``checks`` candidates
    predicted faster than that one, at periods up to P (compressed, overlapped, fragmented), fastest first, until one
    is within budget. The choice is the fastest checked candidate within budget: :func:`choice`."""
    from prsgd.planning.calibration import prepare, profile_of, trace

    setting = prepare(q.config)
    found = candidates(setting.config, setting.steps)
    traced = [trace(setting, c.config) for c in found]
    timings = _timings(q, [c.config for c in found], traced)
    predicted = [
        replace(c, prediction=predict(profile_of(setting, c.config, q.layout, timing, t), q.network))
        for c, timing, t in zip(found, timings, traced, strict=True)
    ]
    predicted.sort(key=lambda c: c.prediction.train_s)
    steps = min(setting.steps, loss_steps or LOSS_STEPS)
    size = len(setting.data.train)
    reference = loss_after(found[0].config, steps, size)  # every-step gradients

    def period(c: Candidate) -> int:
        return 1 if c.config.algorithm.sync == "gradients" else int(c.config.algorithm.period)

    def check(i: int) -> bool:
        change = loss_after(predicted[i].config, steps, size) / reference - 1
        predicted[i] = replace(predicted[i], loss_change=change)
        return change <= budget

    # the longest period whose fastest exact-round candidate keeps the loss within budget (binary search)
    periods = sorted({period(c) for c in predicted})
    exact = {
        p: next(i for i, c in enumerate(predicted) if period(c) == p and c.config.algorithm.compression in ("", "none"))
        for p in periods
    }
    predicted[exact[1]] = replace(predicted[exact[1]], loss_change=0.0)  # gradients: the reference itself
    low, high = 0, len(periods) - 1
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if check(exact[periods[middle]]) else (low, middle - 1)
    # then, fastest first, the candidates faster than it at no longer a period, until one is within budget
    bound = exact[periods[low]]
    for i in [i for i in range(bound) if period(predicted[i]) <= periods[low]][:checks]:
        if predicted[i].loss_change is None and check(i):
            break
    return predicted


def choice(ranked: list[Candidate], budget: float) -> Candidate:
    """The fastest candidate whose loss was checked and found within ``budget`` (every-step gradients at worst)."""
    return next(c for c in ranked if c.loss_change is not None and c.loss_change <= budget)


def _options(config: RunConfig) -> tuple:
    a = config.algorithm
    return (a.sync == "gradients", a.compression, a.overlap, a.fragments)


def _timings(q: Question, configs: list[RunConfig], traced: list) -> list:
    """Each candidate's :class:`prsgd.planning.calibration.Timing`: compute, and the rounds' own cost measured
    once per combination of options (at its shortest period, in one loopback session) and scaled by the
    candidate's collectives per step; every candidate's bare collectives. ``--step-s``: compute only."""
    from prsgd.planning.calibration import Timing, keys, time_steps

    if q.step_s is not None:
        return [Timing(q.step_s, 0.0) for _ in configs]
    probes: dict[tuple, int] = {}
    for i, config in enumerate(configs):
        probes.setdefault(_options(config), i)  # candidates come shortest period first
    wanted = [set() for _ in probes]
    slot = {key: n for n, key in enumerate(probes)}
    for config, (cycle, _) in zip(configs, traced, strict=True):
        wanted[slot[_options(config)]] |= keys(cycle)
    measured = time_steps([configs[i] for i in probes.values()], q.local_workers, wanted, timed_s=1.0)

    def per_collective(i: int, timing: Timing) -> float:
        cycle = traced[i][0]
        return timing.overhead_s * len(cycle) / max(1, sum(map(len, cycle)))

    costs = {key: per_collective(i, t) for (key, i), t in zip(probes.items(), measured, strict=True)}
    timings = []
    for config, (cycle, _) in zip(configs, traced, strict=True):
        timing = measured[slot[_options(config)]]
        overhead = costs[_options(config)] * sum(map(len, cycle)) / len(cycle)
        timings.append(Timing(timing.compute_s, overhead, timing.bare_s))
    return timings


def command_line(argv: list[str], choice: Candidate) -> str:
    """``prsgd train`` with the user's own run flags (network and tune flags dropped) and the choice's."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in TUNE_FLAGS:
            skip = "=" not in arg and name != "--json"
            continue
        kept.append(arg)
    return shlex.join(["prsgd", "train", "--engine", "distributed", *kept, *choice.flags])


def table(ranked: list[Candidate], budget: float, chosen: Candidate, top: int = 5) -> str:
    """The ``top`` fastest, every candidate whose loss was checked, and the choice (marked), in rank order."""
    lines = [
        "| rank | options | predicted time (s) | compute utilization | MB / worker | loss vs gradients |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for i, c in enumerate(ranked, 1):
        if i > top and c.loss_change is None:
            continue
        p = c.prediction
        loss = "not run" if c.loss_change is None else f"{100 * c.loss_change:+.1f}%"
        if c.loss_change is not None and c.loss_change > budget:
            loss += " (over budget)"
        name = f"**{c.name}** (choice)" if c is chosen else c.name
        mb = p.bytes_per_step * p.train_s / p.seconds_per_step / 1e6
        lines.append(f"| {i} | {name} | {p.train_s:.2f} | {100 * p.compute_utilization:.0f}% | {mb:.1f} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = command.parser("prsgd tune", __doc__)
    add_network_arguments(parser)
    parser.add_argument("--loss-budget", default="2%", help="the largest loss increase vs gradients (default 2%%)")
    parser.add_argument(
        "--loss-steps",
        type=int,
        help=f"steps of each simulator run for the loss (default: the run's, at most {LOSS_STEPS})",
    )
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    args = parser.parse_args(argv)

    def run() -> None:
        q = question(args)
        budget = parse_budget(args.loss_budget)
        if args.loss_steps is not None and args.loss_steps < 1:
            raise InvalidArgument(f"--loss-steps {args.loss_steps}: allowed: an integer >= 1")
        ranked = rank(q, budget, args.loss_steps)
        chosen = choice(ranked, budget)
        if args.json:
            rows = [{"flags": list(c.flags), **c.prediction.as_dict(), "loss_change": c.loss_change} for c in ranked]
            print(json.dumps({"ranked": rows, "choice": list(chosen.flags)}))
            return
        print(table(ranked, budget, chosen))
        print(f"first choice ({100 * chosen.loss_change:+.1f}% training loss vs every-step gradients, simulated):")
        print(command_line(argv, chosen))

    exit_on_user_error("prsgd tune", run)
