"""The local update rules of Algorithm 1, as stateless functions over tensor lists.

Option I (Polyak, eq. 4) and Option II (Nesterov, eq. 5) in exactly the form of PyTorch's ``torch.optim.SGD``
(dampening 0, weight decay added to the gradient). The operations are element-wise, so the same call updates one
worker's tensors or tensors stacked with a leading worker dimension ``(N, ...)``: the simulator and the
distributed optimizer both call :func:`momentum_sgd_`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def momentum_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """One local momentum-SGD step, in place on ``params`` and ``momentum_buffers``.

    With learning rate gamma (``lr``), momentum beta (``momentum``) and g = G + weight_decay * x::

        u <- beta * u + g                     (eq. 4 and 5)
        x <- x - gamma * u                    Polyak, option I (eq. 4)
        x <- x - gamma * (beta * u + g)       Nesterov, option II (eq. 5)

    Buffers start at zero, so the first step gives u = g, as PyTorch's lazily created buffer does. ``grads`` are
    not modified. With ``momentum == 0`` the buffers are left untouched (plain SGD).
    """
    if not params:
        return
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum == 0:
        torch._foreach_add_(params, grads, alpha=-lr)
        return
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, grads)
    direction = torch._foreach_add(grads, momentum_buffers, alpha=momentum) if nesterov else momentum_buffers
    torch._foreach_add_(params, direction, alpha=-lr)


@torch.no_grad()
def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite (no NaN or inf): one fused pass per device, one host sync.

    AMP's check (what ``GradScaler`` runs on gradients), with a unit scale that leaves every value unchanged: one
    fused kernel instead of ``isfinite(t).all()`` per tensor (the speed-up is in benchmarks/README.md). Integer
    tensors are always finite and are skipped."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            by_device.setdefault(t.device, []).append(t)
    flags = []
    for device, group in by_device.items():
        found = torch.zeros(1, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
        flags.append(found)
    if not flags:
        return True
    return not bool(flags[0] if len(flags) == 1 else torch.stack([f.to(flags[0].device) for f in flags]).any())


def adamw_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, in place on ``params``, the moments and the step counters, as ``torch.optim.AdamW`` takes it
    (its foreach form, operation for operation, so that the results are equal bit for bit)::

        t <- t + 1;  x <- x (1 - lr wd)
        m <- m + (1 - beta1) (g - m);  v <- beta2 v + (1 - beta2) g^2
        x <- x - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``steps`` are 0-d tensors, one per parameter (each may have its own count). Element-wise over stacked tensors
    too; ``grads`` are not modified."""
    if not params:
        return
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1.0)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
    step_size = [(lr / (1 - beta1**t)) * -1 for t in counts]
    denominators = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denominators, [(1 - beta2**t) ** 0.5 for t in counts])
    torch._foreach_add_(denominators, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denominators, step_size)
