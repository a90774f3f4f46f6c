"""lora: a small pure-PyTorch LoRA library (Hu et al. 2021) for the nn.Linear layers of any model.

config (LoRAConfig) · layer (LoRALinear, wrapping an nn.Linear) · model (inject, freeze, switch, delete,
merge, disable, an adapter per batch row, unload) · combine (add_weighted_adapter) · save_load (PEFT-compatible
adapter files) · files (atomic writes and hashes). It needs torch and safetensors, nothing else.

The config loads with the package; every other name loads its module on first use (PEP 562), so validating a
configuration (``lora.LoRAConfig``) imports no torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from .config import INIT_METHODS, LoRAConfig, LoRAConfigError

# public name -> the module of this package that defines it (a plain literal: tools/code_deps.py reads it)
_MODULE_OF = {
    "COMBINATION_TYPES": "combine", "add_weighted_adapter": "combine",
    "BASE": "layer", "LoRALinear": "layer", "LoRAMergeError": "layer",
    "DEFAULT_ADAPTER": "model", "active_adapter": "model", "adapter_per_row": "model",
    "adapter_state_dict": "model", "adapters_of": "model", "base_state_dict": "model", "delete_adapter": "model",
    "disable_adapter": "model", "inject": "model", "lora_layers": "model", "mark_only_lora_trainable": "model",
    "merge": "model", "merge_and_unload": "model", "set_adapter": "model", "set_inference_scale": "model",
    "trainable_parameters": "model", "unload": "model", "unmerge": "model",
    "AdapterLoadError": "save_load", "base_weights_sha256": "save_load", "load_adapter": "save_load",
    "read_adapter": "save_load", "save_adapter": "save_load",
}

__all__ = sorted(["INIT_METHODS", "LoRAConfig", "LoRAConfigError", *_MODULE_OF])


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return __all__
