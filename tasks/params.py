"""params.yaml as one typed model: a frozen dataclass per section, each value checked once, on loading.

The file is read as YAML 1.2, the way DVC reads and writes it (``1e-4`` is a number). Values that a package
owns are checked by that package when a stage starts, before it loads anything: ``lora`` by
``lora.LoRAConfig`` (tasks/finetune.py), ``backend`` by ``lora_mnist.backend``, ``device`` by
``lora_mnist.train.resolve_device``. So a stage imports, and DVC tracks, only what the stage uses.
"""
from __future__ import annotations

import copy
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """params.yaml holds an unknown key or a value outside what is allowed."""


def _rule(check: Callable[[Any], bool], allowed: str) -> Any:
    return field(metadata={"check": check, "allowed": allowed})


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float, 10**400
        return False


INT_LIMIT = 2**63  # torch's sizes, indices and seeds are 64-bit


def _count(v: Any) -> bool:
    return _is_int(v) and 1 <= v < INT_LIMIT


def _positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0 <= v < 1


SOURCES = ("local", "torchvision", "npm")
COUNT = "an integer in [1, 2**63)"


@dataclass(frozen=True)
class Download:
    source_dir: str | None = _rule(lambda v: v is None or (isinstance(v, str) and bool(v)), "null or a directory path")
    sources: list[str] = _rule(lambda v: isinstance(v, list) and bool(v) and all(s in SOURCES for s in v),
                               f"a non-empty list of {', '.join(map(repr, SOURCES))}")


@dataclass(frozen=True)
class Model:
    hidden_1: int = _rule(_count, COUNT)
    hidden_2: int = _rule(_count, COUNT)


@dataclass(frozen=True)
class Pretrain:
    epochs: int = _rule(_count, COUNT)
    batch_size: int = _rule(_count, COUNT)
    lr: float = _rule(_positive, "a finite number > 0")
    max_steps: int | None = _rule(lambda v: v is None or _count(v), f"null or {COUNT}")


@dataclass(frozen=True)
class Finetune:
    digit: int | str = _rule(lambda v: v == "auto" or (_is_int(v) and 0 <= v <= 9), "'auto' or a digit 0-9")
    steps: int = _rule(_count, COUNT)
    batch_size: int = _rule(_count, COUNT)
    lr: float = _rule(_positive, "a finite number > 0")
    replay_fraction: float = _rule(_fraction, "a number in [0, 1)")


@dataclass(frozen=True)
class Params:
    seed: int = _rule(lambda v: _is_int(v) and 0 <= v < INT_LIMIT, "an integer in [0, 2**63)")
    device: str = _rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                        "'auto', 'cpu', 'cuda' or 'cuda:N'")
    backend: str = _rule(lambda v: isinstance(v, str) and bool(v), "a backend name (see lora_mnist.backend)")
    download: Download = _rule(lambda v: isinstance(v, dict), "a mapping")
    model: Model = _rule(lambda v: isinstance(v, dict), "a mapping")
    pretrain: Pretrain = _rule(lambda v: isinstance(v, dict), "a mapping")
    finetune: Finetune = _rule(lambda v: isinstance(v, dict), "a mapping")
    lora: dict[str, Any] = _rule(lambda v: isinstance(v, dict), "a mapping (checked by lora.LoRAConfig)")


SECTIONS = {"download": Download, "model": Model, "pretrain": Pretrain, "finetune": Finetune}


def _problems(cls: type, values: dict[str, Any], prefix: str) -> list[str]:
    known = {f.name: f for f in fields(cls)}
    problems = []
    for name, spec in known.items():
        dotted = prefix + name
        if name not in values:
            problems.append(f"{dotted} is missing ({spec.metadata['allowed']} is allowed)")
        elif not spec.metadata["check"](values[name]):
            problems.append(f"{dotted}={values[name]!r} is invalid: {spec.metadata['allowed']} is allowed")
        elif name in SECTIONS and cls is Params:
            problems += _problems(SECTIONS[name], values[name], f"{name}.")
    problems += [f"unknown key {prefix}{key!r}: allowed are {sorted(known)}" for key in values if key not in known]
    return problems


