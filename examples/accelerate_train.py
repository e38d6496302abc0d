"""prsgd with Hugging Face accelerate: prepare the optimizer and the dataloader, not the model.

    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py --period 8
    torchrun --nproc-per-node 2 examples/accelerate_train.py --precision bf16 --clip 1.0 --checkpoints runs/acc
    torchrun --nproc-per-node 2 examples/accelerate_train.py --precision bf16 --clip 1.0 --resume runs/acc/epoch-1

accelerate shards the dataloader across processes (rank r gets batches r, r + N, ...) and handles mixed precision;
LocalSGD does all the communication (the model is never wrapped in DistributedDataParallel). Needs
``pip install -e ".[accelerate]"``.
"""

from __future__ import annotations

import torch._dynamo  # noqa: F401  before accelerate creates the process group (see prsgd.engines.distributed)
import torch.nn.functional as F
from accelerate import Accelerator
from common import accuracy, digits, local_rule, make_model, momentum_spread, options, round_options, save_state
from torch.utils.data import DataLoader

import prsgd
import prsgd.accelerate


def main() -> None:
    parser = options(__doc__.splitlines()[0])
    parser.add_argument("--no-shuffle", action="store_true", help="read the data in order")
    parser.add_argument("--checkpoints", default="", help="accelerator.save_state into FOLDER/epoch-E after each epoch")
    parser.add_argument("--resume", default="", help="accelerator.load_state from this folder, then continue")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True, mixed_precision={"32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision])
    train, test = digits(args.train_size)
    model = make_model(args.seed).to(accelerator.device)  # on its device BEFORE LocalSGD is built
    opt = prsgd.LocalSGD(
        model, args.lr, **local_rule(args), period=args.period, sync=args.sync, **round_options(args.round)
    )
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=not args.no_shuffle)
    opt, loader = prsgd.accelerate.prepare(accelerator, model, opt, loader)  # not the model
    accelerator.register_for_checkpointing(model)  # every rank's own state is saved by prsgd's hooks
    if args.resume:
        accelerator.load_state(args.resume)  # this rank's parameters, momentum and round state: at the next forward
    spread = []
    for epoch in range(opt.steps_done // len(loader), args.epochs):
        for inputs, targets in loader:
            with accelerator.autocast():  # the model is not prepared, so autocast is ours to apply
                loss = F.cross_entropy(model(inputs), targets)
            accelerator.backward(loss)
            if args.clip:
                accelerator.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad()
            if args.out and args.momentum > 0:
                spread.append((opt.steps_done, momentum_spread(opt.optimizer)))
        if args.checkpoints:
            accelerator.save_state(f"{args.checkpoints}/epoch-{epoch + 1}")
    save_state(args.out, accelerator.process_index, model, opt.optimizer, spread=spread)
    opt.synchronize()
    if accelerator.is_main_process:
        print(f"{opt!r}")
        print(f"comm: {opt.comm}; test accuracy of the averaged model: {accuracy(model, test):.4f}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
