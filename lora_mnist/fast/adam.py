"""Adam through torch's private fused kernel, with torch.optim.Adam(fused=True) as the fallback.

torch.optim's constructor imports torch._dynamo, about a second in every process that trains; calling
``torch._fused_adam_`` directly skips that and computes the same numbers bit for bit (tests/test_backend.py
fails loudly when torch changes the private call). Without it, :func:`make_adam` returns torch's own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the seed notebook used


def private_kernel_available() -> bool:
    return callable(getattr(torch, "_fused_adam_", None))


def make_adam(params: list[nn.Parameter], lr: float) -> Any:
    """An Adam without weight decay over ``params``: :class:`FusedAdam`, or torch's when the kernel is gone."""
    if private_kernel_available():
        return FusedAdam(params, lr)
    return torch.optim.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)


class FusedAdam:
    """torch.optim.Adam(fused=True)'s step, one pass over the parameters on CPU and CUDA. ``state`` holds,
    per parameter, a step count and the two moments; ``param_groups`` is torch.optim's layout."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.lr = lr
        self.param_groups = [{"params": params, "lr": lr}]
        self.state = {
            p: {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for p in params
        }

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.param_groups[0]["params"] if p.grad is not None]
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            steps, lr=self.lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1], weight_decay=0.0, eps=ADAM_EPS, amsgrad=False,
            maximize=False,
        )

    def zero_grad(self) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None
