"""CIFAR-10 from the standard "python version" distribution: the ``cifar-10-python.tar.gz`` tarball or its
extracted ``cifar-10-batches-py`` folder (``data_batch_1`` ... ``data_batch_5``, ``test_batch``). Nothing is
downloaded. The batches are Python pickles, as distributed; they are read with an unpickler that admits only what
the format holds (dicts, lists, bytes, strings, numbers and numpy arrays), so a crafted file cannot run code: it is
refused with a :class:`DataError`, as is a member larger than the format's batches can be."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from prsgd.data.types import ArraySplit, DataError, Dataset

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCHES = ["test_batch"]
FOLDER = "cifar-10-batches-py"
EXPECTED = f"{FOLDER}/{{{', '.join(TRAIN_BATCHES + TEST_BATCHES)}}} (or the tarball cifar-10-python.tar.gz)"
MAX_BATCH_BYTES = 64 * 2**20  # a real batch is 31 MB (10000 images of 3072 bytes, labels, file names)
SAFE_GLOBALS = {  # what pickled numpy arrays refer to, in numpy 1.x and 2.x
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class _BatchUnpickler(pickle.Unpickler):
    """A pickle reader that resolves no name except numpy's array reconstruction: any other global (``os.system``,
    ``builtins.eval``, ...) is refused before it could be called."""

    def find_class(self, module: str, name: str):
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(f"refers to {module}.{name}, which a CIFAR-10 batch never holds; refused, not run")


def _decode(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"a {type(batch).__name__}, not a dict")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except DataError as error:
        raise DataError(f"cifar10: {where} {error}") from None
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise DataError(f"cifar10: {where} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(
            f"cifar10: {where} has data of shape {data.shape} and {len(labels)} labels; expected (n, 3072) and n labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_batches(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = TRAIN_BATCHES + TEST_BATCHES
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
                missing = [n for n in names if n not in members]
                if missing:
                    raise DataError(f"cifar10: tarball {str(path)!r} lacks {', '.join(missing)}; expected {EXPECTED}")
                for n in names:
                    _check_size(members[n].size, f"{path}:{n}")
                return {n: _decode(tar.extractfile(members[n]).read(), f"{path}:{n}") for n in names}
        except (tarfile.TarError, EOFError, OSError) as error:
            raise DataError(f"cifar10: {str(path)!r} is not a readable tarball: {error}") from None
    folder = path / FOLDER if (path / FOLDER).is_dir() else path
    if not folder.is_dir():
        raise DataError(f"cifar10: {str(path)!r} does not exist; expected {EXPECTED}")
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"cifar10: {str(folder)!r} lacks {', '.join(missing)}; expected {EXPECTED}")
    for n in names:
        _check_size((folder / n).stat().st_size, str(folder / n))
    return {n: _decode((folder / n).read_bytes(), str(folder / n)) for n in names}


def _check_size(size: int, where: str) -> None:
    if size > MAX_BATCH_BYTES:
        raise DataError(
            f"cifar10: {where} is {size} bytes; a CIFAR-10 batch is about 31 MB (at most {MAX_BATCH_BYTES} accepted)"
        )


def load_cifar10(path: str = "", seed: int = 0) -> Dataset:
    """CIFAR-10 (50k train / 10k test 32x32 colour images, 10 classes) from ``path``: the tarball, the extracted
    ``cifar-10-batches-py`` folder, or the folder containing it."""
    if not path:
        raise DataError(f"cifar10: set data.path to the CIFAR-10 python tarball or folder; expected {EXPECTED}")
    batches = _read_batches(Path(path))

    def split(names: list[str]) -> ArraySplit:
        x = torch.from_numpy(np.concatenate([batches[n][0] for n in names]))
        y = torch.from_numpy(np.concatenate([batches[n][1] for n in names]))
        return ArraySplit(x, y, mean=torch.tensor(MEAN), std=torch.tensor(STD))

    return Dataset("cifar10", split(TRAIN_BATCHES), split(TEST_BATCHES), 10, (3, 32, 32))
