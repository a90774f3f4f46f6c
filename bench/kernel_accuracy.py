"""Do the two backends' pretraining paths reach the same accuracy? Paired runs on real MNIST, one per seed.

    python -m bench.kernel_accuracy               # seeds 0-4, one full epoch each with both backends (about 6 minutes)

Both paths (the CPU kernels of `backend: auto`, autograd of `backend: torch`) do the same math (Adam on the same seeded batches) but round differently, and over 6,000 steps
the two trajectories drift apart; this compares where they end: test accuracy and the mean training loss
of the last 500 steps, per seed and over the seeds.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from lora_mnist.data import load_split
from lora_mnist.metrics import predict, summarize
from lora_mnist.mlp import OversizedMLP
from lora_mnist.train import train

RAW = Path(__file__).resolve().parents[1] / "data" / "mnist" / "raw"
KERNELS = ("auto", "torch")  # backends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6000)
    args = parser.parse_args()
    train_x, train_y = load_split(RAW, "train")
    test_x, test_y = load_split(RAW, "test")

    accuracy: dict[str, list[float]] = {name: [] for name in KERNELS}
    print("| seed | accuracy, auto | accuracy, torch | loss (last 500), auto | loss (last 500), torch |")
    print("|---:|---:|---:|---:|---:|")
    for seed in range(args.seeds):
        losses = {}
        for name in KERNELS:
            torch.manual_seed(seed)
            model = OversizedMLP()
            losses[name] = float(train(model, train_x, train_y, steps=args.steps, batch_size=10, lr=1e-3, seed=seed,
                                       backend=name, desc=f"{name} seed {seed}")[-500:].mean())
            accuracy[name].append(summarize(test_y, predict(model, test_x))["accuracy"])
        print(f"| {seed} | {accuracy['auto'][-1]:.4f} | {accuracy['torch'][-1]:.4f} | {losses['auto']:.4f} | "
              f"{losses['torch']:.4f} |", flush=True)
    if args.seeds > 1:
        differences = [f - t for f, t in zip(accuracy["auto"], accuracy["torch"])]
        print()
        for name, values in accuracy.items():
            print(f"{name}: accuracy {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        print(f"auto - torch, paired: {statistics.mean(differences):+.4f} ± {statistics.stdev(differences):.4f}")


if __name__ == "__main__":
    main()
