"""Stage 4, finetune: LoRA adapters on the frozen base, trained on the chosen digit's images alone."""
from __future__ import annotations

from typing import Any

import torch

from lora import base_weights_sha256, inject, mark_only_lora_trainable, save_adapter, trainable_parameters
from lora.files import write_json
from lora.save_load import WEIGHTS_NAME
from lora.train import Adam, finetune_selection, resolve_device, train

from .analyze import target_digit
from .common import ADAPTER_DIR, FINETUNE_METRICS, load_base_model, load_data, log_losses, lora_config, run_cli


def training_set(params: dict[str, Any], labels: torch.Tensor, digit: int) -> torch.Tensor:
    """Indices of the fine-tuning images: the digit's, plus the replayed share of other digits."""
    return finetune_selection(labels, digit, params["finetune"]["replay_fraction"], params["seed"])


def add_adapter(params: dict[str, Any], model: torch.nn.Module) -> None:
    """Inject LoRA into ``model`` as params.yaml says (seeded init) and freeze everything else."""
    torch.manual_seed(params["seed"])  # A's random init
    inject(model, lora_config(params))
    mark_only_lora_trainable(model)


def train_on_digit(
    params: dict[str, Any], model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, digit: int,
    optimizer: Adam | None = None,
) -> torch.Tensor:
    """Train ``model``'s trainable parameters on the fine-tuning set of ``digit``; returns per-step losses."""
    cfg = params["finetune"]
    selection = training_set(params, labels, digit)
    return train(
        model, images[selection], labels[selection], steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"],
        seed=params["seed"], desc=f"finetune digit {digit}", optimizer=optimizer,
    )


def train_adapter(params: dict[str, Any], model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, digit: int) -> torch.Tensor:
    """LoRA on the frozen ``model``, trained on ``digit``; returns per-step losses."""
    add_adapter(params, model)
    return train_on_digit(params, model, images, labels, digit)


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = params["finetune"]
    device = resolve_device(params["device"])
    digit = target_digit()
    images, labels = load_data("finetune", params, "train", training=True)

    model = load_base_model(params, device)
    sha_before = base_weights_sha256(model)
    losses = train_adapter(params, model, images, labels, digit)
    trainable, total = trainable_parameters(model)

    provenance = save_adapter(
        model, ADAPTER_DIR, info={"digit": digit, "steps": cfg["steps"], "base_weights_sha256_before": sha_before}
    )
    log_losses("finetune", losses)
    base_total = total - trainable
    selection = training_set(params, labels, digit)
    result = {
        "digit": digit,
        "train_images": len(selection),
        "replay_images": int((labels[selection] != digit).sum()),
        "trainable_parameters": trainable,
        "base_parameters": base_total,
        "trainable_percent": round(100 * trainable / base_total, 3),
        "adapter_file_bytes": (ADAPTER_DIR / WEIGHTS_NAME).stat().st_size,
        "loss_first_10": round(float(losses[:10].mean()), 6),
        "loss_last_10": round(float(losses[-10:].mean()), 6),
        "base_weights_sha256_before": sha_before,
        "base_weights_sha256_after": provenance["base_weights_sha256"],
    }
    write_json(FINETUNE_METRICS, result)
    print(f"finetune: digit {digit}, {trainable:,} trainable parameters ({result['trainable_percent']}% of "
          f"{base_total:,}), loss {result['loss_first_10']:.4f} -> {result['loss_last_10']:.4f}; adapter in {ADAPTER_DIR}")
    return result


if __name__ == "__main__":
    run_cli(run)
