"""LoRA on against the base on the same images: the numbers evaluate.json records, and the batched sweep per point."""
from __future__ import annotations

from typing import Any

import torch

from .stats import mcnemar


def mcnemar_on_vs_off(labels: torch.Tensor, base_logits: torch.Tensor, on_logits: torch.Tensor) -> dict[str, Any]:
    """McNemar's test of LoRA on against off (the base) on the same images: the images only one gets right, and p."""
    paired = mcnemar((on_logits.argmax(1) == labels).tolist(), (base_logits.argmax(1) == labels).tolist())
    return {"only_on_right": paired["only_first_right"], "only_off_right": paired["only_second_right"],
            "p_value": float(f"{paired['p_value']:.4g}")}


def on_against_base(labels: torch.Tensor, base_logits: torch.Tensor, on_logits: torch.Tensor,
                    base: dict[str, Any], on: dict[str, Any], digit: int) -> dict[str, Any]:
    """The digit's errors, their reduction, the accuracy change and McNemar's test of on against off (the base), from
    the logits and their ``metrics.summarize``."""
    base_digit, on_digit = base["errors_per_digit"][digit], on["errors_per_digit"][digit]
    return {
        "digit_errors": {"base": base_digit, "lora_on": on_digit},
        "digit_error_reduction": round(1 - on_digit / max(base_digit, 1), 4),
        "accuracy_change": round(on["accuracy"] - base["accuracy"], 6),
        "mcnemar_on_vs_off": mcnemar_on_vs_off(labels, base_logits, on_logits),
    }


def validation_numbers(off: dict[str, Any], on: dict[str, Any], digit: int) -> dict[str, Any]:
    """Accuracy, errors and the digit's errors on the validation images, LoRA off and on (the split choices use)."""
    return {name: {"accuracy": s["accuracy"], "errors": s["errors"], "digit_errors": s["errors_per_digit"][digit]}
            for name, s in (("lora_off", off), ("lora_on", on))}
