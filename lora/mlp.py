"""The seed notebook's deliberately oversized classifier: 784 -> 1000 -> 2000 -> 10 with ReLU."""
from __future__ import annotations

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10


class OversizedMLP(nn.Module):
    def __init__(self, hidden_1: int = 1000, hidden_2: int = 2000) -> None:
        super().__init__()
        self.linear1 = nn.Linear(IMAGE_PIXELS, hidden_1)
        self.linear2 = nn.Linear(hidden_1, hidden_2)
        self.linear3 = nn.Linear(hidden_2, NUM_CLASSES)
        self.relu = nn.ReLU()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.view(-1, IMAGE_PIXELS)
        x = self.relu(self.linear1(x))
        x = self.relu(self.linear2(x))
        return self.linear3(x)
