"""Experiment stage compose: can one base plus the ten per-digit adapters beat the base on every digit?

    python -m stages.compose

(a) Combination: the ten adapters of experiments/models/digit_adapters/ made into one by each of
    COMBINATIONS, at each weighting (every adapter 1, every adapter 1/10, or by the base's errors per digit).
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
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora import add_weighted_adapter, base_weights_sha256, delete_adapter, load_adapter, save_adapter, set_adapter
from lora.save_load import WEIGHTS_NAME
from lora_mnist.compose import (add_random_like, multiply_adds, predict_per_row, route_at_random, route_by_confidence,
                                route_by_prediction, search_weights)
from lora_mnist.integrity import check_integrity, require_finite
from lora_mnist.io import write_json
from lora_mnist.metrics import per_digit, predict, summarize
from lora_mnist.artifacts import load_base_model, load_data
from lora_mnist.errors import DataError
from lora_mnist.cli import run_stage
from lora_mnist.params import Params
from lora_mnist.paths import EXPERIMENT_MODELS, EXPERIMENT_RESULTS
from lora_mnist.stats import percentile_rank
from lora_mnist.train import resolve_device

DIGITS = range(10)
DRAWS = 20  # random routings and random weightings: a control that can win needs a distribution
ADAPTERS = EXPERIMENT_MODELS / "digit_adapters"
REPLAY_SWEEP = "replay_sweep"  # experiments/dvc.yaml's group: its adapters and their results
RESULT = EXPERIMENT_RESULTS / "compose.json"
# combination type -> its options (PEFT's names); svd keeps PEFT's default rank, the adapters' own (1)
COMBINATIONS: dict[str, dict[str, Any]] = {
    "linear": {}, "cat": {}, "svd": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0},
}


def weightings(selection_errors: list[int]) -> dict[str, list[float]]:
    """The weights each combination is tried at; the last favours the digits the base gets wrong most."""
    most = max(max(selection_errors), 1)
    return {"each 1": [1.0] * 10, "each 1/10": [0.1] * 10,
            "by base errors": [round(errors / most, 6) for errors in selection_errors]}


class Scorer:
    """Scores logits on the test set and on the selection images, against the base model."""

    def __init__(self, base_test: dict[str, Any], test_labels: torch.Tensor, selection_labels: torch.Tensor) -> None:
        self.base_test, self.test_labels, self.selection_labels = base_test, test_labels, selection_labels

    def __call__(self, name: str, family: str, test_logits: torch.Tensor, selection_logits: torch.Tensor,
                 stored_bytes: int, multiply_adds_per_image: int) -> dict[str, Any]:
        test = summarize(self.test_labels, require_finite(test_logits, name))
        base = self.base_test["errors_per_digit"]
        return {
            "name": name,
            "family": family,
            "accuracy": test["accuracy"],
            "errors_per_digit": per_digit(test["errors_per_digit"]),
            "digits_worse": sum(e > b for e, b in zip(test["errors_per_digit"], base)),
            "digits_better": sum(e < b for e, b in zip(test["errors_per_digit"], base)),
            "selection_accuracy": summarize(self.selection_labels, selection_logits)["accuracy"],
            "stored_bytes": stored_bytes,
            "multiply_adds_per_image": multiply_adds_per_image,
        }


def best_replay_adapter() -> Path:
    """The replay sweep's adapter with the best overall validation accuracy with LoRA on (scale 1), the lower
    replay fraction on a tie: the forgetting frontier's strongest point, chosen without the test set."""
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


def saved_bytes(model: torch.nn.Module, adapter: str) -> int:
    """The size of ``adapter``'s weights file as save_adapter writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter", adapter)
        return (Path(tmp) / "adapter" / WEIGHTS_NAME).stat().st_size


def pool_outputs(model: torch.nn.Module, pool: dict[int, str], weights_by_name: dict[str, list[float]],
                 base_logits: dict[str, torch.Tensor], images: dict[str, torch.Tensor], backend: str,
                 file_bytes: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Every combination at every weighting, and both routing rules, of the ten adapters in ``pool``: by name, the
    logits on each split of ``images`` and, given ``file_bytes`` (each pool adapter's weights-file size), the bytes
    stored beside the base and the multiply-adds per image (the random draws need logits alone)."""
    outputs = {}
    for combination, options in COMBINATIONS.items():
        for weighting, weights in weights_by_name.items():
            add_weighted_adapter(model, list(pool.values()), weights, "combined", combination, **options)
            set_adapter(model, "combined")
            output = {"logits": {split: predict(model, x, backend) for split, x in images.items()}}
            if file_bytes is not None:
                output.update(stored=saved_bytes(model, "combined"), macs=multiply_adds(model, ["combined"]))
            outputs[f"{combination}, {weighting}"] = output
            delete_adapter(model, "combined")
    outputs["route to the base's prediction"] = {  # the base's forward picks the adapter
        "logits": {split: predict_per_row(model, x, route_by_prediction(base_logits[split], pool), backend) for split, x in images.items()}}
    outputs["route by confidence, top 2"] = {
        "logits": {split: route_by_confidence(model, x, base_logits[split], pool, backend) for split, x in images.items()}}
    if file_bytes is not None:
        routed_bytes = sum(file_bytes[adapter] for adapter in pool.values())
        base_macs, one_macs = multiply_adds(model, []), multiply_adds(model, [pool[0]])
        outputs["route to the base's prediction"].update(stored=routed_bytes, macs=base_macs + one_macs)
        outputs["route by confidence, top 2"].update(stored=routed_bytes, macs=base_macs + 2 * one_macs)
    return outputs


