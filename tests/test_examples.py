"""The examples/ scripts, run for real at a tiny size with 2 gloo processes on 127.0.0.1: the own loop under
torchrun, Lightning with LocalSGDStrategy, accelerate; each compared with an own loop on the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port
from stack_worker import ACCELERATE_RUN, run

pytestmark = pytest.mark.slow

pytest.importorskip("lightning", reason="the lightning extra: pip install -e '.[lightning]'")
pytest.importorskip("accelerate", reason="the accelerate extra: pip install -e '.[accelerate]'")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = ["--train-size", "192", "--batch-size", "16", "--period", "4", "--clip", "0.5", "--lr-step", "5"]
PERIOD, STEPS_PER_EPOCH = 4, 6  # 96 examples per rank in batches of 16: epoch ends at step 6, mid-period


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "MASTER"))}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLES))


def _run(command: list[str]) -> str:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def torchrun(script: str, *args: str) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return _run([*launcher, str(EXAMPLES / script), *args])


def lightning(*args: str) -> str:
    return _run([sys.executable, str(EXAMPLES / "lightning_train.py"), "--devices", "2", *args])


def states(out: Path) -> list[dict]:
    return [torch.load(out / f"rank-{r}.pt") for r in range(2)]


def assert_same_run(a: list[dict], b: list[dict], prefix_b: str = "") -> None:
    """Bit-identical parameters and momentum on every rank (``prefix_b``: the LightningModule's attribute)."""
    for rank, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x["steps_done"] == y["steps_done"]
        for name, p in x["params"].items():
            assert torch.equal(p, y["params"][prefix_b + name]), f"rank {rank} {name}"
        for m, n in zip(x["momentum"], y["momentum"], strict=True):
            assert torch.equal(m, n), f"rank {rank} momentum"


def test_own_loop_example_averages_every_period(tmp_path):
    printed = torchrun("own_loop.py", "--epochs", "2", *SMALL, "--out", str(tmp_path))
    assert "averaged model" in printed and "workers=2" in printed
    for state in states(tmp_path):
        assert state["steps_done"] == 2 * STEPS_PER_EPOCH and state["comm"][0] == 3
        for step, spread in state["spread"]:  # momentum equal on both ranks right after each round only
            assert (spread == 0.0) == (step % PERIOD == 0), (step, spread)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_lightning_strategy_equals_the_own_loop_and_resumes_mid_period_bit_identically(tmp_path, precision):
    """bf16-mixed (fp16: GradScaler, unscale_ before clipping) + gradient clipping + a StepLR schedule."""
    common = [*SMALL, "--precision", precision]
    torchrun("own_loop.py", "--epochs", "2", *common, "--out", str(tmp_path / "own"))
    lightning("--epochs", "2", *common, "--out", str(tmp_path / "lightning"))
    assert_same_run(states(tmp_path / "own"), states(tmp_path / "lightning"), prefix_b="net.")
    for state in states(tmp_path / "lightning"):  # momentum equal on both ranks right after each round only
        assert [step for step, spread in state["spread"] if spread == 0.0] == [4, 8, 12]
    if precision == "fp16":
        return
    lightning("--epochs", "1", *common, "--checkpoints", str(tmp_path / "ckpt"))  # saved at step 6, mid-period
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    workers = checkpoint["prsgd_workers"][0]["flat"]
    assert workers.shape[0] == 2 and not torch.equal(workers[0], workers[1])  # ranks differ there
    lightning("--epochs", "2", *common, "--resume", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "r"))
    assert_same_run(states(tmp_path / "lightning"), states(tmp_path / "r"))


def test_accelerate_recipe_equals_an_own_loop_on_the_same_batches(tmp_path):
    a = ACCELERATE_RUN
    args = ["--train-size", str(a["train_size"]), "--batch-size", str(a["batch_size"]), "--period", str(a["period"])]
    args += ["--clip", str(a["clip"]), "--epochs", str(a["epochs"]), "--precision", "bf16", "--no-shuffle"]
    printed = torchrun("accelerate_train.py", *args, "--out", str(tmp_path / "accelerate"))
    assert "AcceleratedLocalSGD(LocalSGD(" in printed and "rounds=4" in printed  # 3 scheduled + synchronize()
    mp.spawn(run, args=(2, free_port(), str(tmp_path), "accelerate_reference", 0), nprocs=2, join=True)
    reference = [torch.load(tmp_path / f"accelerate_reference_rank{r}.pt") for r in range(2)]
    assert_same_run(reference, states(tmp_path / "accelerate"))


