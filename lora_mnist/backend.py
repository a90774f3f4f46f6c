"""The one boundary between the plain PyTorch code and the fast paths of lora_mnist/fast/.

``backend="torch"`` is the reference: autograd, torch.optim.Adam and dense products. ``backend="auto"``
computes the same math faster where a fast path applies, and the reference everywhere else:

- Adam through torch's fused kernel, called without torch.optim's import cost (fast/adam.py);
- pretraining the plain MLP on CPU with the C kernels, when a C compiler with OpenMP is present
  (fast/cpu_kernels.py);
- training on CUDA with the optimizer steps replayed from CUDA graphs (fast/cuda_graphs.py);
- evaluating the MLP on CPU with its mostly-zero hidden layer as a sparse matrix (fast/sparse.py).

Results agree with the reference to float rounding; each fast path is deterministic.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import BackendError
from .fast.adam import FusedAdam, make_adam
from .fast.cpu_kernels import train_fused, trains_with_kernels
from .fast.cuda_graphs import train_graphed
from .fast.sparse import sparse_mlp_forward
from .mlp import OversizedMLP
from .params import BACKENDS



def check_backend(name: Any) -> str:
    if name not in BACKENDS:
        raise BackendError(f"backend={name!r} is invalid: one of {', '.join(map(repr, BACKENDS))} is allowed")
    return name


def make_optimizer(params: list[nn.Parameter], lr: float, backend: str = "auto") -> Any:
    """Adam (torch's defaults, no weight decay) over ``params``."""
    if check_backend(backend) == "torch":
        return torch.optim.Adam(params, lr=lr)
    return make_adam(params, lr)


def training_path(model: nn.Module, images: torch.Tensor, optimizer: Any, backend: str) -> str:
    """'cpu-kernels', 'cuda-graphs' or 'eager': the loop that trains ``model`` on ``images`` (on its device).
    The CPU kernels keep their own Adam state, so a caller's ``optimizer`` means another path."""
    if check_backend(backend) == "torch":
        return "eager"
    if optimizer is None and type(model) is OversizedMLP and trains_with_kernels(model, images):
        return "cpu-kernels"
    if images.device.type == "cuda" and isinstance(optimizer, FusedAdam):
        return "cuda-graphs"
    return "eager"


def train_fast(path: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor], *,
               batch_size: int, lr: float, optimizer: Any, desc: str) -> torch.Tensor:
    """Every step's loss from the fast ``path`` that :func:`training_path` chose."""
    if path == "cpu-kernels":
        return train_fused(model, images, labels, batches, lr, desc)
    if path == "cuda-graphs":
        return train_graphed(model, images, labels, batches, batch_size, optimizer, desc)
    raise ValueError(f"training path {path!r} is not a fast path")


def evaluation_forward(model: nn.Module, images: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``model(images)`` without gradients; on CPU the MLP (with or without LoRA layers) takes the sparse path."""
    if check_backend(backend) == "auto" and images.device.type == "cpu" and type(model) is OversizedMLP:
        return sparse_mlp_forward(model, images)
    return model(images)