def random_adapter_draws(model: torch.nn.Module, adapter_of_digit: dict[int, str], first_draw: dict[str, float],
                         real: dict[str, float], weights_by_name: dict[str, list[float]], base_test_logits: torch.Tensor,
                         test: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, backend: str) -> dict[str, Any]:
    """DRAWS sets of ten norm-matched random adapters (the first is the table's), each combined and routed as the real
    ten: per variant, the draws' test accuracies and where the real variant's falls among them."""
    accuracies = {name: [accuracy] for name, accuracy in first_draw.items()}
    pool = {d: f"draw-{d}" for d in DIGITS}
    for _ in range(DRAWS - 1):
        for digit in DIGITS:
            add_random_like(model, adapter_of_digit[digit], pool[digit], generator)
        for name, output in pool_outputs(model, pool, weights_by_name, {"test": base_test_logits}, {"test": test[0]}, backend).items():
            accuracies[name].append(summarize(test[1], require_finite(output["logits"]["test"], f"random {name}"))["accuracy"])
        for adapter in pool.values():
            delete_adapter(model, adapter)
    return {name: {"accuracy": real[name], "random_accuracy": draws, "percentile": percentile_rank(real[name], draws)}
            for name, draws in accuracies.items()}


def draws_and_learned_weights(model: torch.nn.Module, pool: dict[int, str], variants: list[dict[str, Any]],
                              selection: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                              seed: int, backend: str) -> dict[str, Any]:
    """DRAWS random routings and DRAWS random weightings of the ten adapters, and the weighting learned on validation
    (LoraHub-style), each scored on test: where the real routing and the learned weights fall among the draws."""
    generator = torch.Generator().manual_seed(seed)

    def linear_summary(weights: list[float], images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        add_weighted_adapter(model, list(pool.values()), weights, "weighted", "linear")
        set_adapter(model, "weighted")
        summary = summarize(labels, require_finite(predict(model, images, backend), "weighted"))
        delete_adapter(model, "weighted")
        return summary

    def linear_accuracy(weights: list[float], images: torch.Tensor, labels: torch.Tensor) -> float:
        return linear_summary(weights, images, labels)["accuracy"]

    routings = [summarize(test[1], predict_per_row(model, test[0], route_at_random(len(test[1]), pool, generator), backend))["accuracy"]
                for _ in range(DRAWS)]
    weightings = [linear_accuracy(torch.rand(len(pool), generator=generator).tolist(), *test) for _ in range(DRAWS)]
    learned, validation_accuracy = search_weights(lambda w: linear_accuracy(w, *selection), len(pool), generator)
    learned_test = linear_summary(learned, *test)
    routed = next(v["accuracy"] for v in variants if v["name"] == "route to the base's prediction")
    return {
        "draws": DRAWS,
        "random_routing_accuracy": routings, "routing_accuracy": routed,
        "routing_percentile": percentile_rank(routed, routings),
        "random_weights_accuracy": weightings,
        "learned_weights": learned, "learned_validation_accuracy": validation_accuracy,
        "learned_accuracy": learned_test["accuracy"], "learned_errors_per_digit": per_digit(learned_test["errors_per_digit"]),
        "learned_percentile": percentile_rank(learned_test["accuracy"], weightings),
    }


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
                                         (test_images, test_labels), params.seed, backend)
    controls["random_adapters"] = random_adapter_draws(model, adapter_of_digit, accuracy_of["random "], accuracy_of[""],
                                                       weights_by_name, base_test_logits, (test_images, test_labels),
                                                       generator, backend)
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
