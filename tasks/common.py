"""What every stage shares: output paths, params.yaml loading with validation, and the CLI wrapper."""
from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from lora import AdapterLoadError, LoRAConfig, LoRAConfigError
from lora.data import DataError, load_split, split_image_file
from lora.files import atomic_path, load_tensors, save_tensors
from lora.fused import KERNELS, KernelUnavailable
from lora.mlp import OversizedMLP
from lora.train import DeviceError

PARAMS_FILE = Path("params.yaml")
RAW_DIR = Path("data/mnist/raw")
BASE_WEIGHTS = Path("models/base.safetensors")
ADAPTER_DIR = Path("models/adapter")
ANALYSIS = Path("metrics/analyze.json")
FINETUNE_METRICS = Path("metrics/finetune.json")
EVALUATE_METRICS = Path("metrics/evaluate.json")
REPORTS = Path("reports")
DVCLIVE = Path("dvclive")
# The experiments pipeline (experiments/dvc.yaml): results in git, models in the DVC cache.
EXPERIMENT_RESULTS = Path("experiments/results")
EXPERIMENT_MODELS = Path("experiments/models")


class ParamsError(ValueError):
    """params.yaml holds an unknown key or a value outside what is allowed."""


class IntegrityError(RuntimeError):
    """The frozen base weights changed, or LoRA-off outputs differ from the base model's."""


class WeightsError(ValueError):
    """A weights file is missing, damaged or does not fit the model that params.yaml describes."""


class ResourceError(RuntimeError):
    """The machine lacks the memory a stage needs."""


def _int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1


# section -> key -> (check, what is allowed)
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "": {
        "seed": (_int(0), "an integer >= 0"),
        "device": (lambda v: isinstance(v, str) and bool(v), "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    },
    "download": {
        "source_dir": (lambda v: v is None or (isinstance(v, str) and bool(v)), "null or a directory path"),
        "sources": (
            lambda v: isinstance(v, list) and bool(v) and all(s in ("local", "torchvision", "npm") for s in v),
            "a non-empty list of 'local', 'torchvision', 'npm'",
        ),
    },
    "model": {"hidden_1": (_int(1), "an integer >= 1"), "hidden_2": (_int(1), "an integer >= 1")},
    "pretrain": {
        "epochs": (_int(1), "an integer >= 1"),
        "batch_size": (_int(1), "an integer >= 1"),
        "lr": (_positive_number, "a number > 0"),
        "max_steps": (lambda v: v is None or _int(1)(v), "null or an integer >= 1"),
        "kernel": (lambda v: v in KERNELS, "'auto', 'fused' or 'torch'"),
    },
    "finetune": {
        "digit": (lambda v: v == "auto" or (_int(0)(v) and v <= 9), "'auto' or a digit 0-9"),
        "steps": (_int(1), "an integer >= 1"),
        "batch_size": (_int(1), "an integer >= 1"),
        "lr": (_positive_number, "a number > 0"),
        "replay_fraction": (_fraction, "a number in [0, 1)"),
    },
    "lora": {
        "rank": (_int(1), "an integer >= 1"),
        "alpha": (_positive_number, "a number > 0"),
        "dropout": (_fraction, "a number in [0, 1)"),
        "init": (lambda v: v in ("normal", "kaiming", "gaussian"), "'normal', 'kaiming' or 'gaussian'"),
        "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
        "targets": (
            lambda v: isinstance(v, list) and bool(v) and all(t in ("linear1", "linear2", "linear3") for t in v),
            "a non-empty list of 'linear1', 'linear2', 'linear3'",
        ),
    },
}


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict[str, Any]:
    """Read params.yaml and check every key and value before any work is done."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run from the project root") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    check_params(params, str(path))
    return params


def check_params(params: Any, source: str = str(PARAMS_FILE)) -> None:
    """Raise one ParamsError listing every unknown key and every value outside what is allowed."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: expected a mapping of sections")
    problems = []
    for section, keys in SCHEMA.items():
        values = params if section == "" else params.get(section)
        if not isinstance(values, dict):
            problems.append(f"section {section!r} is missing or not a mapping")
            continue
        for key, (check, allowed) in keys.items():
            name = f"{section}.{key}" if section else key
            if key not in values:
                problems.append(f"{name} is missing ({allowed} is allowed)")
            elif not check(values[key]):
                problems.append(f"{name}={values[key]!r} is invalid: {allowed} is allowed")
        known = set(keys) | (set(SCHEMA) - {""} if section == "" else set())
        problems += [f"unknown key {section + '.' if section else ''}{k!r}" for k in values if k not in known]
    if not problems:
        problems += _rank_problems(params)
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems))


def set_dotted(params: dict[str, Any], dotted: str, value: Any, source: str = str(PARAMS_FILE)) -> None:
    """Set ``params["lora"]["rank"]`` for ``"lora.rank"``; a key params.yaml does not have is an error."""
    section: Any = params
    *parents, key = dotted.split(".")
    for parent in parents:
        section = section.get(parent) if isinstance(section, dict) else None
    if not isinstance(section, dict) or key not in section:
        raise ParamsError(f"override {dotted}={value!r}: {source} has no key {dotted!r}")
    section[key] = value


