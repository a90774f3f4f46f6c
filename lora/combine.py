"""Combine adapters into a new one, as PEFT's ``add_weighted_adapter`` does, with the same ΔW per layer.

Without SVD (linear, ties, dare_linear, dare_ties, magnitude_prune) the A and B matrices are combined apart,
each adapter's weight·scaling split as a square root between them (the sign on A): cheap, but ΔW is not the
weighted sum of the ΔWs. ``cat`` stacks the scaled A's and the B's, which gives exactly Σ wᵢ·ΔWᵢ (without
rsLoRA) at the sum of the ranks. The ``*svd`` types combine the ΔWs themselves and keep the top ``svd_rank`` singular directions.
TIES (Yadav et al. 2023) keeps each tensor's largest ``density`` share and elects one sign per entry; DARE
(Yu et al. 2023) keeps a random ``density`` share, rescaled by 1/density.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from .config import is_finite_number, is_integer
from .layer import LoRALinear
from .model import adapters_of, lora_layers

# combination type -> (how each tensor is pruned, whether one sign is elected per entry, whether on ΔW + SVD)
COMBINATION_TYPES = {
    "linear": (None, False, False),
    "ties": ("magnitude", True, False),
    "dare_linear": ("random", False, False),
    "dare_ties": ("random", True, False),
    "magnitude_prune": ("magnitude", False, False),
    "svd": (None, False, True),
    "ties_svd": ("magnitude", True, True),
    "dare_linear_svd": ("random", False, True),
    "dare_ties_svd": ("random", True, True),
    "magnitude_prune_svd": ("magnitude", False, True),
    "cat": (None, False, False),
}
SIGN_METHODS = ("total", "frequency")


def add_weighted_adapter(
    model: nn.Module,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    seed: int | None = None,
) -> None:
    """Add adapter ``adapter_name``, the combination of ``adapters`` with ``weights``, to every layer one of them
    adapts. Its r is the adapters' (linear and the pruning types need one r), their sum (cat) or ``svd_rank``
    (default: the largest); alpha = r without rsLoRA, so its scaling is 1 (the sources' scalings are folded into
    its weights), and the other settings are the first adapter's, as in PEFT (>= 0.22). DARE's masks are drawn on
    the CPU from ``seed``, else from torch's global generator. The active adapter stays; everything is checked
    before any layer changes."""
    rank = _check(model, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method)
    if len(adapters) == 1:  # as in PEFT: one adapter can only be rescaled
        combination_type = "linear"
    prune, elect_sign, on_delta = COMBINATION_TYPES[combination_type]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = {name: layer for name, layer in lora_layers(model).items() if any(a in layer.lora_A for a in adapters)}
    first = next(layer.configs[adapters[0]] for layer in layers.values() if adapters[0] in layer.configs)
    config = replace(first, r=rank, alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={},
                     target_modules=tuple(sorted({t for layer in layers.values() for a in adapters if a in layer.configs
                                                  for t in layer.configs[a].target_modules})))
    combined = {}
    with torch.no_grad():
        for module_name, layer in layers.items():
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
            if combination_type == "cat":
                combined[module_name] = _cat(layer, present, rank)
            elif on_delta:
                deltas = [layer.lora_B[a].weight @ layer.lora_A[a].weight * layer.scaling[a] for a, _ in present]
                delta = _combine(deltas, [w for _, w in present], prune, elect_sign, density, majority_sign_method, generator)
                combined[module_name] = _svd_factors(delta, rank)
            else:
                ranks = {layer.lora_A[a].out_features for a, _ in present}
                if len(ranks) != 1:
                    raise ValueError(f"{combination_type} combines A and B matrices of one shape, but on {module_name} "
                                     f"the adapters' ranks are {sorted(ranks)}; cat or svd is allowed")
                scaled = [w * layer.scaling[a] for a, w in present]
                a_weights = [math.copysign(math.sqrt(abs(s)), s) for s in scaled]  # the sign on A only
                b_weights = [math.sqrt(abs(s)) for s in scaled]
                combined[module_name] = _padded(
                    _combine([layer.lora_A[a].weight for a, _ in present], a_weights, prune, elect_sign, density,
                             majority_sign_method, generator),
                    _combine([layer.lora_B[a].weight for a, _ in present], b_weights, prune, elect_sign, density,
                             majority_sign_method, generator), rank)
        for layer in layers.values():
            layer.check_adapter(adapter_name, config)
        for module_name, (lora_a, lora_b) in combined.items():
            layer = layers[module_name]
            layer.add_adapter(adapter_name, config)
            layer.lora_A[adapter_name].weight.copy_(lora_a)
            layer.lora_B[adapter_name].weight.copy_(lora_b)
            layer.lora_A[adapter_name].weight.requires_grad_(False)  # as PEFT: a combined adapter is not trained
            layer.lora_B[adapter_name].weight.requires_grad_(False)


def _check(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str,
           svd_rank: int | None, density: float | None, majority_sign_method: str) -> int:
    """Raise on anything PEFT would refuse or compute wrongly; return the new adapter's r."""
    present = adapters_of(model)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is invalid: one of {sorted(COMBINATION_TYPES)} is allowed")
    if isinstance(adapters, str) or not adapters or any(a not in present for a in adapters):
        raise KeyError(f"adapters={adapters!r} is invalid: a non-empty list of the model's adapters {sorted(present)} is allowed")
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name in present:
        raise ValueError(f"adapter_name={adapter_name!r} is invalid: a new, non-empty name (present: {sorted(present)}) is allowed")
    if len(weights) != len(adapters) or not all(is_finite_number(w) for w in weights):
        raise ValueError(f"weights={weights!r} is invalid: one finite number per adapter ({len(adapters)}) is allowed")
    kind = "linear" if len(adapters) == 1 else combination_type
    prune, elect_sign, on_delta = COMBINATION_TYPES[kind]
    if prune == "magnitude" and not (is_finite_number(density) and 0 <= density <= 1):
        raise ValueError(f"density={density!r} is invalid: {kind} needs a number in [0, 1], the share of values kept")
    if prune == "random" and not (is_finite_number(density) and 0 < density <= 1):  # DARE rescales by 1/density
        raise ValueError(f"density={density!r} is invalid: {kind} needs a number in (0, 1], the share of values kept")
    if elect_sign and majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method={majority_sign_method!r} is invalid: one of {list(SIGN_METHODS)} is allowed")
    ranks = [_largest_rank(model, a) for a in adapters]
    if kind == "cat":
        return sum(ranks)
    if on_delta:
        if svd_rank is not None and not (is_integer(svd_rank) and svd_rank >= 1):
            raise ValueError(f"svd_rank={svd_rank!r} is invalid: an integer >= 1 is allowed")
        return svd_rank or max(ranks)
    if len(set(ranks)) != 1:
        raise ValueError(f"{kind} combines A and B matrices of one shape: the adapters' ranks {dict(zip(adapters, ranks))} "
                         "differ; cat or svd is allowed")
    return ranks[0]


