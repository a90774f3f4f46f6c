"""Fine-tuning: LoRA adapters added to the frozen base and trained on one digit's images (plus any replay)."""
from __future__ import annotations

from typing import Any

import torch

from lora import base_weights_sha256, inject, mark_only_lora_trainable

from .batches import finetune_selection
from .errors import DataError
from .integrity import check_integrity
from .params import Params
from .train import train


def training_set(params: Params, labels: torch.Tensor, digit: int) -> torch.Tensor:
    """Indices of the fine-tuning images: the digit's, plus the replayed share of other digits."""
    if not (labels == digit).any():
        raise DataError(f"digit {digit} has no training images to fine-tune on: data.validation={params.data.validation} "
                        f"holds out all but {len(labels):,} of the training images; a smaller data.validation is allowed")
    return finetune_selection(labels, digit, params.finetune.replay_fraction, params.seed)


def add_adapter(params: Params, model: torch.nn.Module) -> None:
    """Inject LoRA into ``model`` as params.yaml says (seeded init) and freeze everything else."""
    torch.manual_seed(params.seed)  # A's random init
    inject(model, params.lora)
    mark_only_lora_trainable(model)


def train_on_digit(params: Params, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, digit: int,
                   optimizer: Any = None) -> torch.Tensor:
    """Train ``model``'s trainable parameters on the fine-tuning set of ``digit``; returns per-step losses."""
    cfg = params.finetune
    selection = training_set(params, labels, digit)
    return train(model, images[selection], labels[selection], steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                 seed=params.seed, backend=params.backend, optimizer=optimizer, desc=f"finetune digit {digit}")


def fine_tune_checked(params: Params, model: torch.nn.Module, train_data: tuple[torch.Tensor, torch.Tensor], digit: int,
                      test_images: torch.Tensor, base_test_logits: torch.Tensor) -> tuple[torch.Tensor, str]:
    """An experiment point's fine-tuning: LoRA added to ``model`` and trained on ``digit``, then the integrity check
    (the base's hash unchanged, LoRA off giving ``base_test_logits`` bit for bit); returns the per-step losses and
    the base's hash before fine-tuning."""
    sha_before = base_weights_sha256(model)
    add_adapter(params, model)
    losses = train_on_digit(params, model, *train_data, digit)
    check_integrity(model, test_images, base_test_logits, {"before fine-tuning": sha_before}, params.backend)
    return losses, sha_before
