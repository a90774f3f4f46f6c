"""The seed notebook's deliberately oversized classifier: 784 -> 1000 -> 2000 -> 10 with ReLU."""
from __future__ import annotations

import warnings

import torch
from torch import nn

IMAGE_PIXELS = 28 * 28
NUM_CLASSES = 10
SPARSE_DENSITY = 0.1  # below this share of non-zeros the sparse product wins on CPU (bench.sparse_eval: it breaks even near 0.14)


def sparse_if_mostly_zero(activations: torch.Tensor, max_density: float | None = None) -> torch.Tensor:
    """Evaluating on CPU, a trained ReLU layer's output is mostly zeros (about 96% here): as a sparse (CSR)
    matrix the next layer multiplies only the non-zeros. Training and other devices keep the dense tensor,
    and so does a share of non-zeros above ``max_density`` (default: SPARSE_DENSITY)."""
    if torch.is_grad_enabled() or activations.device.type != "cpu" or activations.dim() != 2:
        return activations
    limit = SPARSE_DENSITY if max_density is None else max_density
    if torch.count_nonzero(activations) > limit * activations.numel():
        return activations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its CSR tensors beta; the product used here is long-standing
        return activations.to_sparse_csr()


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
        x = self.relu(self.linear2(sparse_if_mostly_zero(x)))
        return self.linear3(x)  # a 10-wide product: converting its input would cost more than it saves
