"""Many adapters on one base, for the compose experiment (stages/compose.py): the adapters combined into one
(COMBINATIONS at each weighting) or routed per image from the base model's own predictions (never the label),
each variant scored against the base; the controls (norm-matched random adapters, random routings and
weightings, drawn many times); and a learned weighting in the style of LoraHub (gradient-free, on held-out
images)."""
from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora import add_weighted_adapter, adapter_per_row, delete_adapter, lora_layers, save_adapter, set_adapter
from lora.save_load import WEIGHTS_NAME

from .backend import evaluation_forward
from .integrity import require_finite
from .metrics import per_digit, predict, summarize
from .stats import percentile_rank

# combination type -> its options (PEFT's names); svd keeps PEFT's default rank, the adapters' own (1)
COMBINATIONS: dict[str, dict[str, Any]] = {
    "linear": {}, "cat": {}, "svd": {}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5, "seed": 0},
}


def add_random_like(model: nn.Module, adapter: str, name: str, generator: torch.Generator) -> None:
    """Add adapter ``name``: random A and B with, layer by layer, the Frobenius norms of ``adapter``'s."""
    for layer in lora_layers(model).values():
        if adapter in layer.lora_A:
            layer.add_adapter(name, layer.configs[adapter])
            with torch.no_grad():
                for table in (layer.lora_A, layer.lora_B):
                    like = table[adapter].weight
                    drawn = torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)
                    table[name].weight.copy_(drawn * (like.norm() / drawn.norm()))


def route_by_prediction(base_logits: torch.Tensor, adapter_of_digit: dict[int, str], place: int = 0) -> list[str]:
    """For each image, the adapter of the digit the base model ranks at ``place`` (0: its prediction)."""
    digits = base_logits.topk(place + 1, dim=1).indices[:, place]
    return [adapter_of_digit[int(d)] for d in digits]


@torch.inference_mode()
def predict_per_row(model: nn.Module, images: torch.Tensor, names: list[str], backend: str,
                    batch_size: int = 2500) -> torch.Tensor:
    """Logits with image i run through adapter ``names[i]``, in batches on the model's device, returned on CPU."""
    device = next(model.parameters()).device
    model.eval()
    logits = []
    for start in range(0, images.shape[0], batch_size):
        with adapter_per_row(model, names[start:start + batch_size]):
            logits.append(evaluation_forward(model, images[start:start + batch_size].to(device), backend).cpu())
    return torch.cat(logits)


def route_by_confidence(model: nn.Module, images: torch.Tensor, base_logits: torch.Tensor,
                        adapter_of_digit: dict[int, str], backend: str) -> torch.Tensor:
    """The adapters of the base model's two likeliest digits each classify the image; the one whose top
    softmax probability is higher decides (three forwards per image)."""
    first = predict_per_row(model, images, route_by_prediction(base_logits, adapter_of_digit, 0), backend)
    second = predict_per_row(model, images, route_by_prediction(base_logits, adapter_of_digit, 1), backend)
    second_wins = second.softmax(dim=1).amax(dim=1) > first.softmax(dim=1).amax(dim=1)
    return torch.where(second_wins[:, None], second, first)


def multiply_adds(model: nn.Module, adapters: list[str]) -> int:
    """Multiply-adds per image of one forward through the base layers plus ``adapters``' A and B."""
    total = 0
    for layer in lora_layers(model).values():
        total += layer.in_features * layer.out_features
        total += sum(layer.lora_A[a].out_features * (layer.in_features + layer.out_features)
                     for a in adapters if a in layer.lora_A)
    return total


def route_at_random(count: int, adapter_of_digit: dict[int, str], generator: torch.Generator) -> list[str]:
    """The control of a routing rule: each image gets an adapter drawn uniformly, whatever the base predicts."""
    digits = torch.randint(0, len(adapter_of_digit), (count,), generator=generator)
    return [adapter_of_digit[int(d)] for d in digits]


def search_weights(score: Callable[[list[float]], float], count: int, generator: torch.Generator,
                   steps: int = 30, step_size: float = 0.2) -> tuple[list[float], float]:
    """LoraHub's learned weighting, gradient-free: a (1+1) evolution strategy from equal weights 1/count, keeping a
    Gaussian step of the weights only when ``score`` (accuracy on held-out images) does not drop."""
    best = [1.0 / count] * count
    best_score = score(best)
    for _ in range(steps):
        candidate = [round(w + step_size * float(torch.randn((), generator=generator)), 6) for w in best]
        if (candidate_score := score(candidate)) >= best_score:
            best, best_score = candidate, candidate_score
    return best, best_score


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
                         test: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator, backend: str,
                         draws: int) -> dict[str, Any]:
    """``draws`` sets of ten norm-matched random adapters (the first is the table's), each combined and routed as the real
    ten: per variant, the draws' test accuracies and where the real variant's falls among them."""
    accuracies = {name: [accuracy] for name, accuracy in first_draw.items()}
    pool = {d: f"draw-{d}" for d in adapter_of_digit}
    for _ in range(draws - 1):
        for digit in adapter_of_digit:
            add_random_like(model, adapter_of_digit[digit], pool[digit], generator)
        for name, output in pool_outputs(model, pool, weights_by_name, {"test": base_test_logits}, {"test": test[0]}, backend).items():
            accuracies[name].append(summarize(test[1], require_finite(output["logits"]["test"], f"random {name}"))["accuracy"])
        for adapter in pool.values():
            delete_adapter(model, adapter)
    return {name: {"accuracy": real[name], "random_accuracy": drawn, "percentile": percentile_rank(real[name], drawn)}
            for name, drawn in accuracies.items()}


def draws_and_learned_weights(model: torch.nn.Module, pool: dict[int, str], variants: list[dict[str, Any]],
                              selection: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                              seed: int, backend: str, draws: int) -> dict[str, Any]:
    """``draws`` random routings and ``draws`` random weightings of the ten adapters, and the weighting learned on validation
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
                for _ in range(draws)]
    weightings = [linear_accuracy(torch.rand(len(pool), generator=generator).tolist(), *test) for _ in range(draws)]
    learned, validation_accuracy = search_weights(lambda w: linear_accuracy(w, *selection), len(pool), generator)
    learned_test = linear_summary(learned, *test)
    routed = next(v["accuracy"] for v in variants if v["name"] == "route to the base's prediction")
    return {
        "draws": draws,
        "random_routing_accuracy": routings, "routing_accuracy": routed,
        "routing_percentile": percentile_rank(routed, routings),
        "random_weights_accuracy": weightings,
        "learned_weights": learned, "learned_validation_accuracy": validation_accuracy,
        "learned_accuracy": learned_test["accuracy"], "learned_errors_per_digit": per_digit(learned_test["errors_per_digit"]),
        "learned_percentile": percentile_rank(learned_test["accuracy"], weightings),
    }
