"""Experiment stage trial: one group of LoRA fine-tunings, every point of a grid of params overrides, in one process.

    python -m stages.trial GROUP TEMPLATE [--pretrain] key=v1,v2 ...
    python -m stages.trial rank_sweep r{rank}-a{alpha} lora.rank=1,2,4 lora.alpha=1,4

The stages of experiments/dvc.yaml run this. Each point trains an adapter exactly as the finetune stage would with
its overrides applied (`finetune.digit: auto` picks the base model's worst digit on validation), checks the frozen
base as evaluate does, and scores the adapter at inference scales 0 to 1 on validation (where choices are made)
and on test (where they are reported), with McNemar's test of LoRA on against off on the test images. With
--pretrain a point first trains its own base model (the seeds), else it uses models/base.safetensors. The group's
adapters go to experiments/models/GROUP/, its results to experiments/results/GROUP/<name>.json (TEMPLATE names a
point by the last part of each key), each directory renamed in whole once every point is done.
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import argparse
import json
import re
from pathlib import Path
from typing import Any

from lora import AdapterLoadError, LoRAConfigError, save_adapter, set_inference_scale, trainable_parameters
from lora.save_load import WEIGHTS_NAME
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.finetuning import fine_tune_checked
from lora_mnist.integrity import require_finite
from lora_mnist.io import save_tensors, staged_outputs
from lora_mnist.metrics import chosen_digit, per_digit, predict, summarize
from lora_mnist.params import Params, ParamsError, grid_points, load_raw, parse_grid, with_overrides
from lora_mnist.paths import BASE_WEIGHTS, EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from lora_mnist.pretraining import pretrain_model
from lora_mnist.scoring import mcnemar_on_vs_off
from lora_mnist.train import resolve_device

SCALES = [round(0.1 * i, 1) for i in range(11)]  # inference scales of the adapter: the no-retraining lever
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def points(template: str, grid: list[str]) -> dict[str, dict[str, Any]]:
    """The grid's points by name: ``r{rank}`` with ``lora.rank=1,2`` gives ``{"r1": {"lora.rank": 1}, ...}``."""
    found = {}
    for point in grid_points(parse_grid(grid)):
        try:
            name = template.format(**{key.rsplit(".", 1)[-1]: value for key, value in point.items()})
        except (KeyError, IndexError, ValueError) as exc:
            raise ParamsError(f"template {template!r} is invalid for keys {list(point)} ({exc})") from None
        if not NAME.fullmatch(name) or name in found:
            raise ParamsError(f"template {template!r} gives {name!r}: one plain file name per point is allowed")
        found[name] = point
    return found


def trial(params: Params, name: str, pretrain: bool, data: dict[str, Any], out: Path) -> dict[str, Any]:
    """One point: its adapter (and base, with ``pretrain``) written under ``out``; returns its result."""
    device, backend, config = resolve_device(params.device), params.backend, params.lora
    images, labels = data["train"]
    if pretrain:
        model, _, _ = pretrain_model(params, device, images, labels)
        base_file = out / f"{name}.base.safetensors"
        save_tensors(base_file, model.state_dict())
    else:
        model, base_file = load_base_model(params, device), BASE_WEIGHTS
    base_logits = {split: predict(model, data[split][0], backend) for split in ("validation", "test")}
    base = {split: summarize(data[split][1], base_logits[split]) for split in base_logits}
    digit = chosen_digit(params.finetune.digit, base["validation"]["errors_per_digit"])

    losses, sha_before = fine_tune_checked(params, model, (images, labels), digit, data["test"][0], base_logits["test"])
    trainable, total = trainable_parameters(model)
    save_adapter(model, out / name, info={"digit": digit, "trial": name, "base_weights_sha256_before": sha_before})

    curves: dict[str, list[dict[str, Any]]] = {"validation": [], "test": []}
    for scale in SCALES:
        set_inference_scale(model, scale)
        for split in curves:
            logits = require_finite(predict(model, data[split][0], backend), out / name)
            summary = summarize(data[split][1], logits)
            curves[split].append({"scale": scale, "accuracy": summary["accuracy"],
                                  "errors_per_digit": per_digit(summary["errors_per_digit"])})
            if split == "test" and scale == 1:
                on_test_logits = logits  # LoRA on as trained
    paired = mcnemar_on_vs_off(data["test"][1], base_logits["test"], on_test_logits)
    return {
        "name": name, "seed": params.seed, "digit": digit, "rank": config.r, "alpha": config.alpha,
        "scaling": config.scaling, "replay_fraction": params.finetune.replay_fraction, "steps": params.finetune.steps,
        "pretrain_epochs": params.pretrain.epochs, "pretrained_here": pretrain,
        "trainable_parameters": trainable, "base_parameters": total - trainable,
        "adapter_file_bytes": (out / name / WEIGHTS_NAME).stat().st_size, "base_file_bytes": base_file.stat().st_size,
        "loss_first_10": round(float(losses[:10].mean()), 6), "loss_last_10": round(float(losses[-10:].mean()), 6),
        "base": {"accuracy": base["test"]["accuracy"], "errors_per_digit": per_digit(base["test"]["errors_per_digit"])},
        "lora_on": curves["test"][-1], "scale_curve": curves["test"],
        "mcnemar_on_vs_off": paired,
        "validation": {"base": {"accuracy": base["validation"]["accuracy"],
                                "errors_per_digit": per_digit(base["validation"]["errors_per_digit"])},
                       "scale_curve": curves["validation"]},
    }


def run(group: str, template: str, grid: list[str], pretrain: bool) -> dict[str, dict[str, Any]]:
    if not NAME.fullmatch(group):
        raise ParamsError(f"group {group!r} is invalid: letters, digits, '-', '_' and '.' are allowed")
    raw, named = load_raw(), points(template, grid)
    chosen = {name: with_overrides(raw, point) for name, point in named.items()}  # every point checked first
    first = next(iter(chosen.values()))
    data = {split: load_data(f"trial {group}", first, split, training=split == "train") for split in ("train", "validation", "test")}
    results = {}
    with staged_outputs() as outputs:
        models, found = outputs.directory(EXPERIMENT_MODELS / group), outputs.directory(EXPERIMENT_RESULTS / group)
        for name, params in chosen.items():
            result = results[name] = {"group": group, "overrides": named[name], **trial(params, name, pretrain, data, models)}
            (found / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            print(f"trial {group}/{name}: digit {result['digit']}, test accuracy {result['base']['accuracy']:.4f} -> "
                  f"{result['lora_on']['accuracy']:.4f} (McNemar p {result['mcnemar_on_vs_off']['p_value']:.3g}); "
                  "integrity check passed")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.trial", description=__doc__.splitlines()[0])
    parser.add_argument("group", help="experiments/results/GROUP/ and experiments/models/GROUP/")
    parser.add_argument("template", help="each point's name, from the last part of its keys: r{rank}-a{alpha}")
    parser.add_argument("--pretrain", action="store_true", help="train each point's own base model first")
    parser.add_argument("grid", nargs="+", metavar="key=v1,v2", help="params.yaml keys and their values, e.g. lora.rank=1,2")
    args = parser.parse_intermixed_args(argv)  # --pretrain may come anywhere
    run_stage(lambda params: run(args.group, args.template, args.grid, args.pretrain), LoRAConfigError, AdapterLoadError)


if __name__ == "__main__":
    main()