ROUND_CASES = {
    "int8-outer": ["--round", "compression=int8", "--round", "outer_lr=0.7", "--round", "outer_momentum=0.9"],
    "bf16-overlap": ["--round", "compression=bf16", "--round", "overlap=3"],
    "hierarchical": ["--round", "inner_period=2", "--round", "nodes=1"],
    "adamw-first-moment-int8": ["--optimizer", "adamw", "--round", "sync_state=exp_avg", "--round", "compression=int8"],
    "fragments-int4-overlap": ["--round", "fragments=2", "--round", "compression=int4", "--round", "overlap=1"],
    "fragments-topk-outer": [
        *("--round", "fragments=4", "--round", "compression=topk:0.1"),
        *("--round", "outer_lr=0.7", "--round", "outer_momentum=0.9"),
    ],
}
"""Every round stage: compressed rounds with the outer step; an overlapped compressed round (the one started at step
4 is due at step 7, so it is in flight at the checkpoint of step 6); inner rounds; AdamW (its moments and step
counters) with its first moment averaged through int8 rounds; streaming int4 rounds in 2 fragments, overlapped (the
fragment started at step 6 is in flight at the checkpoint); and top-k rounds in 4 fragments (one a step), each with
its own outer step."""


@pytest.mark.parametrize("case", list(ROUND_CASES))
def test_lightning_resumes_mid_period_bit_identically_with_every_round_option(tmp_path, case):
    common = [*SMALL, "--precision", "bf16", *ROUND_CASES[case]]
    lightning("--epochs", "2", *common, "--out", str(tmp_path / "whole"))
    lightning("--epochs", "1", *common, "--checkpoints", str(tmp_path / "ckpt"))  # saved at step 6, mid-period
    lightning("--epochs", "2", *common, "--resume", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "r"))
    assert_same_run(states(tmp_path / "whole"), states(tmp_path / "r"))


def test_lightning_checkpoint_saved_on_rank_0_alone_fails_in_seconds_saying_why(tmp_path):
    command = [sys.executable, str(Path(__file__).parent / "lightning_rank0_save.py"), str(tmp_path / "x.ckpt")]
    started = time.monotonic()
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and time.monotonic() - started < 90  # not the process group's timeout (120 s)
    assert "every rank must call it" in done.stderr and "not under `if trainer.is_global_zero`" in done.stderr
    assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.parametrize(
    "case", ["exact", "int8-outer", "bf16-overlap", "adamw-first-moment-int8", "fragments-int4-overlap"]
)
def test_accelerate_save_state_and_load_state_resume_every_rank_bit_identically(tmp_path, case):
    a = ACCELERATE_RUN
    args = ["--train-size", str(a["train_size"]), "--batch-size", str(a["batch_size"]), "--period", str(a["period"])]
    args += [
        "--clip",
        str(a["clip"]),
        "--epochs",
        "2",
        "--precision",
        "bf16",
        "--no-shuffle",
        *ROUND_CASES.get(case, []),
    ]
    torchrun("accelerate_train.py", *args, "--checkpoints", str(tmp_path / "ckpt"), "--out", str(tmp_path / "whole"))
    resume = str(tmp_path / "ckpt" / "epoch-1")  # end of epoch 1: step 6, mid-period
    torchrun("accelerate_train.py", *args, "--resume", resume, "--out", str(tmp_path / "r"))
    saved = [torch.load(f"{resume}/prsgd_worker0_rank{r}.pt", weights_only=False) for r in range(2)]
    assert not torch.equal(saved[0]["flat"], saved[1]["flat"])  # saved mid-period: the ranks differ
    assert_same_run(states(tmp_path / "whole"), states(tmp_path / "r"))
