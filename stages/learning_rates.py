"""Experiment stage learning_rates: learning against forgetting across learning rates, LoRA and full fine-tuning.

    python -m stages.learning_rates finetune.lr=0.0001,0.001,0.01 lora.rank=1,4,16

As Biderman et al. 2024 ("LoRA learns less and forgets less") compare them: every method at every learning rate,
from models/base.safetensors on the same images (the worst digit on validation, or `finetune.digit`), steps and
seed, with the same Adam loop. The methods: LoRA at each rank with alpha fixed (params.yaml's lora.alpha), LoRA
at each rank with alpha/rank fixed (params.yaml's ratio), and full fine-tuning (every weight trained). Each point
is scored on validation, where the report draws each method's frontier, and on test. Writes
experiments/results/learning_rates.json.
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import copy
import sys
from typing import Any

import torch

from lora import AdapterLoadError, LoRAConfigError, base_weights_sha256, trainable_parameters
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.backend import make_optimizer
from lora_mnist.cli import run_stage
from lora_mnist.finetuning import add_adapter, train_on_digit
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import write_json
from lora_mnist.metrics import chosen_digit, predict, summarize
from lora_mnist.params import Params, ParamsError, load_raw, parse_grid, with_overrides
from lora_mnist.paths import EXPERIMENT_RESULTS
from lora_mnist.train import resolve_device

RESULT = EXPERIMENT_RESULTS / "learning_rates.json"
GRID_KEYS = ("finetune.lr", "lora.rank")


def grid(args: list[str]) -> dict[str, list[Any]]:
    """``finetune.lr=…`` and ``lora.rank=…``, each given once, in `dvc exp run -S`'s syntax."""
    found = parse_grid(args)
    if sorted(found) != sorted(GRID_KEYS):
        raise ParamsError(f"{sorted(found)} are swept: {' and '.join(GRID_KEYS)}, each once, are allowed "
                          "(python -m stages.learning_rates finetune.lr=V1,V2 lora.rank=R1,R2)")
    return found


def methods(params: Params, ranks: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each method's overrides, besides the learning rate: (name, {key: value})."""
    if params.lora.use_rslora:
        raise ParamsError("lora.use_rslora=true is invalid here: alpha/rank fixed holds the scale fixed only with "
                          "use_rslora false (rsLoRA scales by alpha/sqrt(rank))")
    ratio = params.lora.alpha / params.lora.r
    return [*(("lora_alpha_fixed", {"lora.rank": r, "lora.alpha": params.lora.alpha}) for r in ranks),
            *(("lora_alpha_over_rank", {"lora.rank": r, "lora.alpha": r * ratio}) for r in ranks),
            ("full", {})]


def logits_of(model: torch.nn.Module, data: dict[str, Any], backend: str) -> dict[str, torch.Tensor]:
    """``model``'s logits on the validation and the test images."""
    return {split: require_finite(predict(model, data[split][0], backend), RESULT) for split in ("validation", "test")}


def scores(logits: dict[str, torch.Tensor], data: dict[str, Any], digit: int) -> dict[str, Any]:
    """Per split: the target digit's errors, the other digits' errors and accuracy."""
    found = {}
    for split, split_logits in logits.items():
        summary = summarize(data[split][1], split_logits)
        on_digit = summary["errors_per_digit"][digit]
        found[split] = {"digit_errors": on_digit, "other_errors": summary["errors"] - on_digit, "accuracy": summary["accuracy"]}
    return found


def run(defaults: Params, args: list[str]) -> dict[str, Any]:
    raw, chosen = load_raw(), grid(args)
    points = [(method, {**overrides, "finetune.lr": lr}) for lr in chosen["finetune.lr"]
              for method, overrides in methods(defaults, chosen["lora.rank"])]
    checked = [(method, overrides, with_overrides(raw, overrides)) for method, overrides in points]  # all before any work
    device, backend = resolve_device(defaults.device), defaults.backend
    data = {split: load_data("learning_rates", defaults, split, training=split == "train")
            for split in ("train", "validation", "test")}
    base = load_base_model(defaults, device)
    base_logits = logits_of(base, data, backend)
    digit = chosen_digit(defaults.finetune.digit, summarize(data["validation"][1], base_logits["validation"])["errors_per_digit"])
    base_scores = scores(base_logits, data, digit)
    sha_before = base_weights_sha256(base)

    rows = []
    for method, overrides, params in checked:
        model = copy.deepcopy(base)
        if method != "full":
            add_adapter(params, model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        losses = train_on_digit(params, model, *data["train"], digit,
                                optimizer=make_optimizer(trainable, params.finetune.lr, backend))
        if method != "full":  # the frozen base is unchanged and LoRA off gives its logits bit for bit
            check_integrity(model, data["test"][0], base_logits["test"], {"before fine-tuning": sha_before}, backend)
        rows.append({"method": method, "rank": params.lora.r if method != "full" else None,
                     "alpha": params.lora.alpha if method != "full" else None, "lr": params.finetune.lr,
                     "trainable_parameters": trainable_parameters(model)[0],
                     "loss_last_10": round(float(losses[-10:].mean()), 6), **scores(logits_of(model, data, backend), data, digit)})
        print(f"learning_rates {method} {overrides}: validation digit errors {base_scores['validation']['digit_errors']} -> "
              f"{rows[-1]['validation']['digit_errors']}, other digits {base_scores['validation']['other_errors']} -> "
              f"{rows[-1]['validation']['other_errors']}")
    result = {"digit": digit, "steps": defaults.finetune.steps, "seed": defaults.seed, "alpha_fixed": defaults.lora.alpha,
              "alpha_over_rank": defaults.lora.alpha / defaults.lora.r, "base": base_scores, "points": rows}
    write_json(RESULT, result)
    return result


def main() -> None:
    run_stage(lambda params: run(params, sys.argv[1:]), LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main()
