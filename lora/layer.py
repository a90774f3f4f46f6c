"""LoRALinear: a wrapper around an existing nn.Linear that adds named low-rank adapters.

The wrapped layer is kept as ``base_layer`` and never copied. Its weight is only written by an
explicit ``merge()``/``unmerge()``; the forward computes ``base_layer(x) + B(A(dropout(x)))·scale``, as
PEFT does, and never materialises W + B·A.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoRAConfig


class LoRAMergeError(RuntimeError):
    """A merge or unmerge was refused; the base weights were left as they were."""


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: LoRAConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self.inference_scale = 1.0  # multiplies the active adapter's delta: 0 = base, 1 = as trained
        self.add_adapter(adapter_name, config)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        """Create adapter ``name`` (B = 0, A per ``config.init``) and make it the active one."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        # r above min(in, out) is allowed, as in PEFT: more parameters, but B·A's rank stays capped by that side.
        weight = self.base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, config.r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(config.r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self.configs[name] = config
        self.reset_adapter(name)
        self.active_adapter = name

    def reset_adapter(self, name: str) -> None:
        """Re-draw A from its init distribution and zero B, so the adapter's delta is exactly 0."""
        config, a = self.configs[name], self.lora_A[name].weight
        with torch.no_grad():
            if config.init == "normal":
                nn.init.normal_(a, mean=0.0, std=1.0)
            elif config.init == "gaussian":
                nn.init.normal_(a, mean=0.0, std=1.0 / config.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name: str) -> None:
        if self.merged_adapter == name:
            raise LoRAMergeError(f"adapter {name!r} is merged: unmerge it before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            del table[name]
        del self.scaling[name], self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def set_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise KeyError(f"no adapter {name!r} on this layer; present: {list(self.lora_A)}")
        if self.merged and name != self.merged_adapter:
            raise LoRAMergeError(f"adapter {self.merged_adapter!r} is merged: unmerge it before switching to {name!r}")
        self.active_adapter = name

    def set_inference_scale(self, value: float) -> None:
        """Scale the adapter's effect without retraining (0 gives the base model exactly, 1 the adapter)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"inference scale={value!r} is invalid: a finite number >= 0 is allowed")
        if self.merged:
            raise LoRAMergeError("an adapter is merged: unmerge it before changing the inference scale")
        self.inference_scale = float(value)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = B·A·scale (times the inference scale), shaped like the base weight (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * (self.scaling[name] * self.inference_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        name = self.active_adapter
        if self.disabled or self.merged or name is None or self.inference_scale == 0:
            return out
        scale = self.scaling[name] * self.inference_scale
        return out + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * scale

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight; refuses non-finite results."""
        name = name or self.active_adapter
        if name is None:
            raise LoRAMergeError("no adapter to merge")
        if self.merged:
            raise LoRAMergeError(f"adapter {self.merged_adapter!r} is already merged: unmerge it first")
        merged = self.base_layer.weight + self.delta_weight(name).to(self.base_layer.weight.dtype)
        if not torch.isfinite(merged).all():
            raise LoRAMergeError(f"merging adapter {name!r} would give non-finite weights; base left intact")
        self.base_layer.weight.copy_(merged)
        self.merged_adapter = name
        self.active_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta again; restores the base within float rounding, not bit for bit."""
        if not self.merged:
            raise LoRAMergeError("no adapter is merged")
        self.base_layer.weight.sub_(self.delta_weight(self.merged_adapter).to(self.base_layer.weight.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapter!r}, merged={self.merged}"
