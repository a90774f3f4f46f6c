"""Many adapters on one base: routing rules that pick an adapter per image from the base model's own
predictions (never the label), norm-matched random adapters and random routings as the controls, and a learned
weighting of the adapters in the style of LoraHub (gradient-free, on held-out images)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lora import adapter_per_row, lora_layers

from .backend import evaluation_forward


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
