"""Loaders read small files generated here in the real formats, and reject corrupt or missing ones clearly."""

from __future__ import annotations

import gzip
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from prsgd.data import DataError, load_dataset
from prsgd.data.augment import random_crop_flip
from prsgd.data.cifar import load_cifar10
from prsgd.data.idx import FASHION_MNIST_DEBIAN, load_idx_dataset
from prsgd.data.imagefolder import load_imagefolder


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_folder(root: Path, n_train=30, n_test=10, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(root / name, array)
    return arrays


def test_idx_files_are_read_exactly(tmp_path):
    arrays = make_idx_folder(tmp_path)
    data = load_idx_dataset("mnist", str(tmp_path))
    assert len(data.train) == 30 and len(data.test) == 10 and data.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(data.train.inputs[:, 0].numpy(), arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(data.test.targets.numpy(), arrays["t10k-labels-idx1-ubyte.gz"])
    x, y = data.train.batch(torch.tensor([[0, 1], [2, 3]]))
    assert x.shape == (2, 2, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (2, 2)
    expected = (arrays["train-images-idx3-ubyte.gz"][3] / 255 - data.train.mean.item()) / data.train.std.item()
    np.testing.assert_allclose(x[1, 1, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_truncated_idx_file_is_rejected(tmp_path):
    make_idx_folder(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated or corrupt"):
        load_idx_dataset("mnist", str(tmp_path))


def test_idx_with_a_bad_magic_number_and_a_missing_file(tmp_path):
    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x12\x34\x56\x78rest"))
    with pytest.raises(DataError, match=r"bad magic number 12345678"):
        load_idx_dataset("mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"expected the file .*t10k-labels-idx1-ubyte\.gz.*does not exist"):
        load_idx_dataset("mnist", str(tmp_path))
    with pytest.raises(DataError, match=r"folder .*nowhere.* does not exist; expected it to hold train-images"):
        load_idx_dataset("mnist", str(tmp_path / "nowhere"))


@pytest.mark.skipif(not Path(FASHION_MNIST_DEBIAN).is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    data = load_dataset("fashion_mnist")
    assert (len(data.train), len(data.test), data.num_classes) == (60000, 10000, 10)
    assert torch.bincount(data.train.targets).tolist() == [6000] * 10


def cifar_batches(rng, n=6):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {
        name: {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        for name in names
    }


@pytest.mark.parametrize("form", ["folder", "parent", "tarball"])
def test_cifar10_python_format(tmp_path, form):
    batches = cifar_batches(np.random.default_rng(0))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch))
    path = {"folder": folder, "parent": tmp_path, "tarball": tmp_path / "cifar-10-python.tar.gz"}[form]
    if form == "tarball":
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    data = load_cifar10(str(path))
    assert len(data.train) == 30 and len(data.test) == 6 and data.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(data.train.inputs[6].numpy().reshape(-1), batches["data_batch_2"][b"data"][0])
    assert data.test.targets.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_missing_and_corrupt(tmp_path):
    with pytest.raises(
        DataError, match=r"cifar10: .*nope.* does not exist; expected cifar-10-batches-py/\{data_batch_1"
    ):
        load_cifar10(str(tmp_path / "nope"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in cifar_batches(np.random.default_rng(1)).items():
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"lacks data_batch_3"):
        load_cifar10(str(folder))
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match=r"data_batch_3 is not a CIFAR-10 python batch"):
        load_cifar10(str(folder))
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"not a readable tarball"):
        load_cifar10(str(tmp_path / "broken.tar.gz"))


def make_image_tree(root: Path, classes=("cat", "dog", "eel"), per_class=3, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{k}.png")


def test_imagefolder_tree(tmp_path):
    make_image_tree(tmp_path)
    data = load_imagefolder(str(tmp_path), image_size=16)
    assert data.num_classes == 3 and len(data.train) == 9 and len(data.test) == 9
    assert data.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    x, y = data.train.batch(torch.tensor([[0, 4], [8, 1]]))
    assert x.shape == (2, 2, 3, 16, 16) and y.tolist() == [[0, 1], [2, 0]]
    assert x.abs().max() < 3 and x.std() > 0.5  # normalised with ImageNet statistics


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=r"data\.path=.* is not a folder; expected ROOT/train/<class>/<image>"):
        load_imagefolder(str(tmp_path / "missing"))
    make_image_tree(tmp_path)
    (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not a png")
    data = load_imagefolder(str(tmp_path), image_size=8)
    with pytest.raises(DataError, match=r"cannot decode image .*cat/0\.png"):
        data.train.batch(torch.tensor([0]))
    (tmp_path / "val" / "whale").mkdir()
    (tmp_path / "val" / "whale" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"class folders \['whale'\] that the training split lacks"):
        load_imagefolder(str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"dataset='imagenet' is not known; allowed: digits, synthetic"):
        load_dataset("imagenet")


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = torch.arange(6 * 2 * 8 * 8, dtype=torch.float32).view(6, 2, 8, 8) + 1
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    again = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(6):
        crops = [padded[b, :, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[b], c) or torch.equal(out[b], c.flip(-1)) for c in crops)
    assert not torch.equal(out, x)


class _Payload:
    """Unpickling this runs ``os.system(command)``: what a crafted CIFAR batch could do with plain pickle.loads."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize("form", ["folder", "tarball"])
def test_a_crafted_cifar_batch_is_refused_and_never_runs(tmp_path, form):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in cifar_batches(np.random.default_rng(0)).items():
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(f"touch {marker}"), b"labels": [0]}))
    path = folder
    if form == "tarball":
        path = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match=r"data_batch_1 refers to posix\.system, which a CIFAR-10 batch never holds"):
        load_cifar10(str(path))
    assert not marker.exists()


def test_an_oversized_cifar_member_is_refused_before_it_is_read(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, batch in cifar_batches(np.random.default_rng(0)).items():
        (folder / name).write_bytes(pickle.dumps(batch))
    with (folder / "test_batch").open("r+b") as f:
        f.truncate(65 * 2**20)  # sparse: no disk used
    with pytest.raises(DataError, match=r"test_batch is 68157440 bytes; a CIFAR-10 batch is about 31 MB"):
        load_cifar10(str(folder))
