"""Experiment: LoRA against full fine-tuning on the same images, step budget, learning rate and seed.

Both start from models/base.safetensors and train on the worst digit on validation (or `finetune.digit`); the LoRA
model's frozen base is checked as the evaluate stage checks it (full fine-tuning has none). Writes
experiments/results/full_finetune.json: trainable parameters, optimiser state, file size (adapter against
full weights) and per-digit errors of each. Step times are printed, not written: they vary from run to
run, and no benchmark measures full fine-tuning's (bench/lora_layers.py times LoRA layers against the base's).
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import time
from typing import Any

from lora import AdapterLoadError, LoRAConfigError, base_weights_sha256, save_adapter, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.backend import make_optimizer
from lora_mnist.cli import run_stage
from lora_mnist.finetuning import add_adapter, train_on_digit
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import save_tensors, write_json
from lora_mnist.metrics import chosen_digit, per_digit, predict, summarize
from lora_mnist.params import Params
from lora_mnist.paths import EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from lora_mnist.train import optimizer_state_bytes, resolve_device

OUT = EXPERIMENT_MODELS / "full_finetune"
RESULT = EXPERIMENT_RESULTS / "full_finetune.json"


def run(params: Params) -> dict[str, Any]:
    device, backend = resolve_device(params.device), params.backend
    images, labels = load_data("full_finetune", params, "train", training=True)
    validation_images, validation_labels = load_data("full_finetune", params, "validation", training=False)
    test_images, test_labels = load_data("full_finetune", params, "test", training=False)
    lora_model, full_model = load_base_model(params, device), load_base_model(params, device)
    base_test_logits = predict(full_model, test_images, backend)
    base, sha_before = summarize(test_labels, base_test_logits), base_weights_sha256(lora_model)
    digit = chosen_digit(params.finetune.digit, summarize(validation_labels, predict(full_model, validation_images, backend))["errors_per_digit"])
    add_adapter(params, lora_model)

    rows = {}
    for name, model in (("lora", lora_model), ("full", full_model)):
        # The same loop for both (an optimizer of our own keeps the CPU kernels out), so the step times compare.
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], params.finetune.lr, backend)
        started = time.perf_counter()
        losses = train_on_digit(params, model, images, labels, digit, optimizer=optimizer)
        step_ms = 1e3 * (time.perf_counter() - started) / params.finetune.steps
        if name == "lora":
            check_integrity(model, test_images, base_test_logits, {"before fine-tuning": sha_before}, backend)
            save_adapter(model, OUT / "adapter", info={"digit": digit})
            file = OUT / "adapter" / WEIGHTS_NAME
        else:
            file = OUT / "full.safetensors"
            save_tensors(file, model.state_dict())
        summary = summarize(test_labels, require_finite(predict(model, test_images, backend), f"full_finetune {name}"))
        rows[name] = {
            "trainable_parameters": trainable_parameters(model)[0],
            "optimizer_state_bytes": optimizer_state_bytes(optimizer),
            "file_bytes": file.stat().st_size,
            "loss_last_10": round(float(losses[-10:].mean()), 6),
            "accuracy": summary["accuracy"],
            "errors_per_digit": per_digit(summary["errors_per_digit"]),
        }
        print(f"full_finetune, {name}: digit {digit} errors {base['errors_per_digit'][digit]} -> "
              f"{summary['errors_per_digit'][digit]}, accuracy {summary['accuracy']:.4f}, "
              f"{rows[name]['trainable_parameters']:,} trainable parameters, {step_ms:.2f} ms/step on {device}")
    result = {
        "digit": digit,
        "steps": params.finetune.steps,
        "base": {"accuracy": base["accuracy"], "errors_per_digit": per_digit(base["errors_per_digit"])},
        **rows,
    }
    write_json(RESULT, result)
    return result


def main() -> None:
    run_stage(run, LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main()