def with_overrides(params: dict[str, Any], overrides: dict[str, Any], source: str = str(PARAMS_FILE)) -> dict[str, Any]:
    """A validated copy of ``params`` with dotted keys set, like `dvc exp run -S key=value`."""
    result = copy.deepcopy(params)
    for dotted, value in overrides.items():
        set_dotted(result, dotted, value, source)
    check_params(result, f"{source} with overrides {overrides}")
    return result


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["lora.rank=4", ...]`` as ``{"lora.rank": 4}``; values are read as YAML, as `dvc exp run -S` does."""
    overrides = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ParamsError(f"override {arg!r} is invalid: key=value is allowed, for example lora.rank=4")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ParamsError(f"override {arg!r}: the value is not valid YAML") from None
    return overrides


def _rank_problems(params: dict[str, Any]) -> list[str]:
    # A layer's update B·A has rank at most the layer's smaller side. Above that on some targets is allowed
    # (as in PEFT: more parameters, same reach); above it on every target it can only be a mistake.
    model = params["model"]
    sides = {"linear1": min(784, model["hidden_1"]), "linear2": min(model["hidden_1"], model["hidden_2"]), "linear3": min(model["hidden_2"], 10)}
    limit = max(sides[t] for t in params["lora"]["targets"])
    rank = params["lora"]["rank"]
    return [] if rank <= limit else [f"lora.rank={rank} is invalid: 1..{limit} is allowed (above every target layer's smaller side)"]


def lora_config(params: dict[str, Any]) -> LoRAConfig:
    lora = params["lora"]
    return LoRAConfig(
        r=lora["rank"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        init=lora["init"],
        use_rslora=lora["use_rslora"],
        target_modules=tuple(lora["targets"]),
    )


# What torch itself occupies before any data (its libraries; about 0.8 GB for the CUDA build).
TORCH_BASELINE_BYTES = 900 * 2**20


def check_memory(stage: str, params: dict[str, Any], image_file_bytes: int, training: bool) -> None:
    """Stop before loading anything when the data (uint8 + float32 copies), the model (with gradients and
    two Adam moments when training) and torch itself would not fit in the memory available now."""
    model = params["model"]
    weights = 784 * model["hidden_1"] + model["hidden_1"] * model["hidden_2"] + model["hidden_2"] * 10
    needed = 5 * image_file_bytes + (4 if training else 1) * 4 * weights + TORCH_BASELINE_BYTES
    available = _available_memory()
    if available is not None and needed > available:
        raise ResourceError(
            f"{stage} needs about {needed / 2**30:.1f} GiB of memory but {available / 2**30:.1f} GiB is available; "
            "free memory or make model.hidden_1/hidden_2 smaller"
        )


def file_size(path: Path) -> int:
    """Size in bytes, 0 for a missing file (the reader then reports it by name)."""
    return path.stat().st_size if path.is_file() else 0


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where the system does not tell."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_data(stage: str, params: dict[str, Any], split: str, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of data/mnist/raw, after checking that the stage fits in the memory available."""
    check_memory(stage, params, file_size(split_image_file(RAW_DIR, split)), training)
    return load_split(RAW_DIR, split)


def save_base_model(model: torch.nn.Module, path: Path = BASE_WEIGHTS) -> None:
    save_tensors(path, model.state_dict())


def load_base_model(params: dict[str, Any], device: torch.device, path: Path = BASE_WEIGHTS) -> OversizedMLP:
    """The pretrained MLP of ``path``, checked against the architecture in params.yaml."""
    model = OversizedMLP(**params["model"])
    try:
        model.load_state_dict(load_tensors(path))
    except ValueError as exc:
        raise WeightsError(str(exc)) from None
    except RuntimeError as exc:  # load_state_dict's report of missing, unexpected or misshapen tensors
        detail = " ".join(str(exc).split())
        raise WeightsError(f"{path}: does not fit model {params['model']} ({detail})") from None
    return model.to(device).eval()


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: stages draw PNGs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically, then free it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    pyplot().close(fig)


def per_digit(values: list[int]) -> dict[str, int]:
    """Keyed by digit so that `dvc metrics diff` shows one row per digit."""
    return {str(digit): value for digit, value in enumerate(values)}


def log_losses(name: str, losses: torch.Tensor, **summary: Any) -> None:
    """Per-step training loss as a dvclive curve (dvclive/<name>/plots/metrics/loss.tsv) plus a summary."""
    from dvclive import Live

    with Live(dir=str(DVCLIVE / name), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        for step, loss in enumerate(losses.tolist()):
            live.step = step  # one write per row; next_step() would rewrite the summary every step
            live.log_metric("loss", round(loss, 6), timestamp=False)
        live.summary["loss_mean_last_100"] = round(float(losses[-100:].mean()), 6)
        live.summary.update(summary)


EXPECTED_ERRORS = (ParamsError, WeightsError, ResourceError, IntegrityError, DataError, DeviceError, AdapterLoadError, LoRAConfigError,
                   KernelUnavailable)


def run_cli(stage: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``stage(params)``; a known failure becomes one line on stderr and exit status 2."""
    try:
        stage(load_params())
    except EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
