"""Run by tests/test_examples.py: a Lightning run on 2 CPU ranks whose callback calls ``trainer.save_checkpoint`` on
rank 0 alone (the common mistake); LocalSGDStrategy must fail within its checkpoint_wait with an error that says to
call it on every rank, instead of hanging in the checkpoint's gather until the process group's timeout."""

from __future__ import annotations

import datetime
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import prsgd
from prsgd.lightning import LocalSGDStrategy


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return prsgd.LocalSGD(self, 0.1, momentum=0.9, period=4)


class SaveOnRankZeroOnly(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == 2 and trainer.is_global_zero:
            trainer.save_checkpoint(self.path)


def main() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    trainer = pl.Trainer(
        strategy=LocalSGDStrategy(checkpoint_wait=3.0, timeout=datetime.timedelta(seconds=120)),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        callbacks=[SaveOnRankZeroOnly(sys.argv[1])],
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=8))


if __name__ == "__main__":
    main()
