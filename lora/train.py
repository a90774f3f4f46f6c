"""A training loop over tensors already in memory: seeded batch order, Adam, no per-step host sync."""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from tqdm import tqdm


ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the seed notebook used


class DeviceError(ValueError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit CUDA device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device={name!r} is invalid: 'auto', 'cpu', 'cuda' or 'cuda:N' is allowed") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={name!r} was requested but CUDA is not available here; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device={name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise DeviceError(f"device={name!r} is invalid: 'auto', 'cpu', 'cuda' or 'cuda:N' is allowed")
    return device


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


def require_samples(images: torch.Tensor) -> None:
    """Training needs at least one image: a clear error instead of an empty batch order."""
    if images.shape[0] == 0:
        raise ValueError("no training samples: the selected data is empty")


def steps_for_epochs(num_samples: int, batch_size: int, epochs: int) -> int:
    return math.ceil(num_samples / batch_size) * epochs


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str = "train",
    optimizer: Adam | None = None,
    cuda_graph: bool = True,
) -> torch.Tensor:
    """Adam on cross-entropy over seeded batches of (images, labels); returns the loss of every step (CPU).

    Pass ``optimizer`` (from :func:`make_optimizer`) to inspect its state afterwards; ``lr`` is then unused.
    On CUDA the steps are replayed from a CUDA graph unless ``cuda_graph`` is False (same numbers)."""
    require_samples(images)
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    optimizer = optimizer or make_optimizer(model, lr)
    batches = batch_order(images.shape[0], batch_size, steps, seed)
    model.train()
    if device.type == "cuda" and cuda_graph:
        losses = _train_graphed(model, images, labels, batches, batch_size, optimizer, desc)
    else:
        loss_fn = nn.CrossEntropyLoss()
        losses = torch.empty(steps, device=device)
        for step, index in enumerate(tqdm(batches, desc=desc, disable=None)):
            index = index.to(device)
            loss = loss_fn(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[step] = loss.detach()
    model.eval()
    return losses.cpu()


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


def _train_graphed(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batches: list[torch.Tensor],
                   batch_size: int, optimizer: Adam, desc: str) -> torch.Tensor:
    """The same steps as the eager loop, replayed GRAPH_STEPS at a time from one CUDA graph (launch overhead,
    not arithmetic, bounds a batch of 10 on a GPU). Gradients live in fixed buffers that every step zeroes and
    backward accumulates into (0 + g is g exactly), so eager and replayed steps compute the same numbers."""
    device = images.device
    for p in optimizer.params:
        p.grad = torch.zeros_like(p)

    def step(index: torch.Tensor) -> torch.Tensor:
        for p in optimizer.params:
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
    for p in optimizer.params:
        p.grad = None
    return losses


def make_optimizer(model: nn.Module, lr: float) -> Adam:
    """Adam over the parameters that require gradients."""
    return Adam([p for p in model.parameters() if p.requires_grad], lr=lr)


def optimizer_state_bytes(optimizer: Adam) -> int:
    """Bytes held by the optimizer's state tensors (Adam: two moments per parameter and a step count)."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values())


class Adam:
    """Adam without weight decay, computed as torch.optim.Adam(fused=True) computes it: the same fused kernel
    (one pass over the parameters; CPU and CUDA), results equal bit for bit.

    torch.optim's constructor imports torch._dynamo, about a second in every process that trains; this
    calls the kernel directly. ``state`` holds, per parameter, a step count and the two moments."""

    def __init__(self, params: list[nn.Parameter], lr: float, betas: tuple[float, float] = ADAM_BETAS,
                 eps: float = ADAM_EPS) -> None:
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.state = {
            p: {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for p in params
        }

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            steps, lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=0.0, eps=self.eps, amsgrad=False,
            maximize=False,
        )

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
