"""The language-model workload: the standard-library text dataset (read from a folder the test writes, and from
this interpreter's), its split by module, and the GPT (causal, tied, a shape torch's losses take)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prsgd.data.datasets import load_dataset
from prsgd.data.splits import partition
from prsgd.data.text import TRAIN_MODULES, VALIDATION_MODULES, load_stdlib_text
from prsgd.data.types import DataError
from prsgd.models import GPT, build_model


def _write_stdlib(folder, sizes=None):
    """Every listed module, module k holding bytes k, k+1, ... (so windows can be told apart)."""
    for k, module in enumerate((*TRAIN_MODULES, *VALIDATION_MODULES)):
        file = folder / module
        file.parent.mkdir(parents=True, exist_ok=True)
        size = (sizes or {}).get(module, 200 + 10 * k)
        file.write_bytes(bytes((k + i) % 256 for i in range(size)))


def test_windows_are_next_byte_pairs_split_by_file_with_each_windows_module(tmp_path):
    _write_stdlib(tmp_path)
    data = load_stdlib_text(str(tmp_path), context=8)
    assert data.is_text and data.num_classes == 256 and data.input_shape == (8,)
    first = (tmp_path / TRAIN_MODULES[0]).read_bytes()
    assert data.train.inputs[0].tolist() == list(first[:8]) and data.train.targets[0].tolist() == list(first[1:9])
    assert data.train.inputs[1].tolist() == list(first[9:17])  # non-overlapping windows of 9 bytes
    counts = [(200 + 10 * k) // 9 for k in range(len(TRAIN_MODULES))]
    assert len(data.train) == sum(counts)
    assert torch.bincount(data.train.labels).tolist() == counts  # each window's module
    validation = sum((200 + 10 * (len(TRAIN_MODULES) + k)) // 9 for k in range(len(VALIDATION_MODULES)))
    assert len(data.test) == validation
    x, y = data.train.batch(torch.tensor([[0, 1], [2, 3]]))
    assert x.shape == y.shape == (2, 2, 8) and x.dtype == y.dtype == torch.int64


def test_the_classes_split_gives_workers_disjoint_modules_that_cover_all():
    labels = torch.arange(24).repeat_interleave(5)
    shards = partition(labels, 4, "classes", classes_per_worker=6, seed=1)
    held = [set(labels[s].tolist()) for s in shards]
    assert all(len(h) == 6 for h in held) and set().union(*held) == set(range(24))
    assert sum(len(s) for s in shards) == len(labels)


def test_a_missing_module_or_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        load_stdlib_text(str(tmp_path / "nowhere"))
    _write_stdlib(tmp_path)
    (tmp_path / "json" / "decoder.py").unlink()
    with pytest.raises(DataError, match=r"expected the file '.*json/decoder.py', which does not exist"):
        load_stdlib_text(str(tmp_path))


def test_this_interpreters_standard_library_loads():
    data = load_dataset("stdlib_text")
    assert len(data.train) > 5000 and len(data.test) > 500


def test_the_gpt_is_causal_tied_and_its_logits_fit_cross_entropy():
    model = build_model("gpt", (16,), 256, hidden=32)
    assert isinstance(model, GPT) and model.head.weight is model.tokens.weight
    x = torch.randint(0, 256, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 256, 16)
    assert F.cross_entropy(logits, torch.randint(0, 256, (3, 16))).shape == ()
    changed = x.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256  # a later token does not change earlier predictions
    torch.testing.assert_close(model(changed)[:, :, :10], logits[:, :, :10])
    assert not torch.allclose(model(changed)[:, :, 10:], logits[:, :, 10:])
    with pytest.raises(ValueError, match=r"model='gpt' needs token sequences"):
        build_model("gpt", (1, 8, 8), 10)
