"""Experiment stage compose: can one base plus the ten per-digit adapters beat the base on every digit?

    python -m stages.compose

(a) Combination: the ten adapters of experiments/models/digit_adapters/ made into one by each of
    lora_mnist.compose's COMBINATIONS, at each weighting (every adapter 1, every adapter 1/10, or by the base's errors per digit).
(b) Routing: each image gets the adapter of the digit the base model predicts, or of the likelier of its
    top two whose adapter is more confident.
(c) Controls: the base; the best single adapter; DRAWS sets of ten random adapters with each adapter's per-layer
    norms, combined and routed in every way above; DRAWS random routings and weightings; the replay sweep's adapter
    with the best validation accuracy.
Weights and choices come from the validation images (held out of training); the test set is only scored. The
frozen base is checked as the evaluate stage checks it. Writes experiments/results/compose.json.
"""
# ruff: noqa: E402  (the CPU pins go in before torch loads)
from lora_mnist.reproducible import pin_cpu_arithmetic

if __name__ == "__main__":
    pin_cpu_arithmetic()

import json
from pathlib import Path
from typing import Any

import torch

from lora import base_weights_sha256, load_adapter, set_adapter
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.cli import run_stage
from lora_mnist.compose import (Scorer, add_random_like, draws_and_learned_weights, multiply_adds, pool_outputs,
                                random_adapter_draws, saved_bytes, weightings)
from lora_mnist.errors import DataError
from lora_mnist.integrity import check_integrity
from lora_mnist.io import write_json
from lora_mnist.metrics import per_digit, predict, summarize
from lora_mnist.params import Params
from lora_mnist.paths import EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from lora_mnist.train import resolve_device

DIGITS = range(10)
DRAWS = 20  # random routings and random weightings: a control that can win needs a distribution
ADAPTERS = EXPERIMENT_MODELS / "digit_adapters"
REPLAY_SWEEP = "replay_sweep"  # experiments/dvc.yaml's group: its adapters and their results
RESULT = EXPERIMENT_RESULTS / "compose.json"


def best_replay_adapter() -> Path:
    """The replay sweep's adapter with the best overall validation accuracy with LoRA on at scale 1 (the lower
    replay fraction on a tie), chosen without the test set."""
    found = EXPERIMENT_RESULTS / REPLAY_SWEEP
    try:
        results = [json.loads(path.read_text()) for path in sorted(found.glob("*.json"))]
        ranked = [(next(p["accuracy"] for p in r["validation"]["scale_curve"] if p["scale"] == 1.0), -r["replay_fraction"],
                   r["name"]) for r in results]
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as exc:
        raise DataError(f"{found}: a result cannot be read ({type(exc).__name__}: {exc}); `dvc repro "
                        f"experiments/dvc.yaml:{REPLAY_SWEEP}` rebuilds them") from None
    if not ranked:
        raise DataError(f"{found}: no results; `dvc repro experiments/dvc.yaml:{REPLAY_SWEEP}` makes them")
    return EXPERIMENT_MODELS / REPLAY_SWEEP / max(ranked)[2]


def run(params: Params) -> dict[str, Any]:
    """Score every variant on the test set, check the frozen base, write experiments/results/compose.json."""
    device, backend = resolve_device(params.device), params.backend
    selection_images, selection_labels = load_data("compose", params, "validation", training=False)
    test_images, test_labels = load_data("compose", params, "test", training=False)
    model = load_base_model(params, device)
    sha_before = base_weights_sha256(model)
    base_test_logits, base_selection_logits = predict(model, test_images, backend), predict(model, selection_images, backend)
    base_test = summarize(test_labels, base_test_logits)
    score = Scorer(base_test, test_labels, selection_labels)

    adapter_of_digit = {d: f"digit-{d}" for d in DIGITS}
    for digit, name in adapter_of_digit.items():
        load_adapter(model, ADAPTERS / f"digit-{digit}", name)
    replay = best_replay_adapter()
    load_adapter(model, replay, "replay")
    generator = torch.Generator().manual_seed(params.seed)
    random_of_digit = {d: f"random-{d}" for d in DIGITS}
    for digit in DIGITS:
        add_random_like(model, adapter_of_digit[digit], random_of_digit[digit], generator)
    file_bytes = {name: saved_bytes(model, name) for name in [*adapter_of_digit.values(), *random_of_digit.values(), "replay"]}

    def one_adapter(name: str, family: str, adapter: str, stored: int) -> dict[str, Any]:
        set_adapter(model, adapter)
        return score(name, family, predict(model, test_images, backend), predict(model, selection_images, backend),
                     stored, multiply_adds(model, [adapter]))

    base_macs = multiply_adds(model, [])
    variants = [score("base model", "control", base_test_logits, base_selection_logits, 0, base_macs)]
    singles = [one_adapter(f"adapter {d} alone", "single", adapter_of_digit[d], file_bytes[adapter_of_digit[d]])
               for d in DIGITS]
    best = max(singles, key=lambda v: v["selection_accuracy"])
    variants.append({**best, "name": f"best single ({best['name']}, chosen on validation)", "family": "control"})
    variants.append(one_adapter(f"replay adapter ({replay.name}, chosen on validation)", "control", "replay", file_bytes["replay"]))

    weights_by_name = weightings(summarize(selection_labels, base_selection_logits)["errors_per_digit"])
    splits = {"test": test_images, "selection": selection_images}
    base_logits = {"test": base_test_logits, "selection": base_selection_logits}
    accuracy_of: dict[str, dict[str, float]] = {}
    for pool, prefix in ((adapter_of_digit, ""), (random_of_digit, "random ")):
        for name, output in pool_outputs(model, pool, weights_by_name, base_logits, splits, backend, file_bytes).items():
            family = ("routing" if name.startswith("route") else "combination") if not prefix else "control: random adapters"
            variants.append(score(prefix + name, family, output["logits"]["test"], output["logits"]["selection"],
                                  output["stored"], output["macs"]))
            accuracy_of.setdefault(prefix, {})[name] = variants[-1]["accuracy"]

    controls = draws_and_learned_weights(model, adapter_of_digit, variants, (selection_images, selection_labels),
                                         (test_images, test_labels), params.seed, backend, DRAWS)
    controls["random_adapters"] = random_adapter_draws(model, adapter_of_digit, accuracy_of["random "], accuracy_of[""],
                                                       weights_by_name, base_test_logits, (test_images, test_labels),
                                                       generator, backend, DRAWS)
    check_integrity(model, test_images, base_test_logits, {"before composing": sha_before}, backend)
    result = {
        "name": "compose",
        "adapters": [str(ADAPTERS / f"digit-{d}") for d in DIGITS],
        "selection": f"the {len(selection_labels):,} validation images (held out of every training run)",
        "base": {"accuracy": base_test["accuracy"], "errors_per_digit": per_digit(base_test["errors_per_digit"])},
        "variants": variants,
        "controls": controls,
    }
    write_json(RESULT, result)
    closest = min((v for v in variants if v["family"] in ("combination", "routing")),
                  key=lambda v: (v["digits_worse"], -v["accuracy"]))
    print(f"compose: {len(variants)} variants; base accuracy {base_test['accuracy']:.4f}; closest to the base on every "
          f"digit: {closest['name']} ({closest['digits_worse']} digits worse, accuracy {closest['accuracy']:.4f}); "
          "integrity check passed")
    return result


def main() -> None:
    run_stage(run)


if __name__ == "__main__":
    main()
