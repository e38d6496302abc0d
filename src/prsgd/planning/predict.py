"""``prsgd predict``: how long a distributed run will train on a given network, how much of it is communication,
and what failures would cost, from a short calibration on this machine (or ``--step-s`` for another device).

    prsgd predict --dataset digits --model mlp --workers 4 --period 8 --bandwidth 100Mbit --latency 0.1ms
    prsgd predict configs/fig1.toml --bandwidth 1Gbit --nodes 2 --intra-bandwidth 100Gbit --json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from prsgd.errors import InvalidArgument, exit_on_user_error
from prsgd.planning.cost_model import Layout, Prediction, Profile, failure_cost, predict
from prsgd.planning.network import Network, format_bandwidth, parse_bandwidth, parse_duration
from prsgd.training import command
from prsgd.training.config import RunConfig, load
from prsgd.training.flags import add_flat_arguments, from_flat_arguments


@dataclass(frozen=True)
class Question:
    """A checked ``prsgd predict`` (or ``tune``) command line: the run, the network, its layout, failures."""

    config: RunConfig
    network: Network
    layout: Layout
    step_s: float | None
    local_workers: int
    mtbf_s: float | None
    restart_s: float


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The run (a config file and/or ``prsgd train``'s flags) and the network flags ``predict`` and ``tune`` share."""
    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="a TOML run config (train flags override it)")
    net = parser.add_argument_group("network")
    net.add_argument("--bandwidth", required=True, help="each node's link, e.g. 100Mbit, 1Gbit, 12.5MB/s")
    net.add_argument("--latency", default="0s", help="one message's latency between nodes, e.g. 0.1ms (default 0s)")
    net.add_argument("--intra-bandwidth", help="links within a node (default: as --bandwidth)")
    net.add_argument("--intra-latency", help="latency within a node (default: as --latency)")
    net.add_argument("--step-s", type=float, help="one worker's compute per step in seconds (default: measured here)")
    net.add_argument(
        "--local-workers",
        type=int,
        default=2,
        help="workers the run puts on one machine, sharing its cores: the calibration runs that many here (default 2)",
    )
    net.add_argument("--mtbf", help="mean time between failures of one worker, e.g. 6h: the expected loss to them")
    net.add_argument("--restart-s", type=float, help="with --mtbf: seconds a failed worker takes to start again")
    add_flat_arguments(parser)


def question(args: argparse.Namespace) -> Question:
    """Every flag checked before any work: one :class:`prsgd.InvalidArgument` (or ConfigError) naming the bad one."""
    network = Network(
        bandwidth=parse_bandwidth("--bandwidth", args.bandwidth),
        latency=parse_duration("--latency", args.latency),
        intra_bandwidth=parse_bandwidth("--intra-bandwidth", args.intra_bandwidth) if args.intra_bandwidth else None,
        intra_latency=parse_duration("--intra-latency", args.intra_latency) if args.intra_latency else None,
    )
    base = load(args.config_file) if args.config_file else RunConfig()
    base = base.with_overrides({"engine": "distributed"})  # what is predicted: one process per worker
    # train's --nodes groups workers for hierarchical rounds (it needs inner_period there); here it is also the
    # layout of any run
    hierarchical = args.inner_period is not None or bool(base.algorithm.inner_period)
    config = from_flat_arguments(args if hierarchical else argparse.Namespace(**{**vars(args), "nodes": None}), base)
    if config.engine != "distributed":
        raise InvalidArgument(
            f"--engine {config.engine}: prsgd predict times a distributed run (one process per worker); leave it out"
        )
    if config.fault_tolerant:
        raise InvalidArgument(
            "--fault-tolerant: the quorum after every round is not in the cost model yet; predict the run without it"
        )
    workers = config.training.workers
    nodes = config.algorithm.nodes or None  # 0: not given
    if not hierarchical and args.nodes is not None:
        if not args.nodes.isdigit() or int(args.nodes) < 1:
            raise InvalidArgument(f"--nodes {args.nodes!r}: allowed: an integer >= 1 that divides --workers {workers}")
        nodes = int(args.nodes)
    layout = Layout(workers, nodes or workers)
    if args.local_workers < 2:
        raise InvalidArgument(f"--local-workers {args.local_workers}: allowed: an integer >= 2 (rounds need two)")
    if args.step_s is not None and not (math.isfinite(args.step_s) and args.step_s > 0):
        raise InvalidArgument(f"--step-s {args.step_s}: allowed: a finite number of seconds > 0")
    mtbf_s = parse_duration("--mtbf", args.mtbf) if args.mtbf else None
    if mtbf_s is not None and mtbf_s <= 0:
        raise InvalidArgument(f"--mtbf {args.mtbf!r}: allowed: a duration above zero, e.g. 6h")
    if (mtbf_s is None) != (args.restart_s is None):
        raise InvalidArgument(
            "--mtbf and --restart-s go together: how often a worker fails and how long it takes "
            "to start again (e.g. --mtbf 6h --restart-s 120)"
        )
    if args.restart_s is not None and not (math.isfinite(args.restart_s) and args.restart_s >= 0):
        raise InvalidArgument(f"--restart-s {args.restart_s}: allowed: a finite number of seconds >= 0")
    return Question(config, network, layout, args.step_s, args.local_workers, mtbf_s, args.restart_s or 0.0)


