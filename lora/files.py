"""Atomic files and directories, and tensor hashes: what is written is either complete or absent."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def previous_version(path: Path) -> Path:
    """Where :func:`atomic_dir` keeps the previous directory while it swaps in the new one."""
    return path.with_name(f".{path.name}.old")


def _writer_alive(tmp: Path) -> bool:
    pid = tmp.name.split(".")[-3]  # .<name>.<pid>.<random>.tmp
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: Path) -> None:
    """Remove what killed writers left beside ``path`` (``.<name>.<pid>.*.tmp`` of processes that are gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if not _writer_alive(tmp):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole.

    The swap is two renames. If a writer dies between them, ``path`` is missing and the previous directory
    waits in :func:`previous_version`; the next write puts it back first, so a complete directory is never lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = previous_version(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    clean_stale_temporaries(path)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        yield tmp_dir
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp_dir, 0o777 & ~mask)  # mkdtemp makes 0700 directories; outputs get the usual modes
        for child in tmp_dir.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp_dir, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` (one rename), else it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and raw bytes: equal hashes mean bit-identical tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
