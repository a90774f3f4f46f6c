"""Pretraining: a fresh oversized MLP trained on the training images as params.yaml's `pretrain` section says."""
from __future__ import annotations

import torch

from .backend import training_path
from .mlp import OversizedMLP
from .params import Params
from .train import train


def pretrain_model(params: Params, device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> tuple[OversizedMLP, torch.Tensor, str]:
    """A fresh MLP trained as params.yaml's `pretrain` section says; returns it with its per-step losses and
    the training path the backend took."""
    cfg = params.pretrain
    torch.manual_seed(params.seed)
    model = OversizedMLP(params.model.hidden_1, params.model.hidden_2).to(device)
    images, labels = images.to(device), labels.to(device)
    path = training_path(model, images, None, params.backend)
    losses = train(model, images, labels, steps=cfg.steps(len(images)), batch_size=cfg.batch_size, lr=cfg.lr,
                   seed=params.seed, backend=params.backend, desc="pretrain")
    return model, losses, path
