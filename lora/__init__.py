"""lora: a small pure-PyTorch LoRA library (Hu et al. 2021) for the nn.Linear layers of any model.

config (LoRAConfig) · layer (LoRALinear, wrapping an nn.Linear) · model (inject, freeze, switch, delete,
merge, disable, an adapter per batch row, unload) · combine (add_weighted_adapter) · save_load (PEFT-compatible
adapter files). It needs torch and safetensors, nothing else.
"""
from .config import INIT_METHODS, LoRAConfig, LoRAConfigError
from .combine import COMBINATION_TYPES, add_weighted_adapter
from .layer import BASE, LoRALinear, LoRAMergeError
from .model import (
    DEFAULT_ADAPTER,
    active_adapter,
    adapter_per_row,
    adapter_state_dict,
    base_state_dict,
    delete_adapter,
    disable_adapter,
    inject,
    lora_layers,
    mark_only_lora_trainable,
    merge,
    merge_and_unload,
    set_adapter,
    set_inference_scale,
    trainable_parameters,
    unload,
    unmerge,
)
from .save_load import AdapterLoadError, base_weights_sha256, load_adapter, read_adapter, save_adapter

__all__ = [
    "BASE",
    "COMBINATION_TYPES",
    "DEFAULT_ADAPTER",
    "INIT_METHODS",
    "AdapterLoadError",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRALinear",
    "LoRAMergeError",
    "active_adapter",
    "adapter_per_row",
    "adapter_state_dict",
    "add_weighted_adapter",
    "base_state_dict",
    "base_weights_sha256",
    "delete_adapter",
    "disable_adapter",
    "inject",
    "load_adapter",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge",
    "merge_and_unload",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "set_inference_scale",
    "trainable_parameters",
    "unload",
    "unmerge",
]
