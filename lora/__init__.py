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

# public name -> the module of this package that defines it
_MODULE_OF = {
    **dict.fromkeys(["COMBINATION_TYPES", "add_weighted_adapter"], "combine"),
    **dict.fromkeys(["BASE", "LoRALinear", "LoRAMergeError"], "layer"),
    **dict.fromkeys([
        "DEFAULT_ADAPTER", "active_adapter", "adapter_per_row", "adapter_state_dict", "adapters_of", "base_state_dict",
        "delete_adapter", "disable_adapter", "inject", "lora_layers", "mark_only_lora_trainable", "merge",
        "merge_and_unload", "set_adapter", "set_inference_scale", "trainable_parameters", "unload", "unmerge",
    ], "model"),
    **dict.fromkeys(["AdapterLoadError", "base_weights_sha256", "load_adapter", "read_adapter", "save_adapter"],
                    "save_load"),
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
