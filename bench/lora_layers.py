"""Benchmark: LoRA layer cost, ours (unmerged and merged) vs the seed's parametrize vs PEFT's LoraLayer.

Every variant is the 784→1000→2000→10 MLP with r=1 on linear1..3, measured in one process with
torch.utils.benchmark (median of repeated blocks), so the ratios compare like with like.

    python -m bench.lora_layers            # prints a Markdown table
"""
from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
from torch import nn
from torch.utils import benchmark

from bench import Output
from bench.seed_lora import apply_seed_lora
from lora import LoRAConfig, inject, mark_only_lora_trainable, merge
from lora_mnist.mlp import OversizedMLP
from lora_mnist.params import LAYERS

TARGETS = list(LAYERS)


def variants() -> dict[str, Callable[[], nn.Module]]:
    def base() -> nn.Module:
        torch.manual_seed(0)
        return OversizedMLP()

    def ours() -> nn.Module:
        model = base()
        inject(model, LoRAConfig(r=1, alpha=1, target_modules=LAYERS))
        mark_only_lora_trainable(model)
        return model

    def ours_merged() -> nn.Module:
        model = ours()
        merge(model)
        return model

    def seed() -> nn.Module:
        return apply_seed_lora(base())

    def peft_layer() -> nn.Module:
        import peft

        return peft.get_peft_model(base(), peft.LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS))

    def bare() -> nn.Module:
        model = base()
        for p in model.parameters():
            p.requires_grad = False
        return model

    return {
        "ours, unmerged": ours,
        "seed, parametrize": seed,
        "PEFT LoraLayer": peft_layer,
        "ours, merged": ours_merged,
        "bare base model": bare,
    }


def measure(model: nn.Module, batch: int, train: bool, min_run_time: float) -> float:
    """Median seconds of one forward (inference_mode) or one training step (forward, backward, Adam)."""
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))
    if not train:
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(x)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()

        def step() -> None:
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--write", metavar="PAGE", help="also write the output into PAGE between its bench.lora_layers markers")
    args = parser.parse_args()
    emit = Output()

    builders = variants()
    emit(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    emit()
    emit("| variant | batch | forward (ms) | × ours | train step (ms) | × ours |")
    emit("|---|---:|---:|---:|---:|---:|")
    for batch in args.batches:
        rows = {}
        for name, build in builders.items():
            forward = measure(build(), batch, train=False, min_run_time=args.min_run_time)
            trainable = name not in ("ours, merged", "bare base model")
            step = measure(build(), batch, train=True, min_run_time=args.min_run_time) if trainable else None
            rows[name] = (forward, step)
        ref_forward, ref_step = rows["ours, unmerged"]
        for name, (forward, step) in rows.items():
            step_text = f"{1e3 * step:.3f} | {step / ref_step:.2f}" if step is not None else "– | –"
            emit(f"| {name} | {batch:,} | {1e3 * forward:.3f} | {forward / ref_forward:.2f} | {step_text} |")
    emit()
    emit("'ours, merged' vs 'bare base model' is the overhead of merged inference (should be ≈1.00).")
    if args.write:
        emit.write_into(args.write, "bench.lora_layers")


if __name__ == "__main__":
    main()
