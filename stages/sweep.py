"""Experiment stage sweep: a grid of fine-tunings of the pipeline's base model, every point in this one process.

    python -m stages.sweep          # the grid of experiments/sweep.yaml
    python -m flows.sweep -S lora.rank=1,2,4,8 --batched               # the same as one DVC experiment

experiments/sweep.yaml's ``grid`` lists sweeps in `dvc exp run -S`'s syntax (``lora.rank=1,2,4,8``); `dvc exp run
-S "experiments/sweep.yaml:grid=['lora.rank=1,2']"` sets it. A point may change ``finetune.*`` and ``lora.*``, the
keys that leave the base model as it is; each is trained and scored as the finetune and evaluate stages would with
its overrides applied, from one load of the data and the base, whose logits every point shares. Writes
experiments/results/sweep.json: the grid and, per point, evaluate.json's numbers for it.
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import copy
from typing import Any

import torch

from lora import AdapterLoadError, LoRAConfigError, trainable_parameters
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.finetuning import fine_tune_checked
from lora_mnist.integrity import require_finite
from lora_mnist.io import write_json
from lora_mnist.metrics import chosen_digit, predict, summarize
from lora_mnist.params import (Params, ParamsError, check_batched_grid, grid_points, load_raw, parse_grid, read_yaml,
                               shown, with_overrides)
from lora_mnist.paths import SWEEP_GRID, SWEEP_RESULT
from lora_mnist.scoring import on_against_base, validation_numbers
from lora_mnist.train import resolve_device


def read_grid() -> tuple[list[str], dict[str, list[Any]]]:
    """experiments/sweep.yaml's ``grid`` (a list of `-S` sweeps) and its parse, checked as a batched grid."""
    try:
        found = read_yaml(SWEEP_GRID.read_text(), str(SWEEP_GRID))
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{SWEEP_GRID}: cannot be read ({exc})") from None
    grid = found.get("grid") if isinstance(found, dict) else None
    if not isinstance(grid, list) or not grid or not all(isinstance(item, str) for item in grid):
        raise ParamsError(f"{SWEEP_GRID}: grid={shown(grid)} is invalid: a non-empty list of sweeps such as "
                          "'lora.rank=1,2' is allowed")
    try:
        parsed = parse_grid(grid)
        check_batched_grid(parsed)
    except ParamsError as exc:
        raise ParamsError(f"{SWEEP_GRID}: {exc}") from None
    return grid, parsed


def run(defaults: Params) -> dict[str, Any]:
    (grid, parsed), raw = read_grid(), load_raw()
    points = [(point, with_overrides(raw, point)) for point in grid_points(parsed)]  # every point checked first
    device, backend = resolve_device(defaults.device), defaults.backend
    data = {split: load_data("sweep", defaults, split, training=split == "train") for split in ("train", "validation", "test")}
    base = load_base_model(defaults, device)
    base_logits = {split: predict(base, data[split][0], backend) for split in ("validation", "test")}
    base_scores = {split: summarize(data[split][1], logits) for split, logits in base_logits.items()}
    rows = []
    for point, params in points:
        digit = chosen_digit(params.finetune.digit, base_scores["validation"]["errors_per_digit"])
        model = copy.deepcopy(base)
        losses, _ = fine_tune_checked(params, model, data["train"], digit, data["test"][0], base_logits["test"])
        rows.append({"overrides": point, "trainable_parameters": trainable_parameters(model)[0],
                     "loss_last_10": round(float(losses[-10:].mean()), 6),
                     **scores(model, data, base_logits, base_scores, digit, backend)})
        print(f"sweep {point}: digit {digit} test errors {rows[-1]['digit_errors']['base']} -> "
              f"{rows[-1]['digit_errors']['lora_on']}, accuracy {rows[-1]['lora_on']['accuracy']:.4f}; integrity check passed")
    result = {"grid": grid, "points": rows}
    write_json(SWEEP_RESULT, result)
    return result


def scores(model: torch.nn.Module, data: dict[str, Any], base_logits: dict[str, torch.Tensor],
           base_scores: dict[str, Any], digit: int, backend: str) -> dict[str, Any]:
    """evaluate.json's numbers of one point: test with LoRA on and off, McNemar's test, validation."""
    on_logits = {split: require_finite(predict(model, data[split][0], backend), SWEEP_RESULT) for split in ("validation", "test")}
    on = {split: summarize(data[split][1], logits) for split, logits in on_logits.items()}
    base = base_scores["test"]
    return {
        "digit": digit,
        "base": {"accuracy": base["accuracy"], "errors": base["errors"]},
        "lora_on": {"accuracy": on["test"]["accuracy"], "errors": on["test"]["errors"]},
        **on_against_base(data["test"][1], base_logits["test"], on_logits["test"], base, on["test"], digit),
        "validation": validation_numbers(base_scores["validation"], on["validation"], digit),
    }


def main() -> None:
    run_stage(run, LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main()
