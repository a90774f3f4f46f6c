"""The integrity check: fine-tuning left the frozen base weights bit-identical, and LoRA off is the base."""
from __future__ import annotations

import torch
from torch import nn

from lora import base_weights_sha256, disable_adapter

from .errors import IntegrityError, WeightsError
from .metrics import predict


def require_finite(logits: torch.Tensor, adapter: object) -> torch.Tensor:
    """``logits`` if every one is finite; an adapter whose values are huge, though finite, overflows here."""
    bad = int((~torch.isfinite(logits)).any(dim=1).sum())
    if bad:
        raise WeightsError(f"{adapter}: with the adapter on, the logits of {bad} images are not finite; "
                           "its values are too large for this base model")
    return logits


def check_integrity(model: nn.Module, images: torch.Tensor, base_logits: torch.Tensor, recorded: dict[str, str | None],
                    backend: str = "auto") -> str:
    """Raise IntegrityError unless the base weights of ``model`` hash as every entry of ``recorded`` says
    (e.g. before and after fine-tuning) and its LoRA-off logits on ``images`` equal ``base_logits`` bit for
    bit. Returns the hash."""
    now = base_weights_sha256(model)
    if any(value != now for value in recorded.values()):
        seen = ", ".join(f"{name} {str(value)[:16]}" for name, value in recorded.items())
        raise IntegrityError(f"integrity check failed: base weights sha256 {seen}, now {now[:16]}; the frozen weights changed")
    with disable_adapter(model):
        off_logits = predict(model, images, backend)
    if not torch.equal(off_logits, base_logits):
        changed = int((off_logits != base_logits).any(dim=1).sum())
        raise IntegrityError(f"integrity check failed: LoRA-off logits differ from the base model's on {changed} images")
    return now
