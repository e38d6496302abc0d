"""The data types every loader returns: in-memory splits that hand out batches by index, and a dataset.

Images are kept as uint8 and normalised per batch (``(x / 255 - mean) / std`` per channel), so a dataset costs
its raw size in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from prsgd.errors import InvalidArgument


class DataError(InvalidArgument):
    """A dataset that cannot be read; the message names the path and what was expected there."""


class ArraySplit:
    """Examples held in memory: ``inputs`` (uint8 images, float features or int64 tokens) and int64 ``targets`` (a
    class per example, or per token of a sequence). ``labels``: what non-identical splits group examples by (their
    class by default; a text window's source file)."""

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        labels: Tensor | None = None,
    ):
        if len(inputs) != len(targets) or (labels is not None and len(labels) != len(targets)):
            raise DataError(
                f"{len(inputs)} inputs but {len(targets)} targets"
                + ("" if labels is None else f" and {len(labels)} labels")
            )
        self.inputs = inputs
        self.targets = targets
        self.mean = mean
        self.std = std
        self._labels = labels

    @property
    def labels(self) -> Tensor:
        """One label per example, for splits by class: ``labels`` if given, else the targets."""
        return self.targets if self._labels is None else self._labels

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Float inputs (normalised if images) and targets of ``indices`` (any shape; the batch keeps it)."""
        flat = indices.reshape(-1)
        x = self.inputs[flat]
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
            if self.mean is not None:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                x = (x - self.mean.view(shape)) / self.std.view(shape)
        y = self.targets[flat]
        return x.view(*indices.shape, *x.shape[1:]), y.view(*indices.shape, *y.shape[1:])

    def subset(self, indices: Tensor) -> ArraySplit:
        labels = None if self._labels is None else self._labels[indices]
        return ArraySplit(self.inputs[indices], self.targets[indices], self.mean, self.std, labels)


@dataclass(frozen=True)
class Dataset:
    """A classification task: ``train`` and ``test`` splits, ``num_classes``, one example's ``input_shape``."""

    name: str
    train: ArraySplit
    test: ArraySplit
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        for name, split in (("train", self.train), ("test", self.test)):
            targets = split.targets
            if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= self.num_classes):
                raise DataError(
                    f"{self.name}: {name} labels range over [{int(targets.min())}, {int(targets.max())}]; with "
                    f"{self.num_classes} classes they must lie in [0, {self.num_classes - 1}]"
                )

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def is_text(self) -> bool:
        """Token sequences: a target per input token (next-token prediction)."""
        return self.train.targets.dim() == 2


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: expected the file {str(path)!r}, which does not exist")
    return path
