"""Training on CUDA with the optimizer steps replayed from CUDA graphs: launch overhead, not arithmetic,
bounds a batch of 10 on a GPU. The steps compute what the eager loop computes (tests/test_cuda.py)."""
from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

# Optimizer steps recorded in one CUDA graph. An H200 epoch took the same time with 5 or 20 (1.32 s; 1 step: 1.64 s,
# 200: 1.71 s), and fewer steps are quicker to capture and leave a shorter eager tail in short runs.
GRAPH_STEPS = 5
GRAPH_WARMUP = 3  # eager steps first, so that lazy CUDA set-up (cuBLAS handles, workspaces) is not captured


def graph_plan(batch_lengths: list[int], batch_size: int, chunk: int, warmup: int) -> list[tuple[int, int, bool]]:
    """Runs of steps as (first step, number of steps, replayed from a graph?): a graph has fixed shapes, so
    it replays ``chunk`` full batches at a time; the warm-up steps and any short batch run eagerly."""
    plan, step = [], 0
    while step < len(batch_lengths):
        run = batch_lengths[step : step + chunk]
        if step >= warmup and len(run) == chunk and all(length == batch_size for length in run):
            plan.append((step, chunk, True))
            step += chunk
        else:
            plan.append((step, 1, False))
            step += 1
    return plan


def train_graphed(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
                  batch_size: int, optimizer: Any, desc: str) -> torch.Tensor:
    """Every step of ``batches``, GRAPH_STEPS at a time from one CUDA graph; returns each step's loss. Gradients
    live in fixed buffers that every step zeroes and backward accumulates into (0 + g is g exactly), so eager
    and replayed steps compute the same numbers."""
    device = images.device
    params = optimizer.param_groups[0]["params"]
    for p in params:
        p.grad = torch.zeros_like(p)

    def step(index: torch.Tensor) -> torch.Tensor:
        for p in params:
            p.grad.zero_()
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        loss.backward()
        optimizer.step()
        return loss.detach()

    lengths = [len(index) for index in batches]
    offsets = [0, *itertools.accumulate(lengths)]
    flat = torch.cat(batches).to(device)
    losses = torch.empty(len(batches), device=device)
    static_index = torch.empty((GRAPH_STEPS, batch_size), dtype=torch.long, device=device)
    graph = None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), tqdm(total=len(batches), desc=desc, disable=None) as progress:
        for first, count, replayed in graph_plan(lengths, batch_size, GRAPH_STEPS, GRAPH_WARMUP):
            if not replayed:
                losses[first] = step(flat[offsets[first] : offsets[first + 1]])
            else:
                static_index.copy_(flat[offsets[first] : offsets[first + count]].view(count, batch_size))
                if graph is None:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        static_losses = torch.stack([step(static_index[j]) for j in range(GRAPH_STEPS)])
                graph.replay()
                losses[first : first + count] = static_losses
            progress.update(count)
    torch.cuda.current_stream(device).wait_stream(side)
    for p in params:
        p.grad = None
    return losses
