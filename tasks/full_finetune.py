"""Experiment: LoRA against full fine-tuning on the same images, step budget, learning rate and seed.

Both start from models/base.safetensors and train on the worst digit (or `finetune.digit`), timed side by
side in this one process. Writes experiments/results/full_finetune.json: trainable parameters, optimiser
state, file size (adapter against full weights), step time, and per-digit errors of each.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from lora import save_adapter, trainable_parameters
from lora.files import save_tensors, write_json
from lora.metrics import predict, summarize
from lora.save_load import WEIGHTS_NAME
from lora.train import make_optimizer, optimizer_state_bytes, resolve_device

from .analyze import chosen_digit
from .common import EXPERIMENT_MODELS, EXPERIMENT_RESULTS, load_base_model, load_data, run_cli
from .finetune import add_adapter, train_on_digit

OUT = EXPERIMENT_MODELS / "full_finetune"
RESULT = EXPERIMENT_RESULTS / "full_finetune.json"


def run(params: dict[str, Any]) -> dict[str, Any]:
    cfg = params["finetune"]
    device = resolve_device(params["device"])
    images, labels = load_data("full_finetune", params, "train", training=True)
    test_images, test_labels = load_data("full_finetune", params, "test", training=False)
    lora_model, full_model = load_base_model(params, device), load_base_model(params, device)
    base = summarize(test_labels, predict(full_model, test_images))
    digit = chosen_digit(params, base["errors_per_digit"])
    add_adapter(params, lora_model)

    rows = {}
    for name, model in (("lora", lora_model), ("full", full_model)):
        optimizer = make_optimizer(model, cfg["lr"])
        started = time.perf_counter()
        losses = train_on_digit(params, model, images, labels, digit, optimizer=optimizer)
        seconds = time.perf_counter() - started
        if name == "lora":
            save_adapter(model, OUT / "adapter", info={"digit": digit})
            file = OUT / "adapter" / WEIGHTS_NAME
        else:
            file = OUT / "full.safetensors"
            save_tensors(file, model.state_dict())
        summary = summarize(test_labels, predict(model, test_images))
        rows[name] = {
            "trainable_parameters": trainable_parameters(model)[0],
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "file_bytes": file.stat().st_size,
            "step_ms": round(1e3 * seconds / cfg["steps"], 3),
            "loss_last_10": round(float(losses[-10:].mean()), 6),
            "accuracy": summary["accuracy"],
            "errors_per_digit": summary["errors_per_digit"],
        }
    result = {
        "digit": digit,
        "steps": cfg["steps"],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "base": {"accuracy": base["accuracy"], "errors_per_digit": base["errors_per_digit"]},
        **rows,
    }
    write_json(RESULT, result)
    for name, row in rows.items():
        print(f"full_finetune, {name}: digit {digit} errors {base['errors_per_digit'][digit]} -> "
              f"{row['errors_per_digit'][digit]}, accuracy {row['accuracy']:.4f}, "
              f"{row['trainable_parameters']:,} trainable parameters, {row['step_ms']} ms/step")
    return result


if __name__ == "__main__":
    run_cli(run)
