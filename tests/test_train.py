"""The training entry point: the same flags on the simulator and under torchrun give the same log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import LOG_FIELDS, torchrun_command

from prsgd.train import main, run
from prsgd.training.config import ConfigError, RunConfig

FLAGS = ["--epochs", "2", "--evals", "4", "--sync", "params_and_momentum", "--period", "3", "--no-progress"]


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_simulator_run_logs_every_field_and_rounds_equal_steps_over_period(tmp_path):
    main([*FLAGS, "--workers", "4", "--out", str(tmp_path)])
    records = read_log(tmp_path)
    assert len(records) == 5
    for r in records:
        assert set(r) == LOG_FIELDS
        assert r["comm_rounds"] == r["step"] // 3
    assert [r["joint_epoch"] for r in records] == sorted(r["joint_epoch"] for r in records)
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert json.loads((tmp_path / "config.json").read_text())["training"]["workers"] == 4


@pytest.mark.parametrize(
    ("workers", "algorithm"),
    [(2, []), (4, ["--sync", "gossip", "--period", "1", "--topology", "ring"])],
    ids=["params_and_momentum", "gossip_ring"],
)
def test_torchrun_distributed_run_matches_the_simulator(tmp_path, workers, algorithm):
    sim_dir, dist_dir = tmp_path / "sim", tmp_path / "dist"
    flags = [*FLAGS, *algorithm]
    main([*flags, "--workers", str(workers), "--out", str(sim_dir)])  # sync flags given last win in argparse
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launched = subprocess.run(
        torchrun_command(workers, "--engine", "distributed", *flags, "--out", str(dist_dir)),
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert launched.returncode == 0, launched.stderr[-4000:]
    sim, dist = read_log(sim_dir), read_log(dist_dir)
    assert len(sim) == len(dist) == 5
    for a, b in zip(sim, dist, strict=True):
        assert (a["step"], a["comm_rounds"], a["comm_bytes"]) == (b["step"], b["comm_rounds"], b["comm_bytes"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1.5 / 360)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="inductor needs a C++ compiler")
def test_compiled_simulator_run_logs_the_same_losses(tmp_path):
    main([*FLAGS, "--workers", "4", "--out", str(tmp_path / "eager")])
    main([*FLAGS, "--workers", "4", "--compile", "--out", str(tmp_path / "compiled")])
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["step"] for r in eager] == [r["step"] for r in compiled]
    for a, b in zip(eager, compiled, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


def test_the_simulator_computes_as_the_config_says_and_loop_logs_the_losses_of_vmap(tmp_path):
    from prsgd.training.workers import SimulatedWorkers

    seen = []
    original = SimulatedWorkers.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.sim.compute)

    SimulatedWorkers.__init__ = spy
    try:
        main([*FLAGS, "--workers", "4", "--compute", "vmap", "--out", str(tmp_path / "vmap")])
        vmap_runs, seen[:] = list(seen), []
        main([*FLAGS, "--workers", "4", "--compute", "loop", "--out", str(tmp_path / "loop")])
    finally:
        SimulatedWorkers.__init__ = original
    assert set(vmap_runs) == {"vmap"} and set(seen) == {"loop"}  # the warm-up's workers and the run's
    vmap, loop = read_log(tmp_path / "vmap"), read_log(tmp_path / "loop")
    for a, b in zip(vmap, loop, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"compute": "fast"}, r"training\.compute='fast' is not known; allowed: auto, vmap, loop"),
        ({"compute": "loop", "compile": True}, r"training\.compile=True .* needs training\.compute='vmap' or 'auto'"),
    ],
)
def test_bad_compute_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(progress=False).with_overrides(overrides)


def test_compile_with_the_distributed_engine_is_refused():
    with pytest.raises(ConfigError, match=r"training\.compile=True .*engine='distributed'"):
        run(RunConfig(engine="distributed", progress=False).with_overrides({"epochs": 1.0, "compile": True}))


def test_distributed_engine_without_torchrun_says_how_to_launch():
    with pytest.raises(ValueError, match=r"torchrun --nproc-per-node"):
        run(RunConfig(engine="distributed", progress=False).with_overrides({"epochs": 1.0}))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"engine": "mpi"}, r"engine='mpi' .*allowed: simulator, distributed"),
        ({"epochs": -1.0}, r"training\.epochs=-1\.0"),
        ({"batch_size": 0}, r"training\.batch_size=0"),
        ({"period": "8x"}, r"algorithm\.period='8x' .*type int or 'theory'"),
        ({"lr": "theroy"}, r"training\.lr='theroy' .*type float or 'theory'"),
        ({"sync": "allreduce"}, r"sync='allreduce'"),
    ],
)
def test_bad_config_is_rejected_before_training(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig().with_overrides(changes)


def test_prsgd_train_ends_with_a_human_summary(tmp_path, capsys):
    small = ["--dataset", "digits", "--model", "mlp", "--workers", "2", "--epochs", "0.5", "--evals", "1"]
    main([*small, "--no-progress", "--out", str(tmp_path)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    final = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()][-1]
    assert (
        last.startswith(f"done: {final['step']} steps (0.51 joint epochs") and f"{final['comm_rounds']} rounds" in last
    )
    assert last.endswith(f"log: {tmp_path / 'log.jsonl'}") and f"test accuracy {final['test_accuracy']:.4f}" in last


def test_every_flag_says_what_it_sets_its_type_choices_and_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert text.startswith("usage: prsgd train ") and "``" not in text
    assert "--period PERIOD I, local steps between rounds; 'theory': " in text
    assert "(int or 'theory'; default: 8) [algorithm.period]" in text
    assert "(str; one of: params_and_momentum, " in text and "default: 'params_and_momentum') [algorithm.sync]" in text
    assert "(bool; default: False) [algorithm.nesterov]" in text
    from prsgd.training.config import LEAVES

    for leaf, dotted in LEAVES.items():
        flag = "--" + leaf.replace("_", "-")
        at = re.search(re.escape(flag) + "[ ,]", text[text.index("options:") :]).start() + text.index("options:")
        help_text = text[at : text.index(f"[{dotted}]", at)]
        assert "default: " in help_text and len(help_text.split("(")[0].split()) > 2, help_text
