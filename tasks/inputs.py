"""What the stages read: an MNIST split after a memory check, and the base model of models/."""
from __future__ import annotations

from pathlib import Path

import torch

from lora_mnist.data import load_split, split_image_file
from lora_mnist.memory import require_memory
from lora_mnist.mlp import OversizedMLP, layer_sides, load_mlp

from .params import Params
from .paths import BASE_WEIGHTS, RAW_DIR


def load_data(stage: str, params: Params, split: str, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of data/mnist/raw, after checking that the stage fits in the memory available."""
    image_file = split_image_file(RAW_DIR, split)
    weights = sum(i * o for i, o in layer_sides(params.model.hidden_1, params.model.hidden_2).values())
    require_memory(stage, weights, image_file.stat().st_size if image_file.is_file() else 0, training)
    return load_split(RAW_DIR, split)


def load_base_model(params: Params, device: torch.device, path: Path = BASE_WEIGHTS) -> OversizedMLP:
    """The pretrained MLP of ``path``, checked against the architecture in params.yaml."""
    return load_mlp(path, params.model.hidden_1, params.model.hidden_2, device)
