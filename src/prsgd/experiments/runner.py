"""``prsgd run CONFIG.toml``: run an experiment config (one run, several seeds, or a sweep over one key).

    prsgd run configs/cpu/periods.toml [--set training.epochs=2 ...] [--seeds 3]
              [--sweep algorithm.period=1,2,4,8,16] [--out runs/periods] [--engine distributed] [--resume]

``--seeds`` and ``--sweep`` default to the config's top-level ``seeds`` and ``sweep`` keys, so a paper figure's
config carries its own comparison.
Runs go to ``OUT`` (default ``runs/<config name>``): ``OUT/`` for a single run, ``OUT/seed<k>/`` for several
seeds, ``OUT/<key>=<value>/[seed<k>/]`` for a sweep. Every run's config is built and checked before the first
one starts. At the end a markdown table of final metrics is printed and written to ``OUT/summary.md``; draw the
figures with ``prsgd plot OUT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from prsgd.engines.torchrun import Torchrun
from prsgd.experiments.report import discover, summary_table
from prsgd.training import command
from prsgd.training.config import ConfigError, RunConfig, load
from prsgd.training.flags import parse_assignments
from prsgd.training.outdir import OutFolderError
from prsgd.training.train import preflight, run


def plan_runs(config: RunConfig, out: Path, seeds: int = 1, sweep: str | None = None) -> list[RunConfig]:
    """Every run of the experiment, validated, with its output folder and seed."""
    if not 1 <= seeds <= 1000:
        raise ConfigError(f"--seeds {seeds} is not allowed; it must be in [1, 1000]")
    key, values = None, [None]
    if sweep:
        key, sep, listed = sweep.partition("=")
        values = [v.strip() for v in listed.split(",") if v.strip()] if sep else []
        if not values:
            raise ConfigError(f"--sweep {sweep!r} is not KEY=V1,V2,...")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ConfigError(
                f"--sweep {sweep!r} lists {', '.join(repeated)} more than once (each value's runs go to one folder); "
                "for repeated runs use --seeds"
            )
    plan = []
    for value in values:
        swept = config.with_overrides({key: value}) if key else config
        folder = out / f"{key.rpartition('.')[2]}={value}" if key else out
        for k in range(seeds):
            plan.append(
                swept.with_overrides(
                    {"training.seed": swept.training.seed + k, "out": str(folder / f"seed{k}" if seeds > 1 else folder)}
                )
            )
    return plan


def main(argv: list[str] | None = None) -> None:
    parser = command.parser("prsgd run", __doc__)
    parser.add_argument("config", help="a TOML config file (see configs/)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. training.epochs=2")
    parser.add_argument("--seeds", type=int, help="run seeds s, s+1, ..., s+K-1 (s = training.seed)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="run once per value of one key")
    parser.add_argument("--out", help="output folder (default runs/<config name>)")
    parser.add_argument("--engine", choices=["simulator", "distributed"], help="override the config's engine")
    parser.add_argument("--resume", action="store_true", help="continue each run from its newest intact checkpoint")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh: move an earlier run's checkpoints aside (not deleted)"
    )
    args = parser.parse_args(argv)
    overrides = parse_assignments(args.set)
    if args.resume:
        overrides["resume"] = "true"
    if args.overwrite:
        overrides["overwrite"] = "true"
    if args.engine:
        overrides["engine"] = args.engine
    config = load(args.config, overrides)
    if (
        config.engine == "distributed"
        and "WORLD_SIZE" in os.environ
        and not {"workers", "training.workers"} & set(overrides)
    ):
        # under torchrun the worker count is the world size, as for python -m prsgd.train
        config = config.with_overrides({"training.workers": os.environ["WORLD_SIZE"]})
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    seeds = args.seeds if args.seeds is not None else config.seeds
    plan = plan_runs(config, out, seeds, args.sweep or config.sweep or None)
    for index, run_config in enumerate(plan, start=1):  # every run checked before the first starts
        try:
            preflight(run_config)
        except (ConfigError, OutFolderError) as error:
            raise ConfigError(f"run {index} of {len(plan)} ({run_config.out}): {error}; no run was started") from None
    # under torchrun: join once for all runs, so that only rank 0 reports
    torchrun = Torchrun.join(config.device, config.worker_timeout) if config.engine == "distributed" else None
    is_main = torchrun is None or torchrun.rank == 0
    try:
        for index, run_config in enumerate(plan, start=1):
            if is_main and len(plan) > 1:
                print(f"[{index}/{len(plan)}] {run_config.out}", flush=True)
            run(run_config, torchrun=torchrun)
        if is_main:
            table = summary_table(discover([out]))
            (out / "summary.md").write_text(table + "\n")
            print(table)
    finally:
        if torchrun is not None:
            torchrun.close()