def from_mapping(data: Any, source: str = str(PARAMS_FILE)) -> Params:
    """The typed params of ``data``, or one ParamsError listing every unknown key and every bad value."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections")
    problems = _problems(Params, data, "")
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems))
    sections = {name: cls(**data[name]) for name, cls in SECTIONS.items()}
    return Params(**{**data, **sections, "lora": dict(data["lora"])})


def read_yaml(text: str, source: str) -> Any:
    """YAML 1.2, as DVC parses params.yaml and `-S` values."""
    try:
        return YAML(typ="safe", pure=True).load(io.StringIO(text))
    except YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_raw(path: str | os.PathLike = PARAMS_FILE) -> Any:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root") from None
    return read_yaml(text, str(path))


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read params.yaml and check every key and value before any work is done."""
    return from_mapping(load_raw(path), str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str = str(PARAMS_FILE)) -> None:
    """Set ``data["lora"]["rank"]`` for ``"lora.rank"``; a key params.yaml does not have is an error."""
    section: Any = data
    *parents, key = dotted.split(".")
    for parent in parents:
        section = section.get(parent) if isinstance(section, dict) else None
    if not isinstance(section, dict) or key not in section:
        raise ParamsError(f"override {dotted}={value!r}: {source} has no key {dotted!r}")
    section[key] = value


def to_mapping(params: Params) -> dict[str, Any]:
    """The plain mapping params.yaml would hold."""
    return asdict(params)


def with_overrides(data: Params | dict[str, Any], overrides: dict[str, Any], source: str = str(PARAMS_FILE)) -> Params:
    """The params of ``data`` with dotted keys set, like `dvc exp run -S key=value`, validated."""
    result = to_mapping(data) if isinstance(data, Params) else copy.deepcopy(data)
    for dotted, value in overrides.items():
        set_dotted(result, dotted, value, source)
    return from_mapping(result, f"{source} with overrides {overrides}")


def parse_override(arg: str) -> tuple[str, list[Any], bool]:
    """``"lora.rank=1,2"`` as ``("lora.rank", [1, 2], True)``: the key, its values and whether it is a sweep, read
    by Hydra's override grammar as `dvc exp run -S` reads them (``010`` is a string, ``[a,b]`` one list,
    ``null`` None, ``1,2`` and ``range(1,4)`` sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, QuotedString
    from hydra.errors import HydraException

    allowed = "key=value is allowed, for example lora.rank=4"
    if not arg.partition("=")[0] or "=" not in arg:
        raise ParamsError(f"override {arg!r} is invalid: {allowed}")
    try:
        override = OverridesParser.create().parse_overrides([arg])[0]
    except HydraException as exc:
        raise ParamsError(f"override {arg!r} is invalid ({str(exc).splitlines()[0]}): {allowed}") from None
    if override.type != OverrideType.CHANGE or not override.key_or_group or override.package is not None:
        raise ParamsError(f"override {arg!r} is invalid: {allowed}")  # +key, ~key and @package edit the file's keys
    sweep = override.is_sweep_override()
    values = list(override.sweep_iterator()) if sweep else [override.value()]
    return override.key_or_group, [v.text if isinstance(v, QuotedString) else v for v in values], sweep


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["lora.rank=4", ...]`` as ``{"lora.rank": 4}``, each value read as `dvc exp run -S` reads it."""
    overrides = {}
    for arg in args:
        key, values, sweep = parse_override(arg)
        if sweep:
            raise ParamsError(f"override {arg!r} is a sweep: one value is allowed (python -m flows.sweep sweeps)")
        if key in overrides:
            raise ParamsError(f"override {key} is given more than once: one value per key is allowed")
        overrides[key] = values[0]
    return overrides
