"""Run in each spawned gloo process by tests/test_user_stack.py: LocalSGD next to what users combine it with
(DDP, GradScaler with clipping, synchronize before evaluation), each against a reference written with plain
torch (DDP, torch.optim.SGD and hand-written all_reduce averaging)."""

from __future__ import annotations

import copy
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import batches, leave_after_success, mlp
from torch.nn.parallel import DistributedDataParallel as DDP

import prsgd
from prsgd.engines.distributed import init_process_group


def _join(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def run(rank: int, world_size: int, port: int, out_dir: str, scenario: str, steps: int) -> None:
    _join(rank, world_size, port)
    try:
        result = SCENARIOS[scenario](rank, world_size, steps)
        torch.save(result, os.path.join(out_dir, f"{scenario}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    leave_after_success()


def _error(fn) -> str:
    try:
        fn()
    except prsgd.InvalidArgument as e:
        return str(e)
    return "no error"


def ddp_guards(rank: int, world_size: int, steps: int) -> dict:
    x, y = (t[rank] for t in batches(world_size, 1)[0])
    out = {}
    model = mlp()
    out["ddp_then_local_sgd"] = _error(lambda: prsgd.LocalSGD(DDP(model), 0.1))
    model = mlp()
    wrapped = DDP(model)
    opt = prsgd.LocalSGD(model.parameters(), 0.1)
    out["ddp_forward_with_inner_parameters"] = _error(lambda: wrapped(x))
    model = mlp()
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9)
    wrapped = DDP(model)
    out["local_sgd_then_ddp"] = _error(lambda: wrapped(x))
    dist.barrier()
    # the plain module still trains (nothing was stepped through DDP)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    out["steps_done_after"] = opt.steps_done
    # wrapped after training started (3 steps, a round after the second): refused at the first forward through DDP,
    # before its backward would all-reduce gradients on top of LocalSGD's rounds
    model = mlp()
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    wrapped = DDP(model)
    out["wrapped_after_three_steps"] = _error(lambda: wrapped(x))
    return out


def gradients_vs_ddp(rank: int, world_size: int, steps: int) -> dict:
    """LocalSGD(sync="gradients") vs DDP + torch.optim.SGD on a BatchNorm model. Before each step DDP's model gets
    LocalSGD's buffers (DDP then broadcasts rank 0's, which equal them), so after the step the mean over ranks of
    DDP's buffers is what LocalSGD's averaged buffers must be."""
    ours = mlp(batchnorm=True)
    theirs = copy.deepcopy(ours)
    opt = prsgd.LocalSGD(ours, 0.05, momentum=0.9, sync="gradients")
    ddp = DDP(theirs)
    ref = torch.optim.SGD(theirs.parameters(), 0.05, momentum=0.9)
    record = []
    for xs, ys in batches(world_size, steps):
        x, y = xs[rank], ys[rank]
        with torch.no_grad():
            for b_ours, b_theirs in zip(ours.buffers(), theirs.buffers(), strict=True):
                b_theirs.copy_(b_ours)
        opt.zero_grad()
        F.cross_entropy(ours(x), y).backward()
        opt.step()
        ref.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        ref.step()
        ddp_buffers = {}
        for name, b in theirs.named_buffers():
            b = b.detach().clone()
            if b.is_floating_point():
                dist.all_reduce(b)
                b /= world_size
            ddp_buffers[name] = b
        record.append(
            {
                "params_equal": all(
                    torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters(), strict=True)
                ),
                "buffers": {n: b.detach().clone() for n, b in ours.named_buffers()},
                "ddp_buffers_mean": ddp_buffers,
                "in_consensus": opt.in_consensus,
            }
        )
    return {"record": record, "comm": (opt.comm.rounds, opt.comm.bytes)}


def _everything(opt: prsgd.LocalSGD) -> torch.Tensor:
    return opt.storage.flat.detach().clone()


def _equal_on_all_ranks(t: torch.Tensor, world_size: int) -> bool:
    gathered = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(gathered, t)
    return all(torch.equal(g, gathered[0]) for g in gathered)


CONSENSUS_CASES = [
    dict(sync="params_and_momentum", period=4),
    dict(sync="params_clear_momentum", period=4),
    dict(sync="params_only", period=4),
    dict(sync="gradients"),
    dict(sync="gossip", topology="ring", period=2),
]


def consensus(rank: int, world_size: int, steps: int) -> dict:
    """in_consensus against the truth (all ranks' flat storage equal) at every step, then synchronize()."""
    out = []
    for case in CONSENSUS_CASES:
        model = mlp(batchnorm=True)
        opt = prsgd.LocalSGD(model, 0.05, momentum=0.9, **case)
        claims = []
        for xs, ys in batches(world_size, steps):
            opt.zero_grad()
            F.cross_entropy(model(xs[rank]), ys[rank]).backward()
            opt.step()
            claims.append((opt.in_consensus, _equal_on_all_ranks(_everything(opt), world_size)))
        before = (opt.comm.rounds, opt.comm.bytes)
        params_before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        opt.synchronize()
        params_mean = params_before.clone()
        dist.all_reduce(params_mean)
        params_mean /= world_size
        params_after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        out.append(
            {
                "claims": claims,
                "comm_before": before,
                "comm_after": (opt.comm.rounds, opt.comm.bytes),
                "synchronized_equal": _equal_on_all_ranks(_everything(opt), world_size),
                "params_are_the_mean": torch.allclose(params_after, params_mean, rtol=1e-6, atol=1e-7),
                "in_consensus_after": opt.in_consensus,
                "numels": (
                    sum(p.numel() for p in model.parameters()),
                    sum(b.numel() for b in model.buffers() if b.is_floating_point()),
                ),
            }
        )
    return {"cases": out}


AMP_CASES = [dict(sync="params_and_momentum", period=3), dict(sync="gradients")]
INF_AT = (1, 1)  # (rank, step index) whose loss is made inf; step 2 of a period of 3: no round after it


def _amp_step(model, opt, scaler, x, y, inf: bool) -> None:
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x).float(), y)
    if inf:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
    scaler.step(opt)
    scaler.update()