def answer(q: Question, prediction: Prediction, profile: Profile) -> dict:
    """The prediction as ``--json`` prints it."""
    out = {
        **prediction.as_dict(),
        "steps": profile.steps,
        "compute_s_per_step": profile.compute_s,
        "workers": q.layout.workers,
        "nodes": q.layout.nodes,
        "bandwidth_bits_per_s": q.network.bandwidth,
        "latency_s": q.network.latency,
    }
    if q.mtbf_s is not None:
        out["failures"] = failure_cost(profile, prediction, q.network, q.mtbf_s, q.restart_s)
    return out


def describe(q: Question, result: dict, measured: bool) -> str:
    """The human table."""
    a = q.config.algorithm
    rule = a.sync if a.sync in ("gradients", "none") else f"{a.sync} I={a.period}"
    options = [
        f"{o}={getattr(a, o)}"
        for o in ("compression", "overlap", "fragments", "inner_period")
        if getattr(a, o) not in (None, 0, False, "")
    ]
    intra = q.network.intra_bandwidth
    lines = [
        f"{q.layout.workers} workers on {q.layout.nodes} nodes, links {format_bandwidth(q.network.bandwidth)} and "
        f"{q.network.latency * 1e3:g} ms"
        + (f" (within a node {format_bandwidth(intra)})" if intra and q.layout.nodes < q.layout.workers else "")
        + f"; {rule}"
        + (f" ({', '.join(options)})" if options else "")
        + f"; {result['steps']} steps",
        f"  compute per step     {result['compute_s_per_step'] * 1e3:.3f} ms"
        + (" (measured on this machine)" if measured else " (--step-s)"),
        f"  time per step        {result['seconds_per_step'] * 1e3:.3f} ms",
        f"  training time        {result['train_s']:.2f} s",
        f"  compute utilization  {100 * result['compute_utilization']:.1f}%",
        f"  sent per step        {result['bytes_per_step'] / 2**10:.1f} KiB per worker "
        f"(peak {result['peak_step_bytes'] / 2**20:.2f} MiB in one step)",
    ]
    if "failures" in result:
        f = result["failures"]
        lines.append(
            f"  failures             {f['failures']:.2f} expected; lost with restart from a checkpoint "
            f"{f['restart_s']:.1f} s, with live recovery {f['live_recovery_s']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd predict", __doc__)
    add_network_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the prediction as one JSON object")
    args = parser.parse_args(argv)

    def run() -> None:
        from prsgd.planning.calibration import Timing, keys, prepare, profile_of, time_steps, trace

        q = question(args)
        setting = prepare(q.config)
        traced = trace(setting, setting.config)
        measured = q.step_s is None
        if measured:
            timing = time_steps([setting.config], q.local_workers, [keys(traced[0])])[0]
        else:
            timing = Timing(q.step_s, 0.0)
        found = profile_of(setting, setting.config, q.layout, timing, traced)
        result = answer(q, predict(found, q.network), found)
        if args.json:
            print(json.dumps(result))
            return
        for note in setting.notes:
            print(note)
        print(describe(q, result, measured))

    exit_on_user_error("prsgd predict", run)
