"""The synthetic problems' constants are what they claim; prsgd.algorithm.theory's formulas; a seeded speedup check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from prsgd import cli
from prsgd.algorithm.theory import recommend, recommended_lr, recommended_period
from prsgd.experiments.problems import NonConvexRegression, run


def test_smoothness_constant_is_a_tight_bound():
    p = NonConvexRegression(4, dim=10, samples=30, lam=1.0, seed=0)
    g = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(200):
        x = 2 * torch.randn(10, generator=g, dtype=torch.float64)
        y = x + 0.1 * torch.randn(10, generator=g, dtype=torch.float64)
        ratios.append(((p.full_gradient(x) - p.full_gradient(y)).norm() / (x - y).norm()).item())
    assert max(ratios) <= p.L * (1 + 1e-9)
    top = torch.linalg.eigh(p.AtA).eigenvectors[:, -1]  # at x = 0 the Hessian's top eigenvalue is L
    h = 1e-5
    finite = (p.full_gradient(h * top) - p.full_gradient(-h * top)).norm().item() / (2 * h)
    assert finite == pytest.approx(p.L, rel=1e-6)


def test_the_problem_is_non_convex():
    p = NonConvexRegression(2, dim=10, samples=30, lam=1.0, seed=0)
    x = torch.ones(10, dtype=torch.float64)  # r''(1) = -1/2 on every coordinate
    hessian = torch.autograd.functional.hessian(lambda z: p.value(z), x)
    assert torch.linalg.eigvalsh(hessian)[0] < 0


def test_gradient_noise_variance_is_sigma_squared():
    p = NonConvexRegression(8, dim=20, sigma=1.7, seed=1)
    xs = torch.randn(8, 20, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    samples = torch.stack([p.stochastic_gradients(xs, g) - p.worker_gradients(xs) for _ in range(2000)])
    assert samples.pow(2).sum(-1).mean().item() == pytest.approx(1.7**2, rel=0.03)
    assert samples.mean(0).abs().max().item() < 0.05  # unbiased


@pytest.mark.parametrize("zeta", [0.0, 0.5, 3.0])
def test_heterogeneity_is_zeta_squared_everywhere(zeta):
    p = NonConvexRegression(6, dim=12, zeta=zeta, seed=3)
    for scale in (0.0, 1.0, 5.0):
        x = scale * torch.randn(12, dtype=torch.float64)
        per_worker = p.worker_gradients(x.repeat(6, 1))
        torch.testing.assert_close(per_worker.mean(0), p.full_gradient(x))  # f = mean of the f_i
        assert (per_worker - p.full_gradient(x)).pow(2).sum(-1).mean().item() == pytest.approx(zeta**2, abs=1e-9)


def test_corollary_formulas_by_hand():
    assert recommended_period(4, 10_000, identical=True) == math.floor(100 / 8)  # T^1/2 / N^3/2 = 12.5
    assert recommended_period(16, 100_000, identical=False) == math.floor(100_000**0.25 / 8)  # 17.78 / 8 = 2.2
    assert recommended_period(64, 100, identical=True) == 1  # never below 1
    assert recommended_period(4, 10_000, period_scale=2.0) == 25
    assert recommended_lr(16, 10_000) == pytest.approx(0.04)
    assert recommended_lr(16, 10_000, momentum=0.9, smoothness=2.0) == pytest.approx(0.01**1 / 2.0)  # capped
    r = recommend(4, 10_000)
    assert (r.period, r.rounds, r.rounds_saved) == (12, 834, 9166)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: recommended_period(0, 100), r"workers=0 is not allowed"),
        (lambda: recommended_period(4, 0), r"steps=0 is not allowed"),
        (lambda: recommended_lr(4, 100, momentum=1.0), r"momentum=1\.0 is not allowed"),
        (lambda: NonConvexRegression(0), r"num_workers=0 is not allowed"),
        (lambda: NonConvexRegression(2, sigma=-1.0), r"sigma=-1\.0 is not allowed"),
    ],
)
def test_bad_inputs_raise_clearly(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_theory_cli(capsys):
    cli.main(["theory", "--workers", "16", "--steps", "100000", "--non-identical"])
    out = capsys.readouterr().out
    assert "period I = 2" in out and "communication rounds = 50000" in out
    with pytest.raises(SystemExit, match=r"workers=0 is not allowed"):
        cli.main(["theory", "--workers", "0", "--steps", "10"])


def test_the_measure_decreases_with_more_workers():
    """A seeded small run of the linear-speedup experiment: at fixed T, more workers give a smaller measure."""
    steps = 1500
    values = []
    for n in (1, 4, 16):
        runs = []
        for seed in range(2):
            p = NonConvexRegression(n, sigma=2.0, seed=seed)
            lr = recommended_lr(n, steps, lr_scale=0.3, momentum=0.5, smoothness=p.L)  # capped at (1 - 0.5)^2 / L
            runs.append(run(p, steps, lr=lr, momentum=0.5, period=recommended_period(n, steps), seed=seed).measure)
        values.append(np.mean(runs))
    assert values[0] > values[1] > values[2]
    assert values[0] / values[2] > 2.0


def test_run_counts_rounds_and_matches_gossip_node_average_dynamics():
    p = NonConvexRegression(8, zeta=1.0, seed=0)
    a = run(p, 64, lr=0.05, momentum=0.5, period=8, seed=1)
    assert a.rounds == 8 and a.bytes == 8 * 2 * 20 * 8  # params + momentum, float64
    complete = run(p, 64, lr=0.05, momentum=0.5, sync="gossip", topology="complete", seed=1)
    every_step = run(p, 64, lr=0.05, momentum=0.5, period=1, seed=1)
    torch.testing.assert_close(complete.grad_norms, every_step.grad_norms)


def test_theory_experiments_smoke_run_writes_every_section_with_a_verdict(tmp_path):
    from prsgd.experiments import heterogeneity
    from prsgd.experiments.theory_experiments import main as experiments

    section = heterogeneity.SECTION.begin + "\n\n## 5. rendered from its own raw runs\n" + heterogeneity.SECTION.end
    (tmp_path / "theory.md").write_text("# an older page\n\n" + section + "\n")
    experiments(["--config", str(Path(__file__).parents[1] / "configs/theory/quick.toml"), "--out", str(tmp_path)])
    text = (tmp_path / "theory.md").read_text()
    assert text.count(section) == 1 and "# an older page" not in text  # section 5 kept, the rest regenerated
    for heading in ("## 1. Linear speedup", "## 2. Communication complexity", "## 3. Momentum", "## 4. Decentral"):
        assert heading in text
    assert text.count("**held**") + text.count("**not held**") + text.count("**not testable") >= 2 + 2 + 2
    assert (tmp_path / "figures/theory_speedup.png").stat().st_size > 10_000
    assert (tmp_path / "figures/theory_rounds.png").stat().st_size > 10_000


def test_iterations_to_eps_fall_as_one_over_n_where_the_corollary_applies():
    """The quick plan's speedup case (Polyak, identical, T1 = 16384, N <= 8, every point uncapped): T_eps ~ T1 / N."""
    from prsgd.experiments.theory_experiments import QUICK, speedup

    result = speedup(1, QUICK.speedup_steps, list(QUICK.speedup_workers), nesterov=False, identical=True)
    assert not result.capped.any()
    assert abs(result.slopes().mean() + 1) <= 0.15
    assert (result.efficiency() > 0.75).all()


