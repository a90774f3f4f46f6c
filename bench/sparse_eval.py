"""Benchmark: the hidden layer's product as a sparse (CSR) matrix against the dense one, by share of non-zeros.

    python -m bench.sparse_eval

Times linear2 of the oversized MLP (1000 -> 2000) on a batch of 2500 activations, as lora_mnist.metrics.predict
feeds it, with a given share of non-zeros: dense `F.linear`, and the sparse path (count the non-zeros and
convert to CSR, as `lora_mnist.fast.sparse.sparse_if_mostly_zero` does, then the product). The crossing point is where
lora_mnist.fast.sparse.SPARSE_DENSITY belongs; the last row is the trained base model's real activations on the test set.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from bench.pipeline import median_seconds
from lora_mnist.fast.sparse import SPARSE_DENSITY, sparse_if_mostly_zero
from lora_mnist.mlp import OversizedMLP

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn) -> float:
    fn()  # one untimed call first
    return 1e3 * median_seconds(fn, 7)


def row(label: str, activations: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dense = median_ms(lambda: F.linear(activations, weight, bias))
    sparse = median_ms(lambda: F.linear(sparse_if_mostly_zero(activations, max_density=1.0), weight, bias))
    density = float(torch.count_nonzero(activations)) / activations.numel()
    print(f"| {label} | {density:.3f} | {dense:.1f} | {sparse:.1f} | {sparse / dense:.2f} |")


@torch.inference_mode()
def main() -> None:
    generator = torch.Generator().manual_seed(0)
    model = OversizedMLP().eval()
    weight, bias = model.linear2.weight, model.linear2.bias
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; lora_mnist.fast.sparse.SPARSE_DENSITY = {SPARSE_DENSITY}")
    print()
    print("| activations (2500 x 1000) | non-zeros | dense (ms) | sparse (ms) | sparse / dense |")
    print("|---|---:|---:|---:|---:|")
    for density in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        values = torch.rand(2500, 1000, generator=generator)
        row("random", values * (torch.rand(2500, 1000, generator=generator) < density), weight, bias)
    base = ROOT / "models" / "base.safetensors"
    if base.exists():
        from lora_mnist.data import load_split
        from lora_mnist.io import load_tensors

        model.load_state_dict(load_tensors(base))
        images, _ = load_split(ROOT / "data" / "mnist" / "raw", "test")
        hidden = torch.relu(model.linear1(images[:2500].flatten(1)))
        row("trained base model, test images", hidden, model.linear2.weight, model.linear2.bias)


if __name__ == "__main__":
    main()