def _hand_average(tensors: list[torch.Tensor], world_size: int) -> None:
    for t in tensors:
        dist.all_reduce(t)
        t /= world_size


def amp(rank: int, world_size: int, steps: int) -> dict:
    """fp16 autocast on CPU, GradScaler("cpu"), unscale_ + clip_grad_norm_ + step: LocalSGD against each rank's
    torch.optim.SGD with the same scaler calls and hand-written averaging (of gradients, after clipping, for
    sync="gradients"; of parameters and momentum every period otherwise); one rank's loss is inf at one step."""
    out = []
    for case in AMP_CASES:
        ours = mlp()
        theirs = copy.deepcopy(ours)
        opt = prsgd.LocalSGD(ours, 0.1, momentum=0.9, **case)
        ref = torch.optim.SGD(theirs.parameters(), 0.1, momentum=0.9)
        scaler_ours = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        scaler_ref = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        applied, trajectory, ref_trajectory = [], [], []
        for t, (xs, ys) in enumerate(batches(world_size, steps)):
            inf = (rank, t) == INF_AT
            before = [p.detach().clone() for p in ours.parameters()]
            _amp_step(ours, opt, scaler_ours, xs[rank], ys[rank], inf)
            applied.append(any(not torch.equal(b, p) for b, p in zip(before, ours.parameters(), strict=True)))
            trajectory.append([p.detach().clone() for p in ours.parameters()])

            ref.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(theirs(xs[rank]).float(), ys[rank])
            if inf:
                loss = loss * float("inf")
            scaler_ref.scale(loss).backward()
            scaler_ref.unscale_(ref)
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm=0.5)
            if case["sync"] == "gradients":
                grads = [p.grad for p in theirs.parameters()]
                _hand_average(grads, world_size)
                skip = not all(bool(torch.isfinite(g).all()) for g in grads)
                if not skip:
                    ref.step()
                scaler_ref.update()  # its own found_inf: this rank's scale
            else:
                scaler_ref.step(ref)
                scaler_ref.update()
                if (t + 1) % case["period"] == 0:
                    with torch.no_grad():
                        params = list(theirs.parameters())
                        _hand_average([p.data for p in params], world_size)
                        _hand_average([ref.state[p]["momentum_buffer"] for p in params], world_size)
            ref_trajectory.append([p.detach().clone() for p in theirs.parameters()])
        out.append(
            {
                "applied": applied,
                "trajectory": trajectory,
                "ref_trajectory": ref_trajectory,
                "steps_done": opt.steps_done,
                "rounds": opt.comm.rounds,
            }
        )
    return {"cases": out}


