"""ImageFolder trees (ImageNet-style): ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (or
``test``), images of any format Pillow reads. Files are listed once and decoded lazily, batch by batch, resized
to a square ``image_size`` and normalised with the ImageNet channel statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from prsgd.data.types import DataError, Dataset

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class ImageFileSplit:
    """Image files with labels; ``batch(indices)`` decodes just those files."""

    def __init__(self, paths: list[Path], targets: Tensor, image_size: int) -> None:
        self.paths = paths
        self.targets = targets
        self.image_size = image_size
        self.mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(STD).view(1, 3, 1, 1)

    @property
    def labels(self) -> Tensor:
        """What non-identical splits group examples by: their class."""
        return self.targets

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, path: Path) -> Tensor:
        from PIL import Image, UnidentifiedImageError

        try:
            with path.open("rb") as file, Image.open(file) as image:  # only regular files are listed
                rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
                return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise DataError(f"imagefolder: cannot decode image {str(path)!r}: {error}") from None

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        flat = indices.reshape(-1)
        x = torch.stack([self._decode(self.paths[int(i)]) for i in flat]).float().div_(255)
        x = (x - self.mean) / self.std
        return x.view(*indices.shape, *x.shape[1:]), self.targets[flat].view(indices.shape)

    def subset(self, indices: Tensor) -> ImageFileSplit:
        return ImageFileSplit([self.paths[int(i)] for i in indices], self.targets[indices], self.image_size)


def _scan(folder: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    elif found and not set(found) <= set(classes):
        extra = sorted(set(found) - set(classes))
        raise DataError(f"imagefolder: {str(folder)!r} has class folders {extra} that the training split lacks")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        before = len(paths)
        for file in sorted(class_dir.rglob("*")):
            # regular files only: opening a FIFO or device named x.jpg would block or read forever
            if file.suffix.lower() in EXTENSIONS and file.is_file():
                paths.append(file)
                labels.append(label)
        if len(paths) == before:
            raise DataError(
                f"imagefolder: class folder {str(class_dir)!r} holds no images ({', '.join(sorted(EXTENSIONS))}); "
                "remove it or add its images"
            )
    if not paths:
        raise DataError(
            f"imagefolder: no images under {str(folder)!r}; expected class folders holding "
            f"{', '.join(sorted(EXTENSIONS))} files"
        )
    return paths, labels, classes


def load_imagefolder(path: str = "", seed: int = 0, image_size: int = 224) -> Dataset:
    root = Path(path)
    if not path or not root.is_dir():
        raise DataError(
            f"imagefolder: data.path={path!r} is not a folder; expected ROOT/train/<class>/<image> and "
            "ROOT/val/<class>/<image> (or ROOT/test/...)"
        )
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"imagefolder: {str(root)!r} must hold a 'train' folder and a 'val' (or 'test') folder")
    train_paths, train_labels, classes = _scan(train_dir, None)
    test_paths, test_labels, _ = _scan(test_dir, classes)
    return Dataset(
        "imagefolder",
        ImageFileSplit(train_paths, torch.tensor(train_labels), image_size),
        ImageFileSplit(test_paths, torch.tensor(test_labels), image_size),
        len(classes),
        (3, image_size, image_size),
    )
