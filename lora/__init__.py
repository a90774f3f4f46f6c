"""lora: a small pure-PyTorch LoRA library (Hu et al. 2021) for the nn.Linear layers of any model.

config (LoRAConfig) · layer (LoRALinear, wrapping an nn.Linear) · model (inject, freeze, switch, delete,
merge, disable) · save_load (PEFT-compatible adapter files). It needs torch and safetensors, nothing else.
"""
from .config import INIT_METHODS, LoRAConfig, LoRAConfigError
from .layer import LoRALinear, LoRAMergeError
from .model import (
    DEFAULT_ADAPTER,
    active_adapter,
    adapter_state_dict,
    base_state_dict,
    delete_adapter,
    disable_adapter,
    inject,
    lora_layers,
    mark_only_lora_trainable,
    merge,
    set_adapter,
    set_inference_scale,
    trainable_parameters,
    unmerge,
)
from .save_load import AdapterLoadError, base_weights_sha256, load_adapter, read_adapter, save_adapter

__all__ = [
    "DEFAULT_ADAPTER",
    "INIT_METHODS",
    "AdapterLoadError",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRALinear",
    "LoRAMergeError",
    "active_adapter",
    "adapter_state_dict",
    "base_state_dict",
    "base_weights_sha256",
    "delete_adapter",
    "disable_adapter",
    "inject",
    "load_adapter",
    "lora_layers",
    "mark_only_lora_trainable",
    "merge",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "set_inference_scale",
    "trainable_parameters",
    "unmerge",
]