def test_the_corollarys_period_suffices_with_row_sampled_gradients():
    """The quick plan's communication sizes: at the corollary's I the measure stays within 10% of period 1's, while
    long periods cost more (row sampling makes local drift matter with identical data)."""
    from prsgd.experiments.theory_experiments import QUICK, THRESHOLDS, search_periods

    result = search_periods(QUICK.communication_workers, list(QUICK.lengths), True, 1, "rows")
    assert (result.corollary / result.base <= 1.1).all()
    assert not result.capped[THRESHOLDS.index(0.05)].all()  # the period does limit the measure here


def test_row_sampled_gradients_are_unbiased_with_the_stated_variance():
    p = NonConvexRegression(3, dim=6, samples=10, zeta=1.0, seed=4, noise="rows", batch=2)
    xs = torch.randn(3, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    samples = torch.stack([p.stochastic_gradients(xs, g) - p.worker_gradients(xs) for _ in range(20000)])
    assert samples.mean(0).abs().max().item() < 0.05 * samples.std().item()
    torch.testing.assert_close(samples.pow(2).sum(-1).mean(0), p.noise_variance(xs), rtol=0.05, atol=0)


def test_theory_plan_rejects_unknown_keys_and_bad_sizes(tmp_path):
    from prsgd.experiments.theory_experiments import load_plan
    from prsgd.training.config import ConfigError

    bad = tmp_path / "plan.toml"
    bad.write_text("stepz = 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stepz'"):
        load_plan(bad)
    bad.write_text("workers = 4\n")
    with pytest.raises(ConfigError, match=r"workers=4 .* must be a list of integers >= 1"):
        load_plan(bad)
