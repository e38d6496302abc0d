"""MNIST and Fashion-MNIST in their IDX format (``*-idx3-ubyte.gz`` images, ``*-idx1-ubyte.gz`` labels)."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import torch

from prsgd.data.types import ArraySplit, DataError, Dataset, require_file

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array; :class:`DataError` if the header or size is wrong."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{str(path)!r} is not a readable (gzip) IDX file: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{str(path)!r} is not an IDX file of unsigned bytes (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{str(path)!r} is truncated in its IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape)  # Python ints: no overflow
    if len(raw) - header != expected:
        raise DataError(
            f"{str(path)!r} holds {len(raw) - header} bytes of data but its header announces shape {shape} "
            f"({expected} bytes): the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dataset(name: str, folder: str) -> Dataset:
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"{name}: folder {folder!r} does not exist; expected it to hold {', '.join(FILES['train'] + FILES['test'])}"
        )
    splits = {}
    for split, (images_file, labels_file) in FILES.items():
        images = read_idx(require_file(root / images_file, name))
        labels = read_idx(require_file(root / labels_file, name))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{name}: {images_file} has shape {images.shape} and {labels_file} has shape {labels.shape}; "
                "expected (n, rows, cols) images and n labels"
            )
        x = torch.from_numpy(images.copy()).unsqueeze(1)  # (n, 1, rows, cols) uint8
        splits[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    mean = splits["train"][0].float().div(255).mean().reshape(1)
    std = splits["train"][0].float().div(255).std().reshape(1)
    num_classes = max(int(splits["train"][1].max()), int(splits["test"][1].max())) + 1  # both splits' labels
    train = ArraySplit(*splits["train"], mean=mean, std=std)
    test = ArraySplit(*splits["test"], mean=mean, std=std)
    return Dataset(name, train, test, num_classes, tuple(train.inputs.shape[1:]))


def load_fashion_mnist(path: str = "", seed: int = 0) -> Dataset:
    """Fashion-MNIST; default folder: Debian's package ``dataset-fashion-mnist`` (``/usr/share/datasets/...``)."""
    folder = path or FASHION_MNIST_DEBIAN
    if not path and not Path(folder).is_dir():
        raise DataError(
            f"fashion_mnist: folder {folder!r} does not exist; install it with "
            "'apt-get update && apt-get install -y dataset-fashion-mnist' (as root) or set data.path"
        )
    return load_idx_dataset("fashion_mnist", folder)


def load_mnist(path: str = "", seed: int = 0) -> Dataset:
    if not path:
        raise DataError("mnist: set data.path to the folder holding the four MNIST *-ubyte.gz files")
    return load_idx_dataset("mnist", path)
