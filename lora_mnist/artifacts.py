"""What the stages read: an MNIST split after a memory check, the values earlier stages recorded, and the base
model of models/, checked against the sha256 that pretrain recorded of what it wrote."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lora.files import file_sha256

from .data import load_split, split_image_file, validation_split
from .errors import DataError, IntegrityError
from .memory import require_memory
from .mlp import OversizedMLP, load_mlp
from .params import Params
from .paths import ANALYSIS, BASE_WEIGHTS, PRETRAIN_SUMMARY, RAW_DIR

SPLITS = ("train", "validation", "test")  # train and validation are the two parts of MNIST's training images


def load_data(stage: str, params: Params, split: str, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of ``split`` from data/mnist/raw, after checking that the stage fits in the memory available:
    'train' is what models train on, 'validation' the held-out images every choice is made on, 'test' is scored."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: one of {SPLITS} is allowed")
    image_file = split_image_file(RAW_DIR, "test" if split == "test" else "train")
    require_memory(stage, params.model.weights(), image_file.stat().st_size if image_file.is_file() else 0, training)
    if split == "test":
        return load_split(RAW_DIR, "test")
    images, labels = load_split(RAW_DIR, "train")
    train, validation = validation_split(len(labels), params.data.validation, params.data.split_seed)
    chosen = train if split == "train" else validation
    return images[chosen], labels[chosen]


def recorded_value(path: Path, key: str, valid: Callable[[Any], bool], allowed: str, stage: str) -> Any:
    """``key`` of the JSON object an earlier stage wrote to ``path``; missing, damaged or invalid is one line."""
    rebuild = f"`dvc repro {stage}` rebuilds it"
    try:
        value = json.loads(path.read_text())[key]
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {rebuild}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError, KeyError) as exc:
        raise DataError(f"{path}: not a JSON object with {key!r} ({type(exc).__name__}); {rebuild}") from None
    if not valid(value):
        raise DataError(f"{path}: {key}={value!r} is invalid: {allowed} is allowed; {rebuild}")
    return value


def target_digit() -> int:
    """The digit chosen by the last analyze run, from metrics/analyze.json."""
    return recorded_value(ANALYSIS, "target_digit", lambda d: type(d) is int and 0 <= d <= 9, "a digit 0-9", "analyze")


def load_base_model(params: Params, device: torch.device) -> OversizedMLP:
    """The pretrained MLP of models/base.safetensors, checked byte for byte against what pretrain wrote and
    against the architecture in params.yaml."""
    if not BASE_WEIGHTS.is_file():
        raise DataError(f"{BASE_WEIGHTS}: not found; `dvc repro pretrain` builds it")
    recorded = recorded_value(PRETRAIN_SUMMARY, "weights_sha256", lambda v: isinstance(v, str), "a sha256", "pretrain")
    actual = file_sha256(BASE_WEIGHTS)
    if actual != recorded:
        raise IntegrityError(f"integrity check failed: {BASE_WEIGHTS} has sha256 {actual[:16]}…, not the {recorded[:16]}… "
                             f"that pretrain wrote ({PRETRAIN_SUMMARY}): the frozen weights changed; "
                             "`dvc repro pretrain` rebuilds them")
    return load_mlp(BASE_WEIGHTS, params.model.hidden_1, params.model.hidden_2, device)
