"""Model-level LoRA operations: inject adapters by module name, freeze the base, switch, merge, disable."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import LoRAConfig, LoRAConfigError
from .layer import LoRALinear, LoRAMergeError

DEFAULT_ADAPTER = "default"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers of ``model`` by module name (as in the unwrapped model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = DEFAULT_ADAPTER) -> nn.Module:
    """Wrap each target nn.Linear of ``model`` in a LoRALinear (in place) and add adapter ``adapter_name``.

    Calling it again with another name adds a second adapter to the already wrapped layers.
    """
    existing = lora_layers(model)
    modules = dict(model.named_modules())
    for target in config.target_modules:
        if target in existing:
            existing[target].add_adapter(adapter_name, config)
            continue
        module = modules.get(target)
        if not isinstance(module, nn.Linear):
            linears = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear))
            raise LoRAConfigError("target_modules", target, f"the name of an nn.Linear of the model ({', '.join(linears)})")
        parent_name, _, child = target.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, adapter_name, config))
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


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of every layer that has it; the base is not touched."""
    layers = [layer for layer in lora_layers(model).values() if adapter_name in layer.lora_A]
    if not layers:
        raise KeyError(f"the model has no adapter named {adapter_name!r}")
    for layer in layers:
        layer.set_adapter(adapter_name)


def set_inference_scale(model: nn.Module, value: float) -> None:
    """Scale every LoRA layer's delta at inference: 0 gives the base outputs exactly, 1 the trained adapter."""
    layers = list(lora_layers(model).values())
    if any(layer.merged for layer in layers):
        raise LoRAMergeError("an adapter is merged: unmerge it before changing the inference scale")
    for layer in layers:  # an invalid value is refused by the first layer, before any layer changes
        layer.set_inference_scale(value)


def merge(model: nn.Module, adapter_name: str | None = None) -> None:
    """Fold the adapter into the base weights of every LoRA layer; all-or-nothing on non-finite results."""
    layers = list(lora_layers(model).values())
    done = []
    try:
        for layer in layers:
            layer.merge(adapter_name)
            done.append(layer)
    except Exception:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
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
