"""The seed notebook's deliberately oversized classifier, 784 -> 1000 -> 2000 -> 10 with ReLU, and its
weights file (safetensors, checked against the architecture on load)."""
from __future__ import annotations

import os

import torch
from torch import nn

from .errors import WeightsError
from .io import load_tensors
from .params import IMAGE_PIXELS, NUM_CLASSES


class OversizedMLP(nn.Module):
    def __init__(self, hidden_1: int = 1000, hidden_2: int = 2000) -> None:
        super().__init__()
        self.linear1 = nn.Linear(IMAGE_PIXELS, hidden_1)
        self.linear2 = nn.Linear(hidden_1, hidden_2)
        self.linear3 = nn.Linear(hidden_2, NUM_CLASSES)
        self.relu = nn.ReLU(inplace=True)  # no second activation-sized tensor: evaluation is bound by memory traffic

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.view(-1, IMAGE_PIXELS)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)


def load_mlp(path: str | os.PathLike, hidden_1: int, hidden_2: int, device: torch.device | str = "cpu") -> OversizedMLP:
    """The MLP whose weights are in ``path``, checked against the architecture given, in eval mode."""
    model = OversizedMLP(hidden_1, hidden_2)
    tensors = load_tensors(path, model.linear1.weight.dtype)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:  # load_state_dict's report of missing, unexpected or misshapen tensors
        detail = " ".join(str(exc).split())
        raise WeightsError(f"{path}: does not fit model hidden_1={hidden_1}, hidden_2={hidden_2} ({detail})") from None
    return model.to(device).eval()
