"""prsgd.LocalSGD in your own training loop, launched with torchrun (one process per worker):

    torchrun --nproc-per-node 4 examples/own_loop.py --period 8
    torchrun --nproc-per-node 4 examples/own_loop.py --precision fp16 --clip 1.0 --lr-step 100   # AMP + clipping

Each rank reads its own shard of the data (DistributedSampler), runs momentum SGD locally and every --period steps
averages parameters, BatchNorm statistics and momentum with the others in one all-reduce (Algorithm 1). The model
is NOT wrapped in DistributedDataParallel: LocalSGD does all the communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import (
    accuracy,
    autocast,
    digits,
    local_rule,
    make_model,
    momentum_spread,
    options,
    round_options,
    save_state,
)
from torch.utils.data import DataLoader, DistributedSampler

import prsgd
from prsgd.engines.distributed import init_process_group


def main() -> None:
    args = options(__doc__.splitlines()[0]).parse_args()
    init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun's environment; dynamo first
    rank = dist.get_rank()
    train, test = digits(args.train_size)
    model = make_model(args.seed)  # move it to its device BEFORE building LocalSGD
    opt = prsgd.LocalSGD(
        model, args.lr, **local_rule(args), period=args.period, sync=args.sync, **round_options(args.round)
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, args.lr_step, gamma=0.5) if args.lr_step else None
    scaler = torch.amp.GradScaler("cpu") if args.precision == "fp16" else None
    sampler = DistributedSampler(train, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    spread = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for inputs, targets in loader:
            opt.zero_grad()
            with autocast(args.precision):
                loss = F.cross_entropy(model(inputs), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)  # clip the true gradients
            else:
                loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            if scaler is not None:
                scaler.step(opt)  # a skipped step still counts towards the period on this rank
                scaler.update()
            else:
                opt.step()  # every --period-th call also averages
            if scheduler is not None:
                scheduler.step()
            if args.out and opt.has_momentum:
                spread.append((opt.steps_done, momentum_spread(opt)))
    save_state(args.out, rank, model, opt, spread=spread)
    own = accuracy(model, test)
    opt.synchronize()  # one round now: every rank holds the average (export / evaluate this one)
    if rank == 0:
        print(f"{opt!r}")
        print(f"test accuracy: rank 0's own model {own:.4f}, averaged model {accuracy(model, test):.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
