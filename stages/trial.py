"""Experiment trial: one LoRA fine-tuning with params overridden, scored on validation and on test.

    python -m stages.trial NAME [--pretrain] [key=value ...]

The matrix stages of experiments/dvc.yaml run this. It trains an adapter exactly as the finetune stage would
with the overrides applied (`finetune.digit: auto` picks the base model's worst digit on validation), checks the
frozen base as the evaluate stage does, saves the adapter to experiments/models/NAME/adapter/ and writes
experiments/results/NAME.json: errors per digit of the base and with the adapter at inference scales 0 to 1, on
validation (where choices are made) and on test (where they are reported), trainable parameters and the
adapter's size on disk. With --pretrain it first trains its own base model (repeats over seeds), else it uses
models/base.safetensors.
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import argparse
import sys
from typing import Any

from lora import AdapterLoadError, LoRAConfigError, base_weights_sha256, save_adapter, set_inference_scale, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.finetuning import add_adapter, train_on_digit
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import staged_outputs
from lora_mnist.metrics import chosen_digit, per_digit, predict, summarize
from lora_mnist.params import Params, ParamsError, load_raw, parse_overrides, with_overrides
from lora_mnist.paths import BASE_WEIGHTS, EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from lora_mnist.pretraining import pretrain_model
from lora_mnist.train import resolve_device

# Inference scales of the adapter's output, 0 (base model) to 1 (as trained): the no-retraining lever.
SCALES = [round(0.1 * i, 1) for i in range(11)]


def check_name(name: str) -> str:
    parts = name.split("/")
    if not all(part and part not in (".", "..") and all(c.isalnum() or c in "-_." for c in part) for part in parts):
        raise ParamsError(f"trial name {name!r} is invalid: letters, digits, '-', '_', '.' and '/' between parts are allowed")
    return name


def run(params: Params, name: str, overrides: dict[str, Any], pretrain: bool) -> dict[str, Any]:
    check_name(name)
    params = with_overrides(load_raw(), overrides)
    device, backend, config = resolve_device(params.device), params.backend, params.lora
    images, labels = load_data(f"trial {name}", params, "train", training=True)
    splits = {split: load_data(f"trial {name}", params, split, training=False) for split in ("validation", "test")}
    out = EXPERIMENT_MODELS / name

    with staged_outputs() as outputs:
        if pretrain:
            model, _, _ = pretrain_model(params, device, images, labels)
            base_file = out / "base.safetensors"
            outputs.tensors(base_file, model.state_dict())
        else:
            model, base_file = load_base_model(params, device), BASE_WEIGHTS
        base_logits = {split: predict(model, x, backend) for split, (x, _) in splits.items()}
        base = {split: summarize(y, base_logits[split]) for split, (_, y) in splits.items()}
        digit = chosen_digit(params.finetune.digit, base["validation"]["errors_per_digit"])

        sha_before = base_weights_sha256(model)
        add_adapter(params, model)
        losses = train_on_digit(params, model, images, labels, digit)
        check_integrity(model, splits["test"][0], base_logits["test"], {"before fine-tuning": sha_before}, backend)
        trainable, total = trainable_parameters(model)
        adapter_dir = outputs.directory(out / "adapter")
        save_adapter(model, adapter_dir, info={"digit": digit, "trial": name, "base_weights_sha256_before": sha_before})
        adapter_bytes = (adapter_dir / WEIGHTS_NAME).stat().st_size

        curves: dict[str, list[dict[str, Any]]] = {"validation": [], "test": []}
        for scale in SCALES:
            set_inference_scale(model, scale)
            for split, (x, y) in splits.items():
                summary = summarize(y, require_finite(predict(model, x, backend), out / "adapter"))
                curves[split].append({"scale": scale, "accuracy": summary["accuracy"],
                                      "errors_per_digit": per_digit(summary["errors_per_digit"])})
        test_base = base["test"]
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
            "adapter_file_bytes": adapter_bytes,
            "base_file_bytes": (outputs.staged.get(base_file) or base_file).stat().st_size,
            "loss_first_10": round(float(losses[:10].mean()), 6),
            "loss_last_10": round(float(losses[-10:].mean()), 6),
            "base": {"accuracy": test_base["accuracy"], "errors_per_digit": per_digit(test_base["errors_per_digit"])},
            "lora_on": curves["test"][-1],
            "scale_curve": curves["test"],
            "validation": {"base": {"accuracy": base["validation"]["accuracy"],
                                    "errors_per_digit": per_digit(base["validation"]["errors_per_digit"])},
                           "scale_curve": curves["validation"]},
        }
        outputs.json(EXPERIMENT_RESULTS / f"{name}.json", result)
    on = result["lora_on"]["errors_per_digit"]
    print(f"trial {name}: digit {digit}, test errors {test_base['errors_per_digit'][digit]} -> {on[str(digit)]}, accuracy "
          f"{test_base['accuracy']:.4f} -> {result['lora_on']['accuracy']:.4f}, {trainable:,} trainable parameters; "
          "integrity check passed")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.trial", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="where the results go: experiments/results/NAME.json, experiments/models/NAME/")
    parser.add_argument("--pretrain", action="store_true", help="train a base model first instead of using models/base.safetensors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="params.yaml keys to override, e.g. lora.rank=4")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after --pretrain
    run_stage(lambda params: run(params, args.name, parse_overrides(args.overrides), args.pretrain), LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main(sys.argv[1:])
