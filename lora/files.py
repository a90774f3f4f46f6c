"""Atomic files and directories, and hashes: what is written is either complete or absent.

A write goes to a temporary beside its place (``.<name>.<pid>.<random>.tmp``), is synced, and is renamed into
place; what a killed writer left is removed by the next write to the same place. Directories are swapped in
with two renames, the previous one kept at :func:`previous_version` in between and put back if a writer died there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # writing files needs no torch: the tensor helpers import it when called
    import torch


def previous_version(path: Path) -> Path:
    """Where a directory swap keeps the previous directory while it renames the new one in."""
    return path.with_name(f".{path.name}.old")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def clean_stale_temporaries(path: Path) -> None:
    """Remove what killed writers left beside ``path`` (``.<name>.<pid>.*.tmp`` of processes that are gone), and put
    back a previous directory a swap left waiting."""
    old = previous_version(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name.split(".")[-3]
        if not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def temporary_beside(path: Path, directory: bool = False) -> Path:
    """A new empty temporary file (or directory) beside ``path``, for :func:`move_into_place`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    prefix, suffix = f".{path.name}.{os.getpid()}.", ".tmp"
    if directory:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    return Path(name)


def sync(tmp: Path) -> None:
    """Flush a temporary (every file of a directory) to disk and give it the modes a plain write would have:
    mkstemp and mkdtemp make them private. A full disk shows here, before anything is renamed."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [tmp, *sorted(tmp.rglob("*"))] if tmp.is_dir() else [tmp]:
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename a synced temporary onto ``path``: one rename for a file, a swap through previous_version for a directory."""
    if not tmp.is_dir():
        os.replace(tmp, path)
        return
    old = previous_version(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


class Staging:
    """Temporaries beside their final places, for :func:`staged`: each place is written once."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}  # final place -> temporary

    def stage(self, path: str | os.PathLike, directory: bool = False) -> Path:
        """A new temporary file (or directory) that becomes ``path`` when the block ends well."""
        path = Path(path)
        if path in self.staged:
            raise ValueError(f"{path} is written twice in one run")
        self.staged[path] = temporary_beside(path, directory)
        return self.staged[path]


@contextmanager
def staged(staging: Staging | None = None) -> Iterator[Staging]:
    """Stage several outputs; when the block ends well, sync them all (a full disk shows here, while every output is
    still the previous one), then rename them all into place. Otherwise every temporary is removed."""
    staging = Staging() if staging is None else staging
    try:
        yield staging
        for tmp in staging.staged.values():
            sync(tmp)
        for path, tmp in staging.staged.items():
            move_into_place(tmp, path)
    finally:
        for tmp in staging.staged.values():
            discard(tmp)


@contextmanager
def _atomic(path: str | os.PathLike, directory: bool) -> Iterator[Path]:
    with staged() as staging:
        yield staging.stage(path, directory)


def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside ``path``; on success it replaces ``path`` (one rename), else it is removed."""
    return _atomic(path, directory=False)


def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole, else it is removed."""
    return _atomic(path, directory=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and raw bytes: equal hashes mean bit-identical tensors."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity, in ``dtype`` when given: a float64 1e300 is
    finite, and infinite once cast to the float32 of the model it is loaded into."""
    import torch

    return [name for name, t in tensors.items()
            if t.is_floating_point() and not torch.isfinite(t if dtype is None else t.to(dtype)).all()]


def weights_problem(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> str | None:
    """Why ``tensors`` cannot be weights, or None: an integer or bool tensor (refused, not cast), or NaN or infinity
    (in ``dtype`` when given, see :func:`non_finite`)."""
    if integer := sorted(name for name, t in tensors.items() if not t.is_floating_point()):
        return (f"tensor {integer[0]} is {tensors[integer[0]].dtype}; weights are floating-point (an integer or bool "
                "tensor is refused, not cast)")
    if bad := non_finite(tensors, dtype):
        cast = f" once cast to {dtype} from {tensors[bad[0]].dtype}" if dtype not in (None, tensors[bad[0]].dtype) else ""
        return f"non-finite values in tensor {bad[0]}{cast}" + (f" and {len(bad) - 1} more" if bad[1:] else "")
    return None
