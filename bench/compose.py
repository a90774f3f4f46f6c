"""Benchmark: the forward cost of ten adapters on one base at batch 10,000, against the merged single adapter.

The 784→1000→2000→10 MLP with ten r=1 adapters (random values: the cost does not depend on them), each way the
compose stage of experiments/dvc.yaml runs them, measured in one process with torch.utils.benchmark.

    python -m bench.compose            # prints a Markdown table
"""
from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

from bench import Output
from lora import LoRAConfig, adapter_per_row, add_weighted_adapter, disable_adapter, inject, lora_layers, merge, set_adapter
from lora_mnist.compose import route_by_confidence, route_by_prediction
from lora_mnist.mlp import OversizedMLP
from lora_mnist.params import LAYERS

ADAPTERS = [f"digit-{d}" for d in range(10)]


def ten_adapters() -> nn.Module:
    torch.manual_seed(0)
    model = OversizedMLP().eval()
    for name in ADAPTERS:
        inject(model, LoRAConfig(r=1, alpha=1, target_modules=LAYERS), name)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B[name].weight, std=0.01)
    return model


def variants(x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> one forward of the batch ``x``, the way that variant runs."""
    merged = ten_adapters()
    add_weighted_adapter(merged, ADAPTERS, [0.1] * 10, "combined", "linear")
    set_adapter(merged, "combined")
    merge(merged, "combined")
    single, cat = ten_adapters(), ten_adapters()
    add_weighted_adapter(cat, ADAPTERS, [0.1] * 10, "combined", "cat")
    set_adapter(cat, "combined")
    routed, adapter_of_digit = ten_adapters(), dict(enumerate(ADAPTERS))

    def base_logits() -> torch.Tensor:
        with disable_adapter(routed):
            return routed(x)

    def by_prediction() -> torch.Tensor:  # the base's forward picks each row's adapter, then the routed forward
        with adapter_per_row(routed, route_by_prediction(base_logits(), adapter_of_digit)):
            return routed(x)

    return {
        "merged single adapter": lambda: merged(x),
        "one adapter, unmerged (r=1)": lambda: single(x),
        "cat of the ten, unmerged (r=10)": lambda: cat(x),
        "route to the base's prediction": by_prediction,
        "route by confidence, top 2": lambda: route_by_confidence(routed, x, base_logits(), adapter_of_digit, "torch"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds per measurement")
    parser.add_argument("--write", metavar="PAGE", help="also write the output into PAGE between its bench.compose markers")
    args = parser.parse_args()
    emit = Output()
    x = torch.rand(args.batch, 784)
    times = {}
    for name, forward in variants(x).items():
        def step(forward: Callable[[], torch.Tensor] = forward) -> None:
            with torch.inference_mode():
                forward()

        timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
        times[name] = timer.blocked_autorange(min_run_time=args.min_run_time).median
    reference = times["merged single adapter"]
    emit(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
         f"batch {args.batch:,}, dense forward (inference mode)")
    emit()
    emit("| variant | forward (ms) | × merged single adapter |")
    emit("|---|---:|---:|")
    for name, seconds in times.items():
        emit(f"| {name} | {1e3 * seconds:.1f} | {seconds / reference:.2f} |")
    if args.write:
        emit.write_into(args.write, "bench.compose")


if __name__ == "__main__":
    main()
