"""The one training entry point: Adam on cross-entropy over seeded batches of tensors already in memory."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .backend import make_optimizer, train_fast, training_path
from .batches import batch_order
from .errors import DeviceError, TrainingError


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device={name!r} is invalid: 'auto', 'cpu', 'cuda' or 'cuda:N' is allowed") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={name!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device={name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise DeviceError(f"device={name!r} is invalid: 'auto', 'cpu', 'cuda' or 'cuda:N' is allowed")
    return device


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    backend: str = "auto",
    optimizer: Any = None,
    desc: str = "train",
) -> torch.Tensor:
    """Train the parameters of ``model`` that require gradients; returns every step's loss (on CPU).

    ``backend`` (lora_mnist.backend): 'auto' takes a fast path where one applies, 'torch' plain PyTorch.
    Pass ``optimizer`` (from :func:`lora_mnist.backend.make_optimizer`) to inspect its state afterwards;
    ``lr`` is then unused."""
    if images.shape[0] == 0:
        raise ValueError("no training samples: the selected data is empty")
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    batches = batch_order(images.shape[0], batch_size, steps, seed)
    path = training_path(model, images, optimizer, backend)
    if path == "cpu-kernels":
        losses = train_fast(path, model, images, labels, batches, batch_size=batch_size, lr=lr, optimizer=None, desc=desc)
        return _finite(model, losses, desc)
    optimizer = optimizer or make_optimizer([p for p in model.parameters() if p.requires_grad], lr, backend)
    path = training_path(model, images, optimizer, backend)
    model.train()
    if path == "cuda-graphs":
        losses = train_fast(path, model, images, labels, batches, batch_size=batch_size, lr=lr, optimizer=optimizer, desc=desc)
    else:
        loss_fn = nn.CrossEntropyLoss()
        losses = torch.empty(steps, device=device)
        for step, index in enumerate(tqdm(batches, desc=desc, disable=None)):
            index = index.to(device)
            loss = loss_fn(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[step] = loss.detach()
    model.eval()
    return _finite(model, losses.cpu(), desc)


def _finite(model: nn.Module, losses: torch.Tensor, desc: str) -> torch.Tensor:
    """``losses``, once every loss and trained weight is finite; a run whose loss or weights became inf or NaN
    raises TrainingError, before any stage saves them."""
    bad = (~torch.isfinite(losses)).nonzero().flatten()
    if len(bad) or not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        where = f"the loss is {losses[bad[0]].item()} at step {int(bad[0]) + 1}" if len(bad) else "the weights are not finite"
        raise TrainingError(f"{desc} diverged: {where} of {len(losses)}; a smaller learning rate (or LoRA alpha) "
                            "keeps training finite")
    return losses


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes held by the optimizer's state tensors (Adam: two moments per parameter and a step count)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor))