ACCELERATE_RUN = dict(train_size=192, batch_size=16, period=4, clip=0.5, epochs=2)
"""The settings tests/test_examples.py runs examples/accelerate_train.py with (bf16, no shuffle)."""


def accelerate_reference(rank: int, world_size: int, steps: int) -> dict:
    """An own loop with LocalSGD on the batches accelerate hands rank r without shuffling (batches r, r + N, ...
    of the sequential loader), bf16 autocast, backward, clip, step; the same digits and model as the example,
    built here again."""
    from torch import nn

    from prsgd.data.datasets import load_digits

    a = ACCELERATE_RUN
    data = load_digits()
    inputs, targets = data.train.inputs[: a["train_size"]], data.train.targets[: a["train_size"]]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = prsgd.LocalSGD(model, 0.1, momentum=0.9, period=a["period"])
    b = a["batch_size"]
    for _ in range(a["epochs"]):
        for k in range(rank, a["train_size"] // b, world_size):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(inputs[k * b : (k + 1) * b]), targets[k * b : (k + 1) * b])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), a["clip"])
            opt.step()
            opt.zero_grad()
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "steps_done": opt.steps_done,
    }


ADAMW = dict(lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
POST_LOCAL_PERIOD = 3


def _train(model, opt, data: list, rank: int) -> None:
    """Steps of ``opt`` on this rank's batches of ``data``."""
    for xs, ys in data:
        opt.zero_grad()
        F.cross_entropy(model(xs[rank]), ys[rank]).backward()
        opt.step()


def _side_by_side(ours: tuple, theirs: tuple, data: list, rank: int) -> list[bool]:
    """Train two (model, optimizer) pairs on this rank's batches; whether their parameters are equal after each step."""
    equal = []
    for step in data:
        for model, o in (ours, theirs):
            _train(model, o, [step], rank)
        pairs = zip(ours[0].parameters(), theirs[0].parameters(), strict=True)
        equal.append(all(torch.equal(p, q) for p, q in pairs))
    return equal


def adamw_vs_pytorch(rank: int, world_size: int, steps: int) -> dict:
    """LocalSGD(optimizer="adamw") against PyTorch's own: sync="params_only" against PostLocalSGDOptimizer(AdamW)
    with a PeriodicModelAverager (warm-up period - 1 steps: it averages after steps I, 2I, ..., as prsgd does), and
    sync="gradients" against DDP + AdamW. Whether the parameters are bit-identical after every step."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    out: dict = {}
    ours, theirs = mlp(), mlp()
    opt = prsgd.LocalSGD(ours, optimizer="adamw", sync="params_only", period=POST_LOCAL_PERIOD, **ADAMW)
    averager = PeriodicModelAverager(period=POST_LOCAL_PERIOD, warmup_steps=POST_LOCAL_PERIOD - 1)
    ref = PostLocalSGDOptimizer(torch.optim.AdamW(theirs.parameters(), **ADAMW), averager)
    out["post_local_sgd"] = _side_by_side((ours, opt), (theirs, ref), batches(world_size, steps), rank)
    out["ranks_differ_before_a_round"] = not _equal_on_all_ranks(_everything(opt), world_size)

    ours, theirs = mlp(), mlp()
    opt = prsgd.LocalSGD(ours, optimizer="adamw", sync="gradients", **ADAMW)
    ddp = DDP(theirs)
    ref = torch.optim.AdamW(theirs.parameters(), **ADAMW)
    out["ddp"] = _side_by_side((ours, opt), (ddp, ref), batches(world_size, steps), rank)
    return out


ADAMW_RESUME_CASES = [
    dict(sync="params_and_momentum", period=4),
    dict(sync="params_only", period=4, outer_lr=0.7, outer_momentum=0.9),
    dict(sync="params_only", period=4, compression="int8", overlap=1),
    dict(sync="params_and_momentum", period=4, fragments=2),
    dict(sync="params_only", period=4, fragments=4, compression="int4", overlap=1),
    dict(sync="params_only", period=4, fragments=2, compression="topk:0.1", outer_lr=0.7, outer_momentum=0.9),
]
KILL_AT = (2, 5, 7)
"""Steps after which the run is saved and continued by a fresh model and optimizer: inside the first period, one
step after a round (an overlapped round in flight), the last step before a round."""


def adamw_resume(rank: int, world_size: int, steps: int) -> dict:
    """For each case and kill point: the straight run's parameters and state vs a run saved after the kill point
    (model and LocalSGD state dicts, through torch.save) and resumed by fresh objects."""
    import io

    def fresh(case):
        model = mlp(batchnorm=True)
        return model, prsgd.LocalSGD(model, optimizer="adamw", **ADAMW, **case)

    def train(model, opt, data):
        _train(model, opt, data, rank)

    data = batches(world_size, steps)
    out = []
    for case in ADAMW_RESUME_CASES:
        model, opt = fresh(case)
        train(model, opt, data)
        straight = _everything(opt)
        for kill in KILL_AT:
            model, opt = fresh(case)
            train(model, opt, data[:kill])
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
            del model, opt
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=False)
            model, opt = fresh(case)
            opt.load_state_dict(saved["opt"])
            model.load_state_dict(saved["model"])  # after the optimizer: either order resumes exactly
            train(model, opt, data[kill:])
            out.append((case, kill, torch.equal(_everything(opt), straight), opt.steps_done))
    return {"cases": out}


WRAPPED = {
    "Adam": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.95)),
    "RMSprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.9, centered=True),
}
WRAPPED_RULES = ("params_and_momentum", "params_clear_momentum", "params_only", "gradients")


def wrapped_optimizers(rank: int, world_size: int, steps: int) -> dict:
    """LocalSGD(model, optimizer=<a torch optimizer>) against the same torch optimizer on each rank with averaging
    written by hand: every period, the parameters and every state tensor shaped like its parameter averaged
    (params_and_momentum), the state dropped (params_clear_momentum: a fresh optimizer) or kept (params_only); the
    gradients averaged every step (gradients). Then a save after step 4 (inside a period) resumed by fresh objects."""
    out = {}
    period = 3
    for name, make in WRAPPED.items():
        for sync in WRAPPED_RULES:
            ours, theirs = mlp(), mlp()
            opt = prsgd.LocalSGD(ours, optimizer=make(ours.parameters()), sync=sync, period=period)
            ref = make(theirs.parameters())
            equal = []
            for t, (xs, ys) in enumerate(batches(world_size, steps)):
                opt.zero_grad()
                F.cross_entropy(ours(xs[rank]), ys[rank]).backward()
                opt.step()
                ref.zero_grad()
                F.cross_entropy(theirs(xs[rank]), ys[rank]).backward()
                if sync == "gradients":
                    _hand_average([p.grad for p in theirs.parameters()], world_size)
                ref.step()
                if sync != "gradients" and (t + 1) % period == 0:
                    with torch.no_grad():
                        _hand_average([p.data for p in theirs.parameters()], world_size)
                        for p in theirs.parameters():
                            kept = [v for v in ref.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
                            if sync == "params_and_momentum":
                                _hand_average(kept, world_size)
                        if sync == "params_clear_momentum":
                            ref.state.clear()
                equal.append(
                    all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters(), strict=True))
                )
            out[name, sync] = {"equal": equal, "comm": (opt.comm.rounds, opt.comm.bytes), "state": opt.state_dict()}

        # resume inside a period: bit for bit
        def fresh(make=make):
            model = mlp()
            return model, prsgd.LocalSGD(model, optimizer=make(model.parameters()), period=period)

        def train(model, o, data):
            _train(model, o, data, rank)

        data = batches(world_size, steps)
        model, o = fresh()
        train(model, o, data)
        straight = [p.detach().clone() for p in model.parameters()]
        model, o = fresh()
        train(model, o, data[:4])
        saved = copy.deepcopy({"model": model.state_dict(), "opt": o.state_dict()})
        model, o = fresh()
        model.load_state_dict(saved["model"])
        o.load_state_dict(saved["opt"])
        train(model, o, data[4:])
        out[name, "resumed"] = all(torch.equal(p, q) for p, q in zip(model.parameters(), straight, strict=True))
    return out


SCENARIOS = {
    "wrapped_optimizers": wrapped_optimizers,
    "adamw_vs_pytorch": adamw_vs_pytorch,
    "adamw_resume": adamw_resume,
    "ddp_guards": ddp_guards,
    "gradients_vs_ddp": gradients_vs_ddp,
    "consensus": consensus,
    "amp": amp,
    "accelerate_reference": accelerate_reference,
}