def _largest_rank(model: nn.Module, adapter: str) -> int:
    """The adapter's r or its rank_pattern's largest, from its config as PEFT takes it (not what its layers hold)."""
    config = next(layer.configs[adapter] for layer in lora_layers(model).values() if adapter in layer.configs)
    return max([config.r, *config.rank_pattern.values()])


def _padded(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B with zero rows and columns up to ``rank`` (a layer whose rank a pattern lowered); B·A is unchanged."""
    padded_a, padded_b = lora_a.new_zeros(rank, lora_a.shape[1]), lora_b.new_zeros(lora_b.shape[0], rank)
    padded_a[: lora_a.shape[0]], padded_b[:, : lora_b.shape[1]] = lora_a, lora_b
    return padded_a, padded_b


def _cat(layer: LoRALinear, present: list[tuple[str, float]], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A's stacked (each times its weight·scaling) and B's side by side, zero-padded to ``rank``."""
    return _padded(torch.cat([layer.lora_A[a].weight * w * layer.scaling[a] for a, w in present], dim=0),
                   torch.cat([layer.lora_B[a].weight for a, _ in present], dim=1), rank)


def _combine(tensors: list[torch.Tensor], weights: list[float], prune: str | None, elect_sign: bool,
             density: float | None, sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """Σ wᵢ·prune(Tᵢ); with ``elect_sign``, entries whose sign disagrees with the elected one are dropped and the
    rest averaged (PEFT's merge_utils, step by step)."""
    if prune:
        tensors = [_pruned(t, density, prune, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    if not elect_sign:
        return weighted.sum(dim=0)
    magnitude = stacked.sum(dim=0) if sign_method == "total" else stacked.sign().sum(dim=0)
    agrees = stacked.sign() == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1.0)


def _pruned(tensor: torch.Tensor, density: float, method: str, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return tensor
    if method == "magnitude":
        mask = torch.zeros_like(tensor).reshape(-1)
        mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
        return tensor * mask.reshape(tensor.shape)
    mask = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype), generator=generator)
    return tensor * mask.to(tensor.device) / density


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the best rank-``rank`` approximation of ``delta`` (B = U·S, A = Vᴴ), zero-padded where
    ``rank`` exceeds the layer's smaller side."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    kept = min(rank, s.shape[0])
    lora_a, lora_b = delta.new_zeros(rank, delta.shape[1]), delta.new_zeros(delta.shape[0], rank)
    lora_a[:kept], lora_b[:, :kept] = vh[:kept, :], u[:, :kept] @ torch.diag(s[:kept])
    return lora_a, lora_b
