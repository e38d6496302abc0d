"""The ``prsgd`` command: ``run`` (a config), ``plot`` (finished runs), ``results`` (docs/results.md's tables),
``train`` (flags), ``demo``, ``theory``, ``predict`` (a run's wall-clock on a network), ``tune`` (the round
options for a network), ``lighthouse`` (torchft's coordinator for fault-tolerant runs)."""

from __future__ import annotations

import sys

from prsgd.engines import lighthouse
from prsgd.errors import exit_on_user_error
from prsgd.experiments import demo, plot, results, runner
from prsgd.experiments import theory_command as theory
from prsgd.planning import predict, tune
from prsgd.training import train

COMMANDS = {
    "run": runner.main,
    "plot": plot.main,
    "results": results.main,
    "train": train.main,
    "demo": demo.main,
    "theory": theory.main,
    "predict": predict.main,
    "tune": tune.main,
    "lighthouse": lighthouse.main,
}


SUMMARIES = {
    "run": "run an experiment config: one run, several seeds or a sweep (prsgd run CONFIG.toml)",
    "plot": "draw the paper's figures from finished runs (prsgd plot OUT ...)",
    "results": "fill docs/results.md's tables from run summaries",
    "train": "one training run from flags, on the simulator or under torchrun",
    "demo": "a real experiment on offline data, ending in a plot and a table",
    "theory": "the corollaries' learning rate, period and rounds for N workers and T steps",
    "predict": "a distributed run's wall-clock on a given network, from a short calibration here",
    "tune": "the period, compression, overlap and fragments fastest on a network within a loss budget",
    "lighthouse": "torchft's Lighthouse for fault-tolerant runs (the ft extra), until stopped",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {SUMMARIES[name]}" for name in COMMANDS]
    return "\n".join(
        [
            "usage: prsgd COMMAND [options]   (prsgd COMMAND --help for a command's options)",
            "",
            "PR-SGD-Momentum (Yu, Jin & Yang 2019): communication-efficient distributed momentum SGD.",
            "",
            "commands:",
            *lines,
            "",
            "PRSGD_DEBUG=1 shows the traceback of a failure.",
        ]
    )


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("prsgd")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv and argv[0] == "--version":
        print(f"prsgd {version()}")
        return
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "no command"
        print(usage(), file=sys.stderr)
        sys.exit(f"prsgd: error: {given} is not a command; allowed: {', '.join(COMMANDS)}")
    exit_on_user_error(f"prsgd {argv[0]}", lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
