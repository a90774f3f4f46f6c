"""Stage 2, pretrain: the oversized MLP on all 60,000 training images; weights to models/base.safetensors."""
from __future__ import annotations

import time
from typing import Any

import torch

from lora_mnist.backend import check_backend, training_path
from lora_mnist.batches import steps_for_epochs
from lora_mnist.io import file_sha256
from lora_mnist.mlp import OversizedMLP, save_mlp
from lora_mnist.train import resolve_device, train

from .cli import run_cli
from .curves import log_losses
from .inputs import load_data
from .params import Params
from .paths import BASE_WEIGHTS


def pretrain_model(params: Params, device: torch.device, images: torch.Tensor, labels: torch.Tensor) -> tuple[OversizedMLP, torch.Tensor, str]:
    """A fresh MLP trained as params.yaml's `pretrain` section says; returns it with its per-step losses and
    the training path the backend took."""
    cfg = params.pretrain
    steps = steps_for_epochs(images.shape[0], cfg.batch_size, cfg.epochs)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    torch.manual_seed(params.seed)
    model = OversizedMLP(params.model.hidden_1, params.model.hidden_2).to(device)
    images, labels = images.to(device), labels.to(device)
    path = training_path(model, images, None, params.backend)
    losses = train(model, images, labels, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=params.seed,
                   backend=params.backend, desc="pretrain")
    return model, losses, path


def run(params: Params) -> dict[str, Any]:
    device, _ = resolve_device(params.device), check_backend(params.backend)
    images, labels = load_data("pretrain", params, "train", training=True)
    started = time.perf_counter()
    model, losses, path = pretrain_model(params, device, images, labels)
    seconds = time.perf_counter() - started  # printed only: no timing goes into a tracked output

    save_mlp(model, BASE_WEIGHTS)
    log_losses("pretrain", losses, training_path=path, weights_sha256=file_sha256(BASE_WEIGHTS))
    print(f"pretrain: {len(losses)} steps on {device} ({path}) in {seconds:.1f} s ({1e3 * seconds / len(losses):.2f} ms/step), "
          f"mean loss of the last 100 steps {losses[-100:].mean():.4f}; weights in {BASE_WEIGHTS}")
    return {"steps": len(losses), "losses": losses, "training_path": path}


def main() -> None:
    run_cli(run)


if __name__ == "__main__":
    main()
