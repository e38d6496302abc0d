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

import contextlib
import errno
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
    """Write ``data`` to ``path`` so that readers see the old content or all of the new, never a part. A write that
    fails (a full disk) removes its temporary file and raises :class:`CheckpointError` naming the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"{path.parent}: no space left to write {path.name} ({len(data)} bytes); the partial file was "
                "removed and earlier files are intact: free space, then resume with --resume"
            ) from None
        raise CheckpointError(f"{path}: cannot be written ({error.strerror or error})") from None
    _fsync_dir(path.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a log in one write; a full disk is a :class:`CheckpointError` naming the file (a line
    torn by a kill is skipped by readers, and a resumed run rewrites the log from its checkpoint)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as error:
        reason = error.strerror or str(error)
        raise CheckpointError(f"{path}: cannot be appended to ({reason}); free space, then --resume") from None


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
    prune(root, keep, up_to=step)
    return folder


def prune(root: Path, keep: int, up_to: int | None = None) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and incomplete ones older than the newest kept;
    with ``up_to``, only among the checkpoints of steps up to it (a newer one was not written by this run)."""
    if keep < 1:
        raise InvalidArgument(f"keep={keep!r} is not allowed; at least 1 checkpoint must be kept")
    folders = [f for f in _step_folders(root) if up_to is None or f.name <= step_dir(root, up_to).name]
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
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # refused by weights_only (a crafted pickle) or not torch.save output
            raise CheckpointError(f"{self.folder / entries[0]['file']}: not a prsgd shard ({error})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.folder / entries[0]['file']}: not a prsgd shard (a {type(state).__name__})")
        return state


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


_SHARD_FILE = re.compile(r"^rank-\d{5}\.pt$")


def _check_manifest(manifest: Any, where: Path) -> None:
    """The manifest's structure and types; a shard's ``file`` must be a plain shard name inside the folder."""
    problem = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        problem = f"not a prsgd checkpoint manifest of format {FORMAT}"
    elif not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("shards"), list):
        problem = "no integer step or no list of shards"
    elif not manifest["shards"]:
        problem = "lists no shard"
    else:
        for entry in manifest["shards"]:
            fields = {"rank": int, "file": str, "sha256": str, "bytes": int}
            if not isinstance(entry, dict) or any(not isinstance(entry.get(k), kind) for k, kind in fields.items()):
                problem = f"a shard entry {str(entry)[:80]!r} lacks rank, file, sha256 or bytes of the right types"
                break
            if not _SHARD_FILE.match(entry["file"]):
                problem = f"shard file {entry['file'][:80]!r} is not a shard name (rank-NNNNN.pt) inside the folder"
                break
    if problem is None:
        kinds = {"engine": str, "workers": int, "consensus": bool, "config": dict}
        wrong = [k for k, kind in kinds.items() if not isinstance(manifest.get(k), kind)]
        if wrong:
            problem = f"lacks {', '.join(wrong)} (or of the wrong type)"
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")


def verify(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder`` if its manifest and every shard are intact; :class:`CheckpointError` otherwise."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (the checkpoint was never completed)") from None
    except (OSError, ValueError, RecursionError) as error:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable ({error})") from None
    _check_manifest(manifest, folder / MANIFEST)
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


def scan(root: Path, first_only: bool = True) -> tuple[list[Checkpoint], list[str]]:
    """(the intact checkpoints under ``root``, newest first: only the newest with ``first_only``; why each newer
    completed one cannot be used). Damaged ones are also reported as warnings; folders without a manifest (never
    completed) are not counted."""
    intact, damaged = [], []
    for folder in _step_folders(root):
        try:
            intact.append(verify(folder))
        except CheckpointError as error:
            if (folder / MANIFEST).exists() and not intact:
                damaged.append(str(error))
                warnings.warn(f"skipping a damaged checkpoint: {error}; trying the previous one", stacklevel=2)
            continue
        if first_only:
            break
    return intact, damaged


def latest(root: Path) -> Checkpoint | None:
    """The newest intact checkpoint under ``root`` (None if there is none); damaged newer ones are reported."""
    intact, _ = scan(root)
    return intact[0] if intact else None
