"""Atomic, checksummed, sharded checkpoints: ``OUT/checkpoints/step-000000120/{rank-00000.pt, ..., manifest.json}``.

Each worker process writes its own shard (the simulator, holding every worker, writes one); then the first rank writes
``manifest.json`` with every shard's SHA-256 and size, the world size and whether all workers held the same state
(a *consensus* checkpoint, taken right after a full sync). Every file is written to a temporary name, fsynced and
renamed, so a crash leaves either the old file or the new one. A checkpoint counts only once its manifest exists
and every shard matches its checksum: a truncated or corrupted one is reported and the previous one is used.
Only the newest ``keep`` complete checkpoints are kept.

All ranks must see the same folder (a shared filesystem, as usual under torchrun on a cluster): a run checks at
every checkpoint that the first rank sees every shard (:func:`missing_shards`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prsgd.errors import CheckpointError, InvalidArgument

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{9})$")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def shard_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_shard(root: Path, step: int, rank: int, state: dict[str, Any]) -> dict[str, Any]:
    """Write one rank's ``state`` (tensors, numbers, strings, lists, dicts) for ``step``; return its manifest entry."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    atomic_write(step_dir(root, step) / shard_name(rank), data)
    return {"rank": rank, "file": shard_name(rank), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_manifest(root: Path, step: int, shards: list[dict[str, Any]], meta: dict[str, Any], keep: int) -> Path:
    """Complete the checkpoint of ``step`` (its shards are written) and drop all but the newest ``keep``."""
    folder = step_dir(root, step)
    manifest = {"format": FORMAT, "step": step, "shards": sorted(shards, key=lambda s: s["rank"]), **meta}
    atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    prune(root, keep)
    return folder


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and incomplete ones older than the newest kept."""
    if keep < 1:
        raise InvalidArgument(f"keep={keep!r} is not allowed; at least 1 checkpoint must be kept")
    folders = _step_folders(root)
    complete = [f for f in folders if (f / MANIFEST).exists()]
    kept = set(complete[:keep])
    newest = complete[0] if complete else None
    for folder in folders:
        if folder in kept or newest is None or folder.name > newest.name:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def _step_folders(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, newest step first."""
    if not Path(root).is_dir():
        return []
    return sorted((p for p in Path(root).iterdir() if _STEP_DIR.match(p.name)), key=lambda p: p.name, reverse=True)


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return len(self.manifest["shards"])

    def load(self, rank: int) -> dict[str, Any]:
        """Rank ``rank``'s state, its checksum checked again (the file may have changed since it was found)."""
        entries = [s for s in self.manifest["shards"] if s["rank"] == rank]
        if not entries:
            raise CheckpointError(f"checkpoint {self.folder} has no shard for rank {rank} (it has {self.world_size})")
        data = _read_checked(self.folder, entries[0])
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _read_checked(folder: Path, entry: dict[str, Any]) -> bytes:
    path = folder / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror})") from None
    if len(data) != entry["bytes"]:
        raise CheckpointError(f"{path}: {len(data)} bytes on disk, {entry['bytes']} written (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match the manifest (corrupted)")
    return data


def verify(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder`` if its manifest and every shard are intact; :class:`CheckpointError` otherwise."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (the checkpoint was never completed)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("shards"):
        raise CheckpointError(f"{folder / MANIFEST}: not a prsgd checkpoint manifest of format {FORMAT}")
    for entry in manifest["shards"]:
        _read_checked(folder, entry)
    return Checkpoint(folder, manifest)


def missing_shards(folder: Path, shards: list[dict[str, Any]]) -> list[int]:
    """The ranks whose shard (as listed) is not in ``folder`` with its size, seen from this process."""
    missing = []
    for entry in shards:
        try:
            size = (Path(folder) / entry["file"]).stat().st_size
        except OSError:
            size = -1
        if size != entry["bytes"]:
            missing.append(int(entry["rank"]))
    return missing


def scan(root: Path) -> tuple[Checkpoint | None, list[str]]:
    """(the newest intact checkpoint under ``root`` or None, why each newer completed one cannot be used); damaged
    ones are also reported as warnings. Folders without a manifest (never completed) are not counted."""
    damaged = []
    for folder in _step_folders(root):
        try:
            return verify(folder), damaged
        except CheckpointError as error:
            if (folder / MANIFEST).exists():
                damaged.append(str(error))
                warnings.warn(f"skipping a damaged checkpoint: {error}; trying the previous one", stacklevel=2)
    return None, damaged


def latest(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root`` (None if there is none); damaged newer ones are reported."""
    return scan(root)[0]
