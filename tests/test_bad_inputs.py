"""A corpus of bad inputs through the CLI, as an attacker or an unlucky user would give them: every case ends in one
``prsgd <cmd>: error:`` line, a non-zero exit and no traceback, and nothing is written outside ``--out``."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # one process per case

SMALL = ["--dataset", "digits", "--model", "mlp", "--workers", "2", "--epochs", "0.5", "--evals", "1", "--no-progress"]


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prsgd.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


def assert_one_clear_error(done: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert all(line.startswith(f"prsgd {command}: error: ") for line in errors), errors
    assert len(errors) == 1, done.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


class Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def cifar_folder(root: Path, *, poison: Path | None = None, label: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), b"labels": [label] + [1] * 7}
        (folder / name).write_bytes(pickle.dumps(batch))
    if poison is not None:
        (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(f"touch {poison}"), b"labels": [0]}))
    return folder


def idx_folder(root: Path, images_shape_header: tuple[int, ...] | None = None) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (n, 28, 28))),
            ("labels-idx1", rng.integers(0, 10, n)),
        ):
            shape = images_shape_header if (images_shape_header and kind.startswith("images")) else array.shape
            header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)
            with gzip.open(root / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return root


def tree_digest(root: Path, skip: Path) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``) with its SHA-256: what a case may not touch."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "other"
        for p in sorted(root.rglob("*"))
        if skip not in p.parents and p != skip and not p.is_dir()
    }


def image_folder(root: Path, *, fifo: bool = False, bomb: bool = False, empty_class: bool = False) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8), (40 if label == "a" else 200, 0, 0)).save(folder / "0.png")
    if fifo:
        os.mkfifo(root / "train" / "a" / "x.jpg")
    if bomb:  # a valid PNG header announcing 30000 x 30000 pixels: Pillow refuses it before decoding

        def chunk(kind: bytes, body: bytes) -> bytes:
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
        (root / "train" / "b" / "0.png").write_bytes(png)
    if empty_class:
        (root / "train" / "c").mkdir()
    return root


def imagefolder_command(d: Path) -> list[str]:
    image = ["--dataset", "imagefolder", "--model", "cnn", "--image-size", "8", "--period", "1", "--batch-size", "1"]
    return ["train", *SMALL, *image, "--path", str(d / "i")]


# (name, how to build the input in a folder, the command line, the command, what the error line must say)
CASES = {
    "cifar pickle payload": (
        lambda d: cifar_folder(d / "c", poison=d / "pwned"),
        lambda d: ["train", *SMALL, "--dataset", "cifar10", "--model", "cnn", "--path", str(d / "c")],
        ["refers to posix.system", "refused, not run"],
    ),
    "cifar label 57": (
        lambda d: cifar_folder(d / "c", label=57),
        lambda d: ["train", *SMALL, "--dataset", "cifar10", "--model", "cnn", "--path", str(d / "c")],
        ["labels range over [1, 57]", "[0, 9]"],
    ),
    "idx dimensions that overflow": (
        lambda d: idx_folder(d / "m", images_shape_header=(65536, 65536, 65536)),
        lambda d: ["train", *SMALL, "--dataset", "mnist", "--path", str(d / "m")],
        ["header announces shape (65536, 65536, 65536)"],
    ),
    "imagefolder fifo only in a class": (
        lambda d: (image_folder(d / "i", fifo=True), (d / "i" / "train" / "a" / "0.png").unlink()),
        imagefolder_command,
        ["holds no images"],
    ),
    "imagefolder decompression bomb": (
        lambda d: image_folder(d / "i", bomb=True),
        imagefolder_command,
        ["cannot decode image", "decompression bomb"],
    ),
    "imagefolder empty class": (
        lambda d: image_folder(d / "i", empty_class=True),
        imagefolder_command,
        ["class folder", "holds no images"],
    ),
    "out is a file": (
        lambda d: (d / "f").write_text("x"),
        lambda d: ["train", *SMALL, "--out", str(d / "f")],
        ["is a file, not a folder"],
    ),
    "out under a file": (
        lambda d: (d / "f").write_text("x"),
        lambda d: ["train", *SMALL, "--out", str(d / "f" / "run")],
        ["is a file, not a folder"],
    ),
    "device bogus": (None, lambda d: ["train", *SMALL, "--device", "bogus"], ["device='bogus' is not known"]),
    "device cuda without a gpu": (None, lambda d: ["train", *SMALL, "--device", "cuda"], ["usable CUDA GPU"]),
    "lr 1e300": (None, lambda d: ["train", *SMALL, "--lr", "1e300"], ["training.lr=1e+300", "overflows float32"]),
    "hidden 1e9 (a 256 GB model)": (None, lambda d: ["train", *SMALL, "--hidden", "1000000000"], ["need at least"]),
    "workers 1e8": (None, lambda d: ["train", *SMALL, "--workers", "100000000", "--period", "1"], ["need at least"]),
    "period not an int": (None, lambda d: ["train", *SMALL, "--period", "8x"], ["type int or 'theory'"]),
    "seeds 1e9": (
        lambda d: (d / "c.toml").write_text('[data]\ndataset = "digits"\n'),
        lambda d: ["run", str(d / "c.toml"), "--seeds", "1000000000", "--out", str(d / "o")],
        ["--seeds 1000000000 is not allowed"],
    ),
    "toml nested 100000 deep": (
        lambda d: (d / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        lambda d: ["run", str(d / "deep.toml")],
        ["nested too deeply"],
    ),
    "unknown config key": (
        lambda d: (d / "c.toml").write_text("[training]\nlearning_rate = 0.1\n"),
        lambda d: ["run", str(d / "c.toml")],
        ["unknown config key 'training.learning_rate'"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_bad_input_is_one_clear_error_and_touches_nothing_else(name, tmp_path):
    build, command, needles = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    if build is not None:
        build(work)
    before = tree_digest(tmp_path, skip=work / "o")
    args = command(work)
    assert_one_clear_error(cli(*args, cwd=tmp_path), args[0], *needles)
    assert tree_digest(tmp_path, skip=work / "o") == before  # nothing written (no runs/, no payload's file)
    assert not (work / "pwned").exists()


def checkpoints_digest(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "checkpoints").rglob("*.*")
    }


def test_an_earlier_runs_checkpoints_are_never_lost(tmp_path):
    out = tmp_path / "out"
    base = ["train", *SMALL, "--checkpoint-every", "5", "--out", str(out)]
    assert cli(*base, "--epochs", "1", cwd=tmp_path).returncode == 0
    kept = checkpoints_digest(out)
    assert len(kept) >= 4
    # a fresh run (another lr) into the same folder: refused, nothing touched
    assert_one_clear_error(cli(*base, "--lr", "0.2", cwd=tmp_path), "train", "holds the checkpoints of an earlier run")
    assert checkpoints_digest(out) == kept
    # a second run while the folder is locked by a live process
    hold = f"from prsgd.training.outdir import OutFolder; f = OutFolder({str(out)!r}, resume=True, overwrite=False)"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"{hold}; import time; print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = assert_one_clear_error(cli(*base, "--resume", cwd=tmp_path), "train", "is in use by another run")
        assert f"pid {holder.pid}" in line
    finally:
        holder.kill()
        holder.wait()
    assert checkpoints_digest(out) == kept
    # --overwrite moves them aside, byte for byte
    assert cli(*base, "--lr", "0.2", "--overwrite", cwd=tmp_path).returncode == 0
    aside = out / "checkpoints.old-1"
    moved = {str(p.relative_to(aside)): hashlib.sha256(p.read_bytes()).hexdigest() for p in aside.rglob("*.*")}
    assert moved == {k.split("/", 1)[1]: v for k, v in kept.items()}


def test_a_checkpoint_with_a_hostile_manifest_or_shard_falls_back_or_stops_clearly(tmp_path):
    out = tmp_path / "out"
    base = ["train", *SMALL, "--epochs", "1", "--checkpoint-every", "5", "--out", str(out)]
    assert cli(*base, cwd=tmp_path).returncode == 0
    folders = sorted((out / "checkpoints").glob("step-*"))
    newest = folders[-1]
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "/etc/hostname"  # an absolute path: never read
    (newest / "manifest.json").write_text(json.dumps(manifest))
    done = cli(*base, "--resume", cwd=tmp_path)
    assert done.returncode == 0 and "skipping a damaged checkpoint" in done.stderr and "not a shard name" in done.stderr
    assert f"continuing from {folders[-2]}" in done.stdout
    # every checkpoint's shard replaced by a pickle whose checksum matches: refused by weights_only, then a clear stop
    for folder in sorted((out / "checkpoints").glob("step-*")):
        data = pickle.dumps(Payload(f"touch {tmp_path / 'pwned'}"))
        shard = json.loads((folder / "manifest.json").read_text())
        shard["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
        (folder / "rank-00000.pt").write_bytes(data)
        (folder / "manifest.json").write_text(json.dumps(shard))
    assert_one_clear_error(cli(*base, "--resume", cwd=tmp_path), "train", "none of the", "can be loaded")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounts a tmpfs (root only)")
def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_resume_is_bit_identical(tmp_path):
    base = ["train", *SMALL, "--epochs", "3", "--checkpoint-every", "4"]
    reference = tmp_path / "reference"
    assert cli(*base, "--out", str(reference), cwd=tmp_path).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "out"
        run = subprocess.Popen(
            [sys.executable, "-m", "prsgd.cli", *base, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        while not list((out / "checkpoints").glob("step-*/manifest.json")) and run.poll() is None:
            pass
        with open(disk / "filler", "wb") as filler:  # fill the disk to the last byte
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        stdout, stderr = run.communicate(timeout=300)
        done = subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)
        assert_one_clear_error(done, "train", "no space left" if "no space" in stderr else "No space left")
        assert not list(out.rglob(".*.tmp-*"))  # the partial file was removed
        (disk / "filler").unlink()
        assert cli(*base, "--out", str(out), "--resume", cwd=tmp_path).returncode == 0
        strip = [
            {k: v for k, v in json.loads(line).items() if k != "wall_clock"} for line in (out / "log.jsonl").open()
        ]
        expected = [
            {k: v for k, v in json.loads(line).items() if k != "wall_clock"}
            for line in (reference / "log.jsonl").open()
        ]
        assert strip == expected
    finally:
        subprocess.run(["umount", str(disk)], check=False)
