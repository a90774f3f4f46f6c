"""Model-level LoRA operations: inject adapters by module name, freeze the base, switch, delete, merge, disable,
run a batch with an adapter per row, and unload the LoRA layers (merged or not)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import LoRAConfig, LoRAConfigError
from .layer import BASE, LoRALinear, LoRAMergeError

DEFAULT_ADAPTER = "default"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers of ``model`` by module name (as in the unwrapped model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model's LoRA layers run (as the last set_adapter left them), or None."""
    return next((layer.active_adapter for layer in lora_layers(model).values()), None)


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The modules ``config.target_modules`` selects in ``model``, matched as PEFT matches a list: the module of
    that name, or every module whose name ends in ``.<name>``. The layers inside a LoRA layer (its base_layer,
    lora_A, …) are not candidates; the LoRA layer itself is. Refused when a name selects nothing, or a module
    that is not an nn.Linear."""
    candidates, wrapped = {}, []
    for name, module in model.named_modules():
        if name and not any(name.startswith(prefix) for prefix in wrapped):
            candidates[name] = module
            if isinstance(module, LoRALinear):
                wrapped.append(name + ".")
    selected: dict[str, None] = {}
    for target in config.target_modules:
        matches = [name for name in candidates if name == target or name.endswith("." + target)]
        if not matches:
            linears = sorted(n for n, m in candidates.items() if isinstance(m, (nn.Linear, LoRALinear)))
            raise LoRAConfigError("target_modules", target, f"the name of an nn.Linear of the model ({', '.join(linears)})")
        for name in matches:
            if not isinstance(candidates[name], (nn.Linear, LoRALinear)):
                raise LoRAConfigError("target_modules", target, f"the name of nn.Linear modules only (it selects {name}, "
                                      f"a {type(candidates[name]).__name__})")
            selected[name] = None
    return list(selected)


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap each nn.Linear of ``model`` that ``config.target_modules`` selects (see :func:`target_names`) in a
    LoRALinear, in place, and add adapter ``adapter_name``.

    All or nothing: every target is checked before any layer changes. On a model without adapters the new one
    is active; calling it again with another name adds a second adapter and, as in PEFT, the active adapter
    stays (``set_adapter`` switches); after delete_adapter took the last one, none is active until
    ``set_adapter``, on every layer. A name the model has already is refused, as in PEFT.
    """
    names, existing, modules = target_names(model, config), lora_layers(model), dict(model.named_modules())
    if adapter_name in adapters_of(model):
        raise ValueError(f"adapter {adapter_name!r} already exists in the model: another name is allowed "
                         "(or delete_adapter first)")
    for target in names:
        if target in existing:
            existing[target].check_adapter(adapter_name, config)
            continue
        limit, r = max(modules[target].in_features, modules[target].out_features), config.rank_for(target)
        if r > limit:
            raise LoRAConfigError("r", r, f"at most {limit} for {target} "
                                  f"({modules[target].in_features} -> {modules[target].out_features})")
    # The model's active adapter, None once delete_adapter took the last one (then PEFT activates none).
    active = next((layer.active_adapter for layer in existing.values() if layer.active_adapter), None) \
        if existing else adapter_name
    for target in names:
        if target in existing:
            emptied = not existing[target].lora_A  # follows the model, as a new layer does
            existing[target].add_adapter(adapter_name, config)
            if emptied:
                existing[target].active_adapter = active
            continue
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(modules[target], adapter_name, config, module_name=target)
        layer.active_adapter = active
        setattr(parent, child, layer)
    return model


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA A and B matrices."""
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A." in name or ".lora_B." in name


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original names (``fc1.weight``), without any LoRA tensor."""
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def adapter_state_dict(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """One adapter's tensors, keyed ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    state = {}
    for module_name, layer in lora_layers(model).items():
        if adapter_name in layer.lora_A:
            state[f"{module_name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach()
            state[f"{module_name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach()
    if not state:
        raise KeyError(f"the model has no adapter named {adapter_name!r}")
    return state


def adapters_of(model: nn.Module) -> set[str]:
    """The names of every adapter on any of the model's LoRA layers."""
    return {name for layer in lora_layers(model).values() for name in layer.lora_A}


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every LoRA layer, as PEFT does: a layer without it then
    computes its base layer alone. The base weights are not touched."""
    layers = list(lora_layers(model).values())
    if adapter_name not in adapters_of(model):
        raise KeyError(f"the model has no adapter named {adapter_name!r}; present: {sorted(adapters_of(model))}")
    merged = sorted({layer.merged_adapter for layer in layers if layer.merged} - {adapter_name})
    if merged:
        raise LoRAMergeError(f"adapter {merged[0]!r} is merged: unmerge it before switching to {adapter_name!r}")
    for layer in layers:
        layer.set_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer. Where it was active, the first remaining adapter by name
    becomes active, layer by layer, as in PEFT. A merged adapter must be unmerged first."""
    layers = list(lora_layers(model).values())
    if adapter_name not in adapters_of(model):
        raise KeyError(f"the model has no adapter named {adapter_name!r}; present: {sorted(adapters_of(model))}")
    if any(layer.merged_adapter == adapter_name for layer in layers):
        raise LoRAMergeError(f"adapter {adapter_name!r} is merged: unmerge it before deleting it")
    for layer in layers:
        layer.delete_adapter(adapter_name)


def set_inference_scale(model: nn.Module, value: float) -> None:
    """Scale every LoRA layer's delta at inference: 0 gives the base outputs exactly, 1 the trained adapter."""
    layers = list(lora_layers(model).values())
    for layer in layers:  # checked on every layer before any changes
        layer.check_inference_scale(value)
    if any(layer.merged for layer in layers):
        raise LoRAMergeError("an adapter is merged: unmerge it before changing the inference scale")
    for layer in layers:
        layer.set_inference_scale(value)


def merge(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the adapter (default: the active one) into the base weights of every LoRA layer that has it.
    All or nothing: every layer's merged weight is computed and checked before any is written."""
    name = adapter_name or active_adapter(model)
    layers = [layer for layer in lora_layers(model).values() if name in layer.lora_A]
    if not layers:
        raise LoRAMergeError(f"no adapter {name!r} to merge; present: {sorted(adapters_of(model))}")
    planned = [(layer, layer.merged_weight(name)) for layer in layers]
    for layer, weight in planned:
        layer.write_merged(weight, name)


def unmerge(model: nn.Module) -> None:
    """Subtract the merged deltas again (within float rounding: keep a copy of the base for bit-exactness)."""
    layers = [layer for layer in lora_layers(model).values() if layer.merged]
    if not layers:
        raise LoRAMergeError("no adapter is merged")
    for layer in layers:
        layer.unmerge()


@contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly the base model's outputs."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("an adapter is merged into the base weights: unmerge it before disabling adapters")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was_disabled in zip(layers, previous):
            layer.disabled = was_disabled


@contextmanager
def adapter_per_row(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Within the block each forward runs row i of the batch with adapter ``adapter_names[i]``, or with none
    where it is :data:`BASE`, as PEFT's ``model(x, adapter_names=...)`` does. A layer that lacks a row's adapter
    computes its base output for that row. Refused in training mode and while an adapter is merged."""
    layers = list(lora_layers(model).values())
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"adapter_names={adapter_names!r} is invalid: a list of adapter names (or {BASE!r}) is allowed")
    unknown = sorted(set(adapter_names) - adapters_of(model) - {BASE})
    if unknown:
        raise KeyError(f"the model has no adapter named {unknown}; present: {sorted(adapters_of(model))} (or {BASE!r})")
    if model.training:
        raise RuntimeError("a batch with an adapter per row is for inference: call model.eval() first")
    if any(layer.merged for layer in layers):
        raise LoRAMergeError("an adapter is merged: unmerge it before running a batch with an adapter per row")
    names, outer = list(adapter_names), [layer.row_adapters for layer in layers]
    for layer in layers:
        layer.row_adapters = names
    try:
        yield model
    finally:
        for layer, previous in zip(layers, outer):  # a block inside another gives the outer one its rows back
            layer.row_adapters = previous


def merge_and_unload(model: nn.Module, adapter_names: list[str] | None = None) -> nn.Module:
    """Fold the adapters (default: the active one) into the base weights and put each wrapped nn.Linear back in
    its place, as PEFT's ``merge_and_unload``: the model is a plain model again. An adapter already merged with
    :func:`merge` stays merged (by default the active one is added to it, as in PEFT). All or nothing: every
    layer's weight is computed and checked before any is written."""
    if adapter_names is not None:
        unknown = sorted(set(adapter_names) - adapters_of(model))
        if unknown or not adapter_names:
            raise KeyError(f"the model has no adapter named {unknown or adapter_names}; "
                           f"present: {sorted(adapters_of(model))}")
    planned = []
    with torch.no_grad():
        for module_name, layer in lora_layers(model).items():
            # by default each layer's own active adapter, as PEFT merges them (they differ after a delete_adapter)
            names = [layer.active_adapter] if adapter_names is None else list(adapter_names)
            weight = layer.base_layer.weight
            if adapter_names is not None and layer.merged and layer.merged_adapter not in names:
                raise LoRAMergeError(f"adapter {layer.merged_adapter!r} is merged into {module_name}, but not among "
                                     f"{names}: unmerge it first")
            deltas = [layer.delta_weight(n) for n in names if n in layer.lora_A and n != layer.merged_adapter]
            merged = (weight + sum(deltas)).to(weight.dtype) if deltas else weight  # rounded once, as PEFT's +=
            if not torch.isfinite(merged).all():
                raise LoRAMergeError(f"merging {names} into {module_name} would give non-finite weights; model left intact")
            planned.append((layer, merged))
        for layer, merged in planned:
            if merged is not layer.base_layer.weight:
                layer.base_layer.weight.copy_(merged)
    return _unwrap(model)


def unload(model: nn.Module) -> nn.Module:
    """Put each wrapped nn.Linear back in its place without merging, as PEFT's ``unload``: the original base
    model again. Refused while an adapter is merged, whose delta would stay in the weights."""
    merged = sorted({layer.merged_adapter for layer in lora_layers(model).values() if layer.merged})
    if merged:
        raise LoRAMergeError(f"adapter {merged[0]!r} is merged: unmerge it first, or call merge_and_unload")
    return _unwrap(model)


def _unwrap(model: nn.Module) -> nn.Module:
    for module_name, layer in lora_layers(model).items():
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.base_layer)
    return model
