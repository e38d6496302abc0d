"""A run's output folder, safe against the accidents users meet: checked before any work, locked while the run
writes to it, never mixing two runs' checkpoints, and swept of the temporary files a killed run leaves.

- A path that is a file, lies under a file, or cannot be written is one clear error.
- An exclusive lock (``OUT/.lock``, ``flock``; released when the process ends, however it ends) keeps a second run
  out; the error names the holder's pid and host.
- A fresh run (no ``resume``) into a folder that holds checkpoints is refused: they belong to an earlier run, and
  this run's pruning would remove them or they would shadow its own. ``overwrite`` moves them aside
  (``checkpoints.old-N``), never deletes.
- Temporary files of an earlier, killed process (``.NAME.tmp-PID``) are removed at start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from prsgd.errors import PrsgdError


class OutFolderError(PrsgdError):
    """An output folder that cannot be used as asked; the message names it and what to do."""


def _writable_folder(path: Path) -> None:
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise OutFolderError(f"--out {str(path)!r}: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutFolderError(f"--out {str(path)!r}: {str(parent)!r} is not writable by this user")
            return


class OutFolder:
    """``OUT`` prepared for one run (see the module docstring); :meth:`close` releases the lock."""

    def __init__(self, path: str | Path, *, resume: bool, overwrite: bool) -> None:
        self.path = Path(path)
        _writable_folder(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutFolderError(f"--out {str(self.path)!r} cannot be created: {error.strerror}") from None
        self._lock = self._take_lock()
        sweep_temporary_files(self.path)
        checkpoints = self.path / "checkpoints"
        if not resume and _holds_checkpoints(self.path):
            if not overwrite:
                self.close()
                raise _earlier_run(self.path)
            aside = _free_name(self.path / "checkpoints.old")
            checkpoints.rename(aside)
            self.moved_aside: Path | None = aside
        else:
            self.moved_aside = None

    def _take_lock(self) -> int:
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutFolderError(
                f"--out {str(self.path)!r} is in use by another run ({holder}); wait for it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd

    def close(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock)
            self._lock = None


def check_out(path: str | Path, *, resume: bool, overwrite: bool) -> None:
    """What :class:`OutFolder` would refuse, checked without touching anything (a sweep checks every run's folder
    before the first run starts); the lock is taken only when the run opens the folder."""
    path = Path(path)
    _writable_folder(path)
    if not resume and not overwrite and _holds_checkpoints(path):
        raise _earlier_run(path)


def _holds_checkpoints(path: Path) -> bool:
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def _earlier_run(path: Path) -> OutFolderError:
    return OutFolderError(
        f"--out {str(path)!r} holds the checkpoints of an earlier run: continue that run with --resume, pass "
        "--overwrite to move them aside (nothing is deleted), or choose another --out"
    )


def _free_name(base: Path) -> Path:
    k = 1
    while Path(f"{base}-{k}").exists():
        k += 1
    return Path(f"{base}-{k}")


def sweep_temporary_files(root: Path) -> list[Path]:
    """Remove ``.NAME.tmp-PID`` files (what :func:`prsgd.training.checkpoint.atomic_write` writes before its rename)
    whose
    process is gone, under ``root``; return them."""
    removed = []
    for tmp in Path(root).rglob(".*.tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
