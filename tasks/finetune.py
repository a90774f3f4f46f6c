"""Stage 4, finetune: LoRA adapters on the frozen base, trained on the chosen digit's images alone."""
from __future__ import annotations

from typing import Any

import torch

from lora import LoRAConfig, LoRAConfigError, base_weights_sha256, inject, mark_only_lora_trainable, save_adapter, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.backend import check_backend
from lora_mnist.batches import finetune_selection
from lora_mnist.io import write_json
from lora_mnist.mlp import LAYERS, layer_sides
from lora_mnist.train import resolve_device, train

from .analyze import target_digit
from .cli import run_cli
from .curves import log_losses
from .inputs import load_base_model, load_data
from .params import Params, ParamsError
from .paths import ADAPTER_DIR, FINETUNE_METRICS

# params.yaml's `lora` keys -> LoRAConfig's fields
LORA_FIELDS = {"rank": "r", "alpha": "alpha", "dropout": "dropout", "init": "init", "use_rslora": "use_rslora",
               "targets": "target_modules"}


def lora_config(params: Params, source: str = "params.yaml") -> LoRAConfig:
    """The `lora` section as a LoRAConfig, which checks its values; the targets must be layers of the MLP."""
    section = params.lora
    problems = [f"lora.{key} is missing" for key in LORA_FIELDS if key not in section]
    problems += [f"unknown key lora.{key!r}: allowed are {sorted(LORA_FIELDS)}" for key in section if key not in LORA_FIELDS]
    targets = section.get("targets")
    if "targets" in section and not (isinstance(targets, list) and targets and all(t in LAYERS for t in targets)):
        problems.append(f"lora.targets={targets!r} is invalid: a non-empty list of {', '.join(map(repr, LAYERS))} is allowed")
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems))
    try:
        config = LoRAConfig(**{LORA_FIELDS[key]: value for key, value in section.items()})
    except LoRAConfigError as exc:
        key = next(key for key, name in LORA_FIELDS.items() if name == exc.field)
        raise ParamsError(f"{source}: lora.{key}={exc.value!r} is invalid: {exc.allowed} is allowed") from None
    # B·A has rank at most a layer's smaller side: above that on some targets is allowed (as in PEFT: more
    # parameters, same reach); above it on every target it can only be a mistake.
    sides = layer_sides(params.model.hidden_1, params.model.hidden_2)
    limit = max(min(sides[t]) for t in config.target_modules)
    if config.r > limit:
        raise ParamsError(f"{source}: lora.rank={config.r} is invalid: 1..{limit} is allowed (above every target layer's smaller side)")
    return config


def training_set(params: Params, labels: torch.Tensor, digit: int) -> torch.Tensor:
    """Indices of the fine-tuning images: the digit's, plus the replayed share of other digits."""
    return finetune_selection(labels, digit, params.finetune.replay_fraction, params.seed)


def add_adapter(params: Params, model: torch.nn.Module) -> None:
    """Inject LoRA into ``model`` as params.yaml says (seeded init) and freeze everything else."""
    config = lora_config(params)
    torch.manual_seed(params.seed)  # A's random init
    inject(model, config)
    mark_only_lora_trainable(model)


def train_on_digit(params: Params, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, digit: int,
                   optimizer: Any = None) -> torch.Tensor:
    """Train ``model``'s trainable parameters on the fine-tuning set of ``digit``; returns per-step losses."""
    cfg = params.finetune
    selection = training_set(params, labels, digit)
    return train(model, images[selection], labels[selection], steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                 seed=params.seed, backend=params.backend, optimizer=optimizer, desc=f"finetune digit {digit}")


def run(params: Params) -> dict[str, Any]:
    device, _, _ = resolve_device(params.device), check_backend(params.backend), lora_config(params)
    digit = target_digit()
    images, labels = load_data("finetune", params, "train", training=True)

    model = load_base_model(params, device)
    sha_before = base_weights_sha256(model)
    add_adapter(params, model)
    losses = train_on_digit(params, model, images, labels, digit)
    trainable, total = trainable_parameters(model)

    provenance = save_adapter(model, ADAPTER_DIR, info={"digit": digit, "steps": params.finetune.steps,
                                                         "base_weights_sha256_before": sha_before})
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


def main() -> None:
    run_cli(run, LoRAConfigError)


if __name__ == "__main__":
    main()
