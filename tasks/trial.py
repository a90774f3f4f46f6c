"""Experiment trial: one LoRA fine-tuning with params overridden, measured on the test set.

    python -m tasks.trial NAME [--pretrain] [key=value ...]

The matrix stages of experiments/dvc.yaml run this. It trains an adapter exactly as the finetune stage
would with the overrides applied (`finetune.digit: auto` picks the base model's worst digit), checks the
frozen base as the evaluate stage does, saves the adapter to experiments/models/NAME/adapter/ and writes
experiments/results/NAME.json: errors per digit of the base and with the adapter at inference scales 0 to
1, trainable parameters and the adapter's size on disk. With --pretrain it first trains its own base
model (repeats over seeds), else it uses models/base.safetensors.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from lora import AdapterLoadError, LoRAConfigError, base_weights_sha256, save_adapter, set_inference_scale, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.backend import check_backend
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import write_json
from lora_mnist.metrics import per_digit, predict, summarize
from lora_mnist.mlp import save_mlp
from lora_mnist.train import resolve_device

from .analyze import chosen_digit
from .cli import run_cli
from .finetune import add_adapter, lora_config, train_on_digit
from .inputs import load_base_model, load_data
from .params import Params, ParamsError, parse_overrides, with_overrides
from .paths import BASE_WEIGHTS, EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from .pretrain import pretrain_model

# Inference scales of the adapter's output, 0 (base model) to 1 (as trained): the no-retraining lever.
SCALES = [round(0.1 * i, 1) for i in range(11)]


def check_name(name: str) -> str:
    parts = name.split("/")
    if not all(part and part not in (".", "..") and all(c.isalnum() or c in "-_." for c in part) for part in parts):
        raise ParamsError(f"trial name {name!r} is invalid: letters, digits, '-', '_', '.' and '/' between parts are allowed")
    return name


def run(params: Params, name: str, overrides: dict[str, Any], pretrain: bool) -> dict[str, Any]:
    check_name(name)
    params = with_overrides(params, overrides)
    device, backend, config = resolve_device(params.device), check_backend(params.backend), lora_config(params)
    images, labels = load_data(f"trial {name}", params, "train", training=True)
    test_images, test_labels = load_data(f"trial {name}", params, "test", training=False)
    out = EXPERIMENT_MODELS / name

    if pretrain:
        model, _, _ = pretrain_model(params, device, images, labels)
        base_file = out / "base.safetensors"
        save_mlp(model, base_file)
    else:
        model, base_file = load_base_model(params, device), BASE_WEIGHTS
    base_logits = predict(model, test_images, backend)
    base = summarize(test_labels, base_logits)
    digit = chosen_digit(params, base["errors_per_digit"])

    sha_before = base_weights_sha256(model)
    add_adapter(params, model)
    losses = train_on_digit(params, model, images, labels, digit)
    check_integrity(model, test_images, base_logits, {"before fine-tuning": sha_before}, backend)
    trainable, total = trainable_parameters(model)
    save_adapter(model, out / "adapter", info={"digit": digit, "trial": name, "base_weights_sha256_before": sha_before})

    curve = []
    for scale in SCALES:
        set_inference_scale(model, scale)
        summary = summarize(test_labels, require_finite(predict(model, test_images, backend), out / "adapter"))
        curve.append({"scale": scale, "accuracy": summary["accuracy"], "errors_per_digit": per_digit(summary["errors_per_digit"])})

    result = {
        "name": name,
        "overrides": overrides,
        "pretrained_here": pretrain,
        "seed": params.seed,
        "digit": digit,
        "rank": config.r,
        "alpha": config.alpha,
        "scaling": config.scaling,
        "replay_fraction": params.finetune.replay_fraction,
        "steps": params.finetune.steps,
        "trainable_parameters": trainable,
        "base_parameters": total - trainable,
        "adapter_file_bytes": (out / "adapter" / WEIGHTS_NAME).stat().st_size,
        "base_file_bytes": base_file.stat().st_size,
        "loss_first_10": round(float(losses[:10].mean()), 6),
        "loss_last_10": round(float(losses[-10:].mean()), 6),
        "base": {"accuracy": base["accuracy"], "errors_per_digit": per_digit(base["errors_per_digit"])},
        "lora_on": curve[-1],
        "scale_curve": curve,
    }
    write_json(EXPERIMENT_RESULTS / f"{name}.json", result)
    on = result["lora_on"]["errors_per_digit"]
    print(f"trial {name}: digit {digit}, errors {base['errors_per_digit'][digit]} -> {on[str(digit)]}, accuracy "
          f"{base['accuracy']:.4f} -> {result['lora_on']['accuracy']:.4f}, {trainable:,} trainable parameters; "
          "integrity check passed")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tasks.trial", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="where the results go: experiments/results/NAME.json, experiments/models/NAME/")
    parser.add_argument("--pretrain", action="store_true", help="train a base model first instead of using models/base.safetensors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="params.yaml keys to override, e.g. lora.rank=4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --pretrain
    run_cli(lambda params: run(params, args.name, parse_overrides(args.overrides), args.pretrain), LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main(sys.argv[1:])
