"""A small GPT in nanoGPT's shape, for byte-level language modelling on CPU in minutes.

Token and position embeddings, pre-LayerNorm blocks of causal self-attention
(``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal=True``) and a GELU MLP, a final LayerNorm and a
head tied to the token embedding. The logits come out as ``(batch, vocab, time)``, classes in dimension 1 as torch's
losses take a sequence, so ``F.cross_entropy(model(x), y)`` with ``y`` of shape ``(batch, time)`` is the mean
next-token loss, and ``argmax(dim=1)`` the predicted tokens: the training loop stays the classifier's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """``vocab`` tokens, ``context`` positions, ``layers`` blocks of ``width`` channels in ``heads`` heads."""

    def __init__(self, vocab: int = 256, context: int = 64, width: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads}")
        self.context = context
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # tied, as in GPT-2 and nanoGPT
        self.apply(_init)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[-1]
        x = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        return self.head(self.ln(self.blocks(x))).transpose(1, 2)


def _init(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
