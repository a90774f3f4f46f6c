"""Evaluation: logits in large batches, accuracy, per-digit errors, confusion matrix, worst digit."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .backend import evaluation_forward
from .params import NUM_CLASSES


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, backend: str = "auto", batch_size: int = 2500) -> torch.Tensor:
    """Logits for every image, computed on the model's device, returned on CPU."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([evaluation_forward(model, chunk.to(device), backend).cpu() for chunk in images.split(batch_size)])


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """counts[true, predicted]."""
    flat = labels * NUM_CLASSES + predictions
    return torch.bincount(flat, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)


def summarize(labels: torch.Tensor, logits: torch.Tensor) -> dict[str, Any]:
    """Accuracy, errors per true digit and the confusion matrix, as plain JSON-ready values."""
    predictions = logits.argmax(dim=1)
    confusion = confusion_matrix(labels, predictions)
    per_digit_total = confusion.sum(dim=1)
    errors = per_digit_total - confusion.diagonal()
    return {
        "accuracy": round(float(confusion.diagonal().sum()) / max(labels.numel(), 1), 6),
        "errors": int(errors.sum()),
        "errors_per_digit": [int(e) for e in errors],
        "confusion": confusion.tolist(),
    }


def per_digit(values: list[int]) -> dict[str, int]:
    """Per-digit values as every output file stores them: keyed by digit, so `dvc metrics diff` shows one row each."""
    return {str(digit): value for digit, value in enumerate(values)}


def worst_digit(errors_per_digit: list[int]) -> int:
    """The digit with the most errors; ties go to the lower digit."""
    return max(range(len(errors_per_digit)), key=lambda d: (errors_per_digit[d], -d))


def chosen_digit(forced: int | str, errors_per_digit: list[int]) -> int:
    """The digit to fine-tune on: ``forced`` (params' `finetune.digit`) unless it is 'auto', else the worst digit."""
    return worst_digit(errors_per_digit) if forced == "auto" else int(forced)
