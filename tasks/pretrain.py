"""Stage 2, pretrain: the oversized MLP on all 60,000 training images; weights to models/base.safetensors."""
from __future__ import annotations

import time
from typing import Any

import torch

from lora.fused import resolve_kernel, train_fused
from lora.mlp import OversizedMLP
from lora.train import resolve_device, steps_for_epochs, train

from .common import BASE_WEIGHTS, load_data, log_losses, run_cli, save_base_model


def pretrain_model(
    params: dict[str, Any], device: torch.device, images: torch.Tensor, labels: torch.Tensor
) -> tuple[OversizedMLP, torch.Tensor, str]:
    """A fresh MLP trained as params.yaml's `pretrain` section says; returns it with its per-step losses and
    the kernel that trained it ('fused' or 'torch')."""
    cfg = params["pretrain"]
    steps = steps_for_epochs(images.shape[0], cfg["batch_size"], cfg["epochs"])
    if cfg["max_steps"] is not None:
        steps = min(steps, cfg["max_steps"])
    kernel = resolve_kernel(cfg["kernel"], device)
    torch.manual_seed(params["seed"])
    model = OversizedMLP(**params["model"]).to(device)
    losses = (train_fused if kernel == "fused" else train)(
        model, images, labels, steps=steps, batch_size=cfg["batch_size"], lr=cfg["lr"], seed=params["seed"], desc="pretrain"
    )
    return model, losses, kernel


def run(params: dict[str, Any]) -> dict[str, Any]:
    device = resolve_device(params["device"])
    images, labels = load_data("pretrain", params, "train", training=True)
    started = time.perf_counter()
    model, losses, kernel = pretrain_model(params, device, images, labels)
    seconds = time.perf_counter() - started
    steps = len(losses)

    save_base_model(model)
    log_losses("pretrain", losses, kernel=kernel)
    print(f"pretrain: {steps} steps on {device} ({kernel} kernel) in {seconds:.1f} s ({1e3 * seconds / steps:.2f} ms/step), "
          f"mean loss of the last 100 steps {losses[-100:].mean():.4f}; weights in {BASE_WEIGHTS}")
    return {"steps": steps, "seconds": seconds, "losses": losses, "kernel": kernel}


if __name__ == "__main__":
    run_cli(run)
