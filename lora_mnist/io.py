"""How the stages write: every output of a run staged beside its place and renamed in only once all are written,
so a run that fails midway (a full disk, a kill) leaves the previous outputs, never a mix (lora.files does the
renames); and weights as safetensors, never pickles."""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from lora.files import Staging, non_finite, staged, weights_problem

from .errors import WeightsError


class Outputs(Staging):
    """The outputs of one run, each written to a temporary beside its place; see :func:`staged_outputs`."""

    def file(self, path: str | os.PathLike) -> Path:
        """A temporary file that becomes ``path``."""
        return self.stage(path)

    def directory(self, path: str | os.PathLike) -> Path:
        """A temporary directory that replaces ``path`` as a whole."""
        return self.stage(path, directory=True)

    def text(self, path: str | os.PathLike, text: str) -> None:
        self.file(path).write_text(text)

    def json(self, path: str | os.PathLike, data: Any) -> None:
        self.text(path, json.dumps(data, indent=2) + "\n")

    def csv(self, path: str | os.PathLike, rows: Iterable[Sequence[Any]]) -> None:
        self.text(path, csv_text(rows))

    def tensors(self, path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
        save_tensors(self.file(path), tensors, name=path)


def csv_text(rows: Iterable[Sequence[Any]]) -> str:
    """Rows (the header first) as CSV text."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def staged_outputs() -> AbstractContextManager[Outputs]:
    """Stage a run's outputs, renamed into place together once all are written and synced (lora.files.staged)."""
    return staged(Outputs())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """One JSON output, written atomically."""
    with staged_outputs() as outputs:
        outputs.json(path, data)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], name: object = None) -> None:
    """Write tensors as a safetensors file; refuses non-finite values, so no broken weights are kept."""
    from safetensors.torch import save_file

    if bad := non_finite(tensors):
        raise ValueError(f"{name or path}: non-finite values in {bad}; nothing was written")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def load_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle) whose tensors are floating-point and finite in ``dtype`` (a float64
    1e300 is not in float32); a missing, damaged or refused file is a WeightsError naming it."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if problem := weights_problem(tensors, dtype):
        raise WeightsError(f"{path}: {problem}")
    return tensors
