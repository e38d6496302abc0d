"""prsgd with PyTorch Lightning: ``strategy=LocalSGDStrategy()`` and ``configure_optimizers`` returning LocalSGD.

    python examples/lightning_train.py --devices 2 --period 8 --precision bf16 --clip 1.0 --lr-step 100
    python examples/lightning_train.py --devices 2 --resume runs/lightning/checkpoints/last.ckpt

Lightning launches the processes (or runs under torchrun / SLURM) as with strategy="ddp"; the strategy leaves the
model unwrapped so that LocalSGD's rounds are the only communication, checkpoints every rank's state, and
synchronizes the workers when fit ends. Needs ``pip install -e ".[lightning]"``.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import accuracy, digits, local_rule, make_model, momentum_spread, options, round_options, save_state
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader

import prsgd
from prsgd.lightning import LocalSGDStrategy


class DigitsClassifier(pl.LightningModule):
    def __init__(self, args) -> None:
        super().__init__()
        self.args = args
        self.net = make_model(args.seed)
        self.train_data, self.test_data = digits(args.train_size)
        self.spread: list[tuple[int, float]] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs), targets)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        opt = self.optimizers().optimizer
        if self.args.out and opt.has_momentum:
            self.spread.append((opt.steps_done, momentum_spread(opt)))

    def configure_optimizers(self):
        a = self.args
        opt = prsgd.LocalSGD(
            self, a.lr, **local_rule(a), period=a.period, sync=a.sync, **round_options(a.round)
        )  # the module itself
        if not a.lr_step:
            return opt
        scheduler = torch.optim.lr_scheduler.StepLR(opt, a.lr_step, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_data, batch_size=self.args.batch_size, shuffle=True)  # Lightning shards it

    def on_train_end(self) -> None:  # before the strategy's final round: each rank's own state
        save_state(self.args.out, self.global_rank, self, self.optimizers().optimizer, spread=self.spread)


def main() -> None:
    parser = options(__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes on this machine")
    parser.add_argument("--checkpoints", default="", help="folder for a checkpoint at the end of every epoch")
    parser.add_argument("--resume", default="", help="a checkpoint to continue from")
    args = parser.parse_args()
    pl.seed_everything(args.seed, verbose=False)  # also the seed of the DistributedSampler Lightning adds
    model = DigitsClassifier(args)
    callbacks = []
    if args.checkpoints:
        callbacks.append(pl.callbacks.ModelCheckpoint(args.checkpoints, save_top_k=-1, save_last=True))
    if args.precision == "fp16":  # Lightning turns precision="16-mixed" into bf16 on the CPU; this plugin keeps fp16
        precision = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    else:
        precision = {"precision": {"32": "32-true", "bf16": "bf16-mixed"}[args.precision]}
    trainer = pl.Trainer(
        strategy=LocalSGDStrategy(),
        accelerator="cpu",
        devices=args.devices,
        max_epochs=args.epochs,
        **precision,
        gradient_clip_val=args.clip or None,
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoints),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, ckpt_path=args.resume or None)
    opt = trainer.optimizers[0]  # the strategy synchronized it when fit ended: every rank holds the average
    if trainer.global_rank == 0:
        print(f"{opt!r}")
        print(f"test accuracy of the averaged model: {accuracy(model, model.test_data):.4f}")
    if dist.is_initialized() and os.environ.get("PRSGD_EXAMPLE_DESTROY", "1") == "1":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
