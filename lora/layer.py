"""LoRALinear: a wrapper around an existing nn.Linear that adds named low-rank adapters.

The wrapped layer is kept as ``base_layer`` and never copied. Its weight is only written by an
explicit ``merge()``/``unmerge()``; the forward computes ``base_layer(x) + B(A(dropout(x)))·scale``, as
PEFT does, and never materialises W + B·A. With ``row_adapters`` set (see ``lora.model.adapter_per_row``)
each row of the batch gets its own adapter, or none (:data:`BASE`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import LoRAConfig, LoRAConfigError, is_finite_number


BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the adapters of a base layer of ``base_dtype``: as PEFT's autocast_adapter_dtype, a float16 or
    bfloat16 base gets float32 adapters, which keep small updates."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class LoRAMergeError(RuntimeError):
    """A merge or unmerge was refused; the base weights were left as they were."""


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, adapter_name: str, config: LoRAConfig, module_name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.module_name = module_name  # what the config's rank_pattern and alpha_pattern are matched against
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self.disabled = False
        self.inference_scale = 1.0  # multiplies the active adapter's delta: 0 = base, 1 = as trained
        self.row_adapters: list[str] | None = None  # one adapter name (or BASE) per batch row, while set
        self.train(base_layer.training)  # wrapping a layer of a model in eval mode keeps it in eval mode (dropout off)
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

    def check_adapter(self, name: str, config: LoRAConfig) -> None:
        """Raise, changing nothing, when adapter ``name`` with ``config`` cannot be added to this layer."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name {name!r} is invalid: a non-empty string without '.' is allowed")
        if hasattr(nn.ModuleDict, name):  # torch keeps adapters in ModuleDicts, whose methods take these names
            raise ValueError(f"adapter name {name!r} is invalid: a name that is not an attribute of torch's "
                             "nn.ModuleDict (such as 'half', 'train' or 'to') is allowed")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        # r above min(in, out) is allowed, as in PEFT: more parameters, but B·A's rank stays capped by that side;
        # above max(in, out) the adapter holds more numbers than the full weight's update could need.
        limit, r = max(self.in_features, self.out_features), config.rank_for(self.module_name)
        if r > limit:
            raise LoRAConfigError("r", r, f"at most {limit} for a {self.in_features} -> {self.out_features} layer")

    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        """Create adapter ``name`` (B = 0, A per ``config.init``). A new layer makes it active; on a layer
        that already has adapters the active one stays, as in PEFT."""
        self.check_adapter(name, config)
        weight, r = self.base_layer.weight, config.rank_for(self.module_name)
        factory = {"device": weight.device, "dtype": adapter_dtype(weight.dtype)}
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for table in (self.lora_A, self.lora_B, self.lora_dropout):
            table[name].train(self.training)
        self.scaling[name] = config.scaling_for(self.module_name)
        self.configs[name] = config
        self.reset_adapter(name)
        if self.active_adapter is None:
            self.active_adapter = name

    def reset_adapter(self, name: str) -> None:
        """Re-draw A from its init distribution and zero B, so the adapter's delta is exactly 0."""
        config, a = self.configs[name], self.lora_A[name].weight
        with torch.no_grad():
            if config.init == "normal":
                nn.init.normal_(a, mean=0.0, std=1.0)
            elif config.init == "gaussian":
                nn.init.normal_(a, mean=0.0, std=1.0 / a.shape[0])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` if this layer has it. If it was active, the first remaining adapter by name
        becomes active (or none), as in PEFT, where every layer is told of every deletion."""
        if self.merged_adapter == name:
            raise LoRAMergeError(f"adapter {name!r} is merged: unmerge it before deleting it")
        if name in self.lora_A:
            for table in (self.lora_A, self.lora_B, self.lora_dropout):
                del table[name]
            del self.scaling[name], self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = min(self.lora_A, default=None)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` active here; a layer without that adapter then computes its base layer alone, as in PEFT."""
        if self.merged and name != self.merged_adapter:
            raise LoRAMergeError(f"adapter {self.merged_adapter!r} is merged: unmerge it before switching to {name!r}")
        self.active_adapter = name

    def check_inference_scale(self, value: float) -> None:
        """Raise unless ``value`` is a number >= 0 whose product with every adapter's scaling stays finite in
        the layer's dtype (1e39 is infinite in float32)."""
        largest = torch.finfo(self.base_layer.weight.dtype).max
        allowed = f"a number >= 0 whose product with the adapter's scaling is at most {largest:.3g} ({self.base_layer.weight.dtype})"
        if not is_finite_number(value) or value < 0 \
                or any(value * scaling > largest for scaling in self.scaling.values()):
            raise ValueError(f"inference scale={value!r} is invalid: {allowed} is allowed")

    def set_inference_scale(self, value: float) -> None:
        """Scale the adapter's effect without retraining (0 gives the base model exactly, 1 the adapter)."""
        self.check_inference_scale(value)
        if self.merged:
            raise LoRAMergeError("an adapter is merged: unmerge it before changing the inference scale")
        self.inference_scale = float(value)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = B·A·scale (times the inference scale), shaped like the base weight (out, in)."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * (self.scaling[name] * self.inference_scale)

    def adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x)))·scale of adapter ``name``, in the adapter's dtype: what it adds to the base layer's output."""
        x = x.to(self.lora_A[name].weight.dtype)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * (self.scaling[name] * self.inference_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_adapters is not None and (self.training or self.merged):
            raise LoRAMergeError("a batch with an adapter per row runs in eval mode with nothing merged: "
                                 "call model.eval() and unmerge first")
        out = self.base_layer(x)
        if self.disabled or self.merged or self.inference_scale == 0:
            return out
        if self.row_adapters is not None:
            return self.forward_per_row(x, out, self.row_adapters)
        if self.active_adapter not in self.lora_A:
            return out
        return (out + self.adapter_output(self.active_adapter, x)).to(out.dtype)

    def forward_per_row(self, x: torch.Tensor, out: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Add to each row of the base output the delta of the adapter its row names; this layer's rows whose
        adapter is BASE, or an adapter it lacks, keep the base output."""
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter names: {len(names)} given for a batch of {x.shape[0]} rows; one per row is allowed")
        if x.layout != torch.strided:  # rows of a sparse input cannot be selected; the base layer took it as it was
            x = x.to_dense()
        for name in dict.fromkeys(names):
            if name in self.lora_A:
                rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
                out = out.index_add(0, rows, self.adapter_output(name, x.index_select(0, rows)).to(out.dtype))
        return out

    @torch.no_grad()
    def merged_weight(self, name: str | None = None) -> torch.Tensor:
        """W + ΔW of adapter ``name`` (default: the active one), computed without writing anything; refuses a
        merge that cannot happen or whose result is not finite."""
        name = name or self.active_adapter
        if name is None or name not in self.lora_A:
            raise LoRAMergeError(f"no adapter {name!r} to merge on this layer; present: {list(self.lora_A)}")
        if self.merged:
            raise LoRAMergeError(f"adapter {self.merged_adapter!r} is already merged: unmerge it first")
        merged = (self.base_layer.weight + self.delta_weight(name)).to(self.base_layer.weight.dtype)  # rounded once
        if not torch.isfinite(merged).all():
            raise LoRAMergeError(f"merging adapter {name!r} would give non-finite weights; base left intact")
        return merged

    @torch.no_grad()
    def write_merged(self, merged: torch.Tensor, name: str | None = None) -> None:
        """Write a weight from :meth:`merged_weight` into the base layer and record the merge. The active adapter
        stays, as in PEFT: after an unmerge the layer runs what it ran before."""
        self.base_layer.weight.copy_(merged)
        self.merged_adapter = name or self.active_adapter

    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight; refuses non-finite results."""
        self.write_merged(self.merged_weight(name), name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged delta again; restores the base within float rounding, not bit for bit."""
        if not self.merged:
            raise LoRAMergeError("no adapter is merged")
        self.base_layer.weight.sub_(self.delta_weight(self.merged_adapter))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A)}, active={self.active_adapter!r}, merged={self.merged}"
