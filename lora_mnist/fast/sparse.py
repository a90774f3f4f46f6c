"""Evaluation on CPU with the first hidden layer as a sparse matrix: a trained ReLU layer's output is mostly
zeros (about 96% here), and as a CSR matrix the next product multiplies only the non-zeros. The logits equal
the dense ones to float rounding and are deterministic (tests/test_backend.py)."""
from __future__ import annotations

import warnings

import torch
from torch import nn

SPARSE_DENSITY = 0.1  # below this share of non-zeros the sparse product wins on CPU (bench.sparse_eval: it breaks even near 0.14)


def sparse_if_mostly_zero(activations: torch.Tensor, max_density: float = SPARSE_DENSITY) -> torch.Tensor:
    """``activations`` as a CSR matrix when at most ``max_density`` of them are non-zero, else unchanged."""
    if activations.dim() != 2 or torch.count_nonzero(activations) > max_density * activations.numel():
        return activations
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch calls its CSR tensors beta; the product used here is long-standing
        return activations.to_sparse_csr()


def sparse_mlp_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """OversizedMLP.forward with linear2's input sparse when mostly zero; linear3's 10-wide product would
    cost more to convert than it saves. Works with LoRA-wrapped layers too (their base and A take CSR)."""
    x = images.reshape(images.shape[0], -1)
    x = model.relu(model.linear1(x))
    x = model.relu(model.linear2(sparse_if_mostly_zero(x)))
    return model.linear3(x)
