"""Which images each training step sees: seeded batch orders and the fine-tuning selection."""
from __future__ import annotations

import torch


def batch_order(num_samples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: a fresh seeded permutation each epoch, last batch may be short."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        permutation = torch.randperm(num_samples, generator=generator)
        batches.extend(permutation.split(batch_size))
    return batches[:steps]


def finetune_selection(labels: torch.Tensor, digit: int, replay_fraction: float, seed: int) -> torch.Tensor:
    """Indices of the fine-tuning set: every image of ``digit``, plus images of the other digits drawn
    without replacement (seeded) so that they make up ``replay_fraction`` of the set (0: digit only)."""
    if not 0 <= replay_fraction < 1:
        raise ValueError(f"replay_fraction={replay_fraction!r} is invalid: a number in [0, 1) is allowed")
    target = (labels == digit).nonzero().flatten()
    if replay_fraction == 0:
        return target
    others = (labels != digit).nonzero().flatten()
    count = min(round(len(target) * replay_fraction / (1 - replay_fraction)), len(others))
    drawn = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:count]]
    return torch.cat([target, drawn]).sort().values
