"""How the stages write: every output of a run staged beside its place and renamed in only once all are written,
so a run that fails midway (a full disk, a kill) leaves the previous outputs, never a mix (lora.files does the
renames); and weights as safetensors, never pickles."""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from lora.files import discard, move_into_place, non_finite, sync, temporary_beside

from .errors import WeightsError


class Outputs:
    """The outputs of one run, each written to a temporary beside its place; see :func:`staged_outputs`."""

    def __init__(self) -> None:
        self.staged: dict[Path, Path] = {}  # final place -> temporary

    def _stage(self, path: str | os.PathLike, directory: bool) -> Path:
        path = Path(path)
        if path in self.staged:
            raise ValueError(f"{path} is written twice in one run")
        self.staged[path] = temporary_beside(path, directory)
        return self.staged[path]

    def file(self, path: str | os.PathLike) -> Path:
        """A temporary file that becomes ``path``."""
        return self._stage(path, directory=False)

    def directory(self, path: str | os.PathLike) -> Path:
        """A temporary directory that replaces ``path`` as a whole."""
        return self._stage(path, directory=True)

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


@contextmanager
def staged_outputs() -> Iterator[Outputs]:
    """Stage a run's outputs; when the block ends well, sync them all (a full disk shows here, while every output is
    still the previous one), then rename them all into place. Otherwise every temporary is removed."""
    outputs = Outputs()
    try:
        yield outputs
        for tmp in outputs.staged.values():
            sync(tmp)
        for path, tmp in outputs.staged.items():
            move_into_place(tmp, path)
    finally:
        for tmp in outputs.staged.values():
            discard(tmp)


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
    if integer := [name for name, t in tensors.items() if not t.is_floating_point()]:
        raise WeightsError(f"{path}: tensor {integer[0]} is {tensors[integer[0]].dtype}; weights are floating-point")
    if bad := non_finite(tensors, dtype):
        cast = f" once cast to {dtype} from {tensors[bad[0]].dtype}" if tensors[bad[0]].dtype != dtype else ""
        raise WeightsError(f"{path}: non-finite values in tensor {bad[0]}{cast}" + (f" and {len(bad) - 1} more" if bad[1:] else ""))
    return tensors
