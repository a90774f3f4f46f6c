"""Atomic adapter directories and tensor hashes: a saved adapter is either complete or absent."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp_dir
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp_dir, 0o777 & ~mask)  # mkdtemp makes 0700 directories; outputs get the usual modes
        for child in tmp_dir.iterdir():
            os.chmod(child, 0o666 & ~mask)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp_dir, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


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
