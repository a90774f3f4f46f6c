"""What the stages read: an MNIST split after a memory check, and the base model of models/, checked
against the sha256 that pretrain recorded of what it wrote."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora_mnist.data import load_split, split_image_file
from lora_mnist.errors import DataError, IntegrityError
from lora_mnist.io import file_sha256
from lora_mnist.memory import require_memory
from lora_mnist.mlp import OversizedMLP, layer_sides, load_mlp

from .params import Params
from .paths import BASE_WEIGHTS, PRETRAIN_SUMMARY, RAW_DIR


def load_data(stage: str, params: Params, split: str, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of data/mnist/raw, after checking that the stage fits in the memory available."""
    image_file = split_image_file(RAW_DIR, split)
    weights = sum(i * o for i, o in layer_sides(params.model.hidden_1, params.model.hidden_2).values())
    require_memory(stage, weights, image_file.stat().st_size if image_file.is_file() else 0, training)
    return load_split(RAW_DIR, split)


def recorded_value(path: Path, key: str, valid: Callable[[Any], bool], allowed: str, stage: str) -> Any:
    """``key`` of the JSON object an earlier stage wrote to ``path``; missing, damaged or invalid is one line."""
    rebuild = f"`dvc repro {stage}` rebuilds it"
    try:
        value = json.loads(path.read_text())[key]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {rebuild}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: not a JSON object with {key!r} ({type(exc).__name__}); {rebuild}") from None
    if not valid(value):
        raise DataError(f"{path}: {key}={value!r} is invalid: {allowed} is allowed; {rebuild}")
    return value


def recorded_base_sha256() -> str:
    """The sha256 of models/base.safetensors as pretrain wrote it."""
    return recorded_value(PRETRAIN_SUMMARY, "weights_sha256", lambda v: isinstance(v, str), "a sha256", "pretrain")


def load_base_model(params: Params, device: torch.device) -> OversizedMLP:
    """The pretrained MLP of models/base.safetensors, checked byte for byte against what pretrain wrote and
    against the architecture in params.yaml."""
    if not BASE_WEIGHTS.is_file():
        raise DataError(f"{BASE_WEIGHTS}: not found; `dvc repro pretrain` builds it")
    actual, recorded = file_sha256(BASE_WEIGHTS), recorded_base_sha256()
    if actual != recorded:
        raise IntegrityError(f"integrity check failed: {BASE_WEIGHTS} has sha256 {actual[:16]}…, not the {recorded[:16]}… "
                             f"that pretrain wrote ({PRETRAIN_SUMMARY}): the frozen weights changed; "
                             "`dvc repro pretrain` rebuilds them")
    return load_mlp(BASE_WEIGHTS, params.model.hidden_1, params.model.hidden_2, device)
