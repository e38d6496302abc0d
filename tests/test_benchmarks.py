"""Smoke tests: each benchmark script runs end to end at a tiny size and prints its table (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_mixing_benchmark():
    out = run_script("mixing.py", "--workers", "16", "--numel", "2000", "--repeats", "1")
    assert "| ring | 2 |" in out and "dense / sparse" in out


def test_simulator_throughput_benchmark():
    out = run_script("simulator_throughput.py", "--models", "mlp", "--workers", "2", "--repeats", "1")
    assert "| mlp | 2 | 64 |" in out


def test_sync_cost_benchmark():
    out = run_script("sync_cost.py", "--workers", "2", "--repeats", "2", "--model", "resnet8")
    assert "prsgd.LocalSGD sync" in out and "torch allocated" in out


def test_sync_cost_over_slow_links_benchmark():
    out = run_script("sync_cost.py", "--rate", "1gbit", "--workers", "2", "--repeats", "2", "--model", "resnet8")
    assert "prsgd.LocalSGD int8 round" in out and "/ fp32 round" in out


def test_time_to_target_benchmark(tmp_path):
    out = run_script("time_to_target.py", "--workers", "2", "--periods", "4", "--epochs", "2", "--out", str(tmp_path))
    assert "| params_and_momentum I=4 |" in out
    assert (tmp_path / "loss_vs_wall_clock.png").is_file()


def test_time_to_target_benchmark_with_overlap_compression_and_seeds(tmp_path):
    args = ["--workers", "2", "--periods", "2", "--compressions", "bf16", "--overlaps", "I", "--seeds", "2"]
    out = run_script("time_to_target.py", *args, "--epochs", "1", "--out", str(tmp_path))
    assert "| params_and_momentum I=2 bf16 overlap=2 |" in out and " +- " in out


def test_time_to_target_hierarchical_benchmark(tmp_path):
    out = run_script("time_to_target.py", "--hierarchical", "--epochs", "2", "--out", str(tmp_path))
    assert "2 hosts x 2 ranks" in out and "| two-level 1/8 |" in out and "| flat I=8 |" in out


@pytest.mark.parametrize(
    ("rate", "bits"), [("100mbit", 1e8), ("1gbit", 1e9), ("2.5gbit", 2.5e9), ("512kbit", 512e3), ("800bit", 800.0)]
)
def test_rate_parsing(rate, bits):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import time_to_target
    finally:
        sys.path.pop(0)
    assert time_to_target.bits_per_second(rate) == bits
    with pytest.raises(ValueError, match=r"use e\.g\. 100mbit"):
        time_to_target.bits_per_second("fast")


def test_adamw_benchmark():
    out = run_script("adamw.py", "--workers", "2", "--repeats", "1", "--width", "16", "--step-width", "16")
    assert "| torch AdamW(foreach) |" in out and "| 2 |" in out


def test_low_bit_benchmark(tmp_path):
    out = run_script("low_bit.py", "--seeds", "2", "--workloads", "mlp", "--epochs", "0.5", "--out", str(tmp_path))
    assert "| int4 | 0.13" in out and "| topk:0.01 | 0.01" in out and "4 fragments: peak 0.2" in out


def test_comm_overhead_benchmark(tmp_path):
    args = ["--loopback", "--seeds", "1", "--epochs", "1", "--runs", "I=8 topk:0.01 overlap=8"]
    out = run_script("comm_overhead.py", *args, "--out", str(tmp_path))
    assert "| I=8 topk:0.01 overlap=8 |" in out and "| gradients | 100.0% |" in out


def test_fault_tolerance_benchmark(tmp_path):
    torchft = pytest.importorskip("torchft")
    del torchft
    args = ["--epochs", "400", "--kill-every", "4", "--max-kills", "1", "--checkpoint-every", "500"]
    args += ["--modes", "ft-kill"]  # restart-from-checkpoint is what test_reliability runs
    out = run_script("fault_tolerance.py", *args, "--out", str(tmp_path))
    assert "| ft-kill |" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    kills = {row[1].strip(): int(row[3]) for row in rows if row[1].strip() in ("plain", "restart", "ft", "ft-kill")}
    assert kills["ft-kill"] == 1, out


def test_predict_vs_measured_benchmark(tmp_path):
    out = run_script("predict_vs_measured.py", "--smoke", "--out", str(tmp_path))
    assert "| 10gbit | gradients (every step) |" in out and "| 10gbit | Alg. 1 I=4 |" in out and "worst error" in out


def test_drift_benchmark(tmp_path):
    args = ["--model", "resnet8", "--repeats", "2", "--seeds", "2", "--rounds", "20", "--periods", "1,4"]
    out = run_script("drift.py", *args, "--zetas", "0,1", "--out", str(tmp_path))
    assert "| LocalSGD, 2 gloo processes, period 1 |" in out and "| 1 | 4 |" in out and " +- " in out
    assert (tmp_path / "drift_vs_period.png").is_file()
