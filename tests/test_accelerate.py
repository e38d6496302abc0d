"""prsgd.accelerate in one process: skipped fp16 steps are reported as accelerate's own optimizer reports them.

accelerate makes no GradScaler on the CPU; the tests give the Accelerator one (what it makes on a GPU), so that
accelerate's own code path (AcceleratedOptimizer.step with a scaler, its scheduler wrapper) runs for real, and the
loss of one step is made infinite: a real fp16 overflow that the scaler skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp

import prsgd

accelerate = pytest.importorskip("accelerate", reason="the accelerate extra: pip install -e '.[accelerate]'")
import prsgd.accelerate  # noqa: E402

INF_AT = 1


def run(make_optimizer, prepare) -> tuple[list[bool], list[float]]:
    """(step_was_skipped after each step, the learning rate after each scheduler step) over 4 steps."""
    accelerator = accelerate.Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # what accelerate makes for fp16 on a GPU
    model = mlp()
    opt = prepare(accelerator, model, make_optimizer(model))
    scheduler = accelerator.prepare(torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5))
    skipped, lrs = [], []
    for t, (x, y) in enumerate(batches(1, 4)):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x[0]), y[0])
        accelerator.backward(loss * float("inf") if t == INF_AT else loss)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
        lrs.append(opt.optimizer.param_groups[0]["lr"])
    return skipped, lrs


def test_a_step_the_grad_scaler_skips_is_reported_as_accelerates_own_optimizer_reports_it():
    own = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), lambda acc, m, o: acc.prepare(o))
    ours = run(lambda m: prsgd.LocalSGD(m, 0.1, momentum=0.9, period=2), prsgd.accelerate.prepare)
    assert own[0] == [False, True, False, False]  # accelerate's own optimizer: the overflow step was skipped
    assert ours == own  # the same skips, so the scheduler wrapper held the learning rate on the same step
