"""CIFAR-style augmentation over whole batches in torch (no torchvision): random crop with zero padding and
random horizontal flip, drawn from an explicit generator so that both engines augment identically."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Per image: pad by ``padding`` with zeros, crop back to the original size at a random offset, and flip
    horizontally with probability 1/2. ``images``: (B, C, H, W) on any device; randomness drawn on the CPU."""
    b, c, h, w = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(images.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = (offsets[0, :, None] + torch.arange(h, device=images.device)).view(b, 1, h, 1)
    j = torch.arange(w, device=images.device)
    cols = offsets[1, :, None] + torch.where(flips[:, None], w - 1 - j, j)  # a flip reads the crop backwards
    cols = cols.view(b, 1, 1, w)
    batch = torch.arange(b, device=images.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[batch, channel, rows, cols]
