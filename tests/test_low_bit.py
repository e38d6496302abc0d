"""int4 and top-k rounds (issue 28): what one value becomes when sent, against tests/reference.py's ``low`` (written
independently of the codecs); top-k's bytes, indices included; and the bad values refused (int4's bytes and error
feedback over 1000 rounds: tests/test_compression.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import batches, mlp
from reference import low

import prsgd
from prsgd.algorithm.compression import codec_for

N = 4


@pytest.mark.parametrize("codec", ["int4", "topk:0.01", "topk:0.3", "topk:1"])
@pytest.mark.parametrize("numel", [1, 127, 1000, 9000])
def test_what_a_value_becomes_when_sent_is_the_references(codec, numel):
    values = torch.randn(3, numel, generator=torch.Generator().manual_seed(numel)) * torch.logspace(-3, 1, numel)
    c = codec_for(codec)
    sent = c.decode(c.encode(values), numel)[:, :numel]
    for row, mine in zip(values, sent, strict=True):
        assert torch.equal(mine, low(codec, row))


@pytest.mark.parametrize("fraction", [0.01, 0.1])
def test_topk_sends_its_fraction_of_each_chunk_with_int16_indices(fraction):
    kw = dict(lr=0.1, momentum=0.9, period=1)
    model = mlp(hidden=1000)
    exact = prsgd.Simulator(model, num_workers=N, **kw)
    topk = prsgd.Simulator(model, num_workers=N, compression=f"topk:{fraction}", **kw)
    for x, y in batches(N, 2):
        exact.step(x, y, F.cross_entropy)
        topk.step(x, y, F.cross_entropy)
    values = exact.comm.bytes // exact.comm.rounds // 4
    chunks = -(-values // 4096)  # of near-equal length
    per_chunk = math.ceil(fraction * -(-values // chunks)) * (2 + 4)  # an int16 index and an fp32 value each
    assert topk.comm.bytes // topk.comm.rounds == chunks * per_chunk
    assert topk.comm.bytes / exact.comm.bytes < 1.55 * fraction  # 6 bytes per sent value, 4 per exact one


@pytest.mark.parametrize(
    ("compression", "message"),
    [
        ("topk:0", r"compression='topk:0' is not allowed; topk takes the fraction .* in \(0, 1\]"),
        ("topk:1.5", r"compression='topk:1.5' is not allowed"),
        ("topk:x", r"compression='topk:x' is not allowed"),
        ("int2", r"compression='int2' is not known; allowed: None, bf16, fp16, int8, int4, topk:<fraction>"),
    ],
)
def test_bad_compression_is_refused_with_what_is_allowed(compression, message):
    with pytest.raises(prsgd.InvalidArgument, match=message):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, period=2, compression=compression)
    with pytest.raises(prsgd.InvalidArgument, match=r"compression='topk:0.1' changes averaging rounds; sync='gossip'"):
        prsgd.Simulator(mlp(), num_workers=N, lr=0.1, sync="gossip", topology="ring", compression="topk:0.1")
