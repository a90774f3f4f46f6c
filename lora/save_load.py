"""Adapter files in PEFT's layout, so ``peft.PeftModel.from_pretrained`` loads them and we load PEFT's.

A directory holds ``adapter_config.json`` (PEFT's LoraConfig fields only, so PEFT loads it without
warnings), ``adapter_model.safetensors`` (tensors named ``base_model.model.<module>.lora_A.weight``) and
``adapter_provenance.json`` (our full LoRAConfig with the exact init, the sha256 of the base weights the
adapter was trained on, and free-form training facts such as the digit). Nothing here unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LoRAConfig, LoRAConfigError
from .files import file_sha256, non_finite, staged, tensors_sha256, weights_problem
from .layer import LoRALinear, LoRAMergeError, adapter_dtype
from .model import DEFAULT_ADAPTER, adapter_state_dict, base_state_dict, inject, lora_layers, target_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROVENANCE_NAME = "adapter_provenance.json"
RECORDED_KEYS = {"lora_config", "base_weights_sha256", "weights_sha256"}  # what a provenance always holds


class AdapterLoadError(ValueError):
    """An adapter file does not fit the model or is damaged; the message names the file and the problem."""


def base_weights_sha256(model: nn.Module) -> str:
    """Hash of the frozen base model's tensors (LoRA tensors excluded)."""
    return tensors_sha256(base_state_dict(model))


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write one adapter's three files into ``directory`` (created if need be; other files in it are left alone,
    as PEFT's ``save_pretrained``). Each file is replaced by one rename, the provenance first: it records the
    weights file's sha256 and the config, so a save cut off between renames is refused on load. Refused while an adapter is
    merged: the base weights are then W + ΔW, and not the base the record must name. Returns the provenance."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: is a file; an adapter is saved as a directory (nothing was written)")
    if clash := sorted(set(info or {}) & RECORDED_KEYS):
        raise ValueError(f"info keys {clash} are recorded by save_adapter itself: other keys are allowed")
    if merged := sorted(name for name, layer in lora_layers(model).items() if layer.merged):
        raise LoRAMergeError(f"{', '.join(merged)}: an adapter is merged into the base weights, which no longer hash as "
                             "the base it was trained on (unmerge restores them only to float rounding): save before "
                             "merging (nothing was written)")
    config = _adapter_config(model, adapter_name)
    tensors = {PEFT_PREFIX + k: v.contiguous().cpu() for k, v in adapter_state_dict(model, adapter_name).items()}
    bad = non_finite(tensors)
    if bad:
        raise ValueError(f"adapter {adapter_name!r} has non-finite values in {bad}; nothing was saved")
    # The provenance is renamed in first: it names the new weights' sha256 and the new config, so a save cut off
    # after it leaves files that disagree with it and are refused on load, even over an adapter PEFT saved.
    names = (PROVENANCE_NAME, WEIGHTS_NAME, CONFIG_NAME)
    with staged() as staging:  # renamed in the order staged
        temporaries = {name: staging.stage(directory / name) for name in names}
        save_file(tensors, temporaries[WEIGHTS_NAME])
        temporaries[CONFIG_NAME].write_text(json.dumps(_peft_config(config), indent=2) + "\n")
        provenance = {"lora_config": config.to_dict(), "base_weights_sha256": base_weights_sha256(model),
                      "weights_sha256": file_sha256(temporaries[WEIGHTS_NAME]), **(info or {})}
        temporaries[PROVENANCE_NAME].write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def read_adapter(directory: str | os.PathLike) -> tuple[LoRAConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check an adapter directory: (config, tensors keyed ``<module>.lora_A.weight``, provenance)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise AdapterLoadError(f"{path}: missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, an integer of over 4300 digits
        raise AdapterLoadError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(f"{config_path}: not a LoRA adapter config (peft_type must be LORA)")
    unsupported = _unsupported_peft_field(raw)
    if unsupported:
        raise AdapterLoadError(f"{config_path}: {unsupported}; such an adapter is refused rather than loaded as plain LoRA")
    try:
        with safe_open(weights_path, framework="pt") as f:
            tensors = {_strip_prefix(k, weights_path): f.get_tensor(k) for k in f.keys()}
    except AdapterLoadError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise AdapterLoadError(f"{weights_path}: not a readable safetensors file ({exc})") from None
    provenance = _read_provenance(directory / PROVENANCE_NAME)
    recorded_sha256 = provenance.get("weights_sha256")
    if recorded_sha256 is not None and recorded_sha256 != (actual := file_sha256(weights_path)):
        raise AdapterLoadError(f"{weights_path}: sha256 {actual[:12]}… is not the {str(recorded_sha256)[:12]}… that "
                               f"{PROVENANCE_NAME} records: the files are from different saves (one cut off?)")
    try:
        config = LoRAConfig(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            use_rslora=raw.get("use_rslora", False),
            target_modules=_target_list(raw["target_modules"]),
            init=provenance.get("lora_config", {}).get("init", "kaiming"),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
        )
    except KeyError as exc:
        raise AdapterLoadError(f"{config_path}: missing key {exc.args[0]!r}") from None
    except ValueError as exc:
        raise AdapterLoadError(f"{config_path}: {exc}") from None
    recorded = provenance.get("lora_config")
    if recorded is not None:
        mismatched = sorted(k for k in ("r", "alpha", "use_rslora") if recorded.get(k) != getattr(config, k))
        mismatched += [k for k in ("rank_pattern", "alpha_pattern") if (recorded.get(k) or {}) != getattr(config, k)]
        targets = recorded.get("target_modules")
        if not isinstance(targets, list) or sorted(map(str, targets)) != sorted(config.target_modules):
            mismatched.append("target_modules")
        if mismatched:
            raise AdapterLoadError(f"{directory / PROVENANCE_NAME}: disagrees with {CONFIG_NAME} on {mismatched}")
    if problem := weights_problem(tensors):
        raise AdapterLoadError(f"{weights_path}: {problem}")
    return config, tensors, provenance


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = DEFAULT_ADAPTER,
    allow_base_mismatch: bool = False,
) -> dict[str, Any]:
    """Add the adapter in ``directory`` to ``model`` as ``adapter_name``: active on a model without adapters;
    otherwise the active one stays, as in PEFT's ``load_adapter``.

    Refuses, by name, a different base (unless ``allow_base_mismatch``), missing, extra or misshapen
    tensors. The model is left unchanged when anything is refused. Returns the stored provenance.
    """
    config, tensors, provenance = read_adapter(directory)
    weights_path = Path(directory) / WEIGHTS_NAME
    if any(tensor.is_meta for tensor in model.state_dict().values()):  # copying into them would keep nothing
        raise AdapterLoadError(f"{weights_path}: the model's weights are on the 'meta' device; an adapter loads into "
                               "a model whose weights are materialised (to_empty() and the base weights first)")
    recorded = provenance.get("base_weights_sha256")
    if recorded and not allow_base_mismatch:
        actual = base_weights_sha256(model)
        if actual != recorded:
            raise AdapterLoadError(
                f"{weights_path}: trained on base weights sha256 {recorded[:12]}…, this model's are {actual[:12]}…; "
                "pass allow_base_mismatch=True to load it anyway"
            )
    modules = dict(model.named_modules())
    try:
        targets = target_names(model, config)
    except LoRAConfigError as exc:
        raise AdapterLoadError(f"{weights_path}: {exc}") from None
    expected = {}
    for target in targets:
        module = modules[target]
        base = module.base_layer if isinstance(module, LoRALinear) else module
        r = config.rank_for(target)
        expected[f"{target}.lora_A.weight"] = (r, base.in_features)
        expected[f"{target}.lora_B.weight"] = (base.out_features, r)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterLoadError(f"{weights_path}: tensors do not match the config: missing {missing}, unexpected {extra}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterLoadError(f"{weights_path}: {key} has shape {tuple(tensors[key].shape)}, expected {shape}")
    for target in targets:  # in the dtype the layer holds them in: a float64 1e300 is infinite in float32
        module = modules[target]
        dtype = adapter_dtype((module.base_layer if isinstance(module, LoRALinear) else module).weight.dtype)
        pair = {key: tensors[f"{target}.{key}.weight"] for key in ("lora_A", "lora_B")}
        delta = config.scaling_for(target) * (pair["lora_B"].double() @ pair["lora_A"].double())
        if bad := non_finite({**pair, "the scaled delta B·A": delta}, dtype):
            raise AdapterLoadError(f"{weights_path}: {target}: {bad[0]} is not finite in {dtype} (the layer's dtype); "
                                   "such an adapter is refused rather than overflowing at inference")
    inject(model, config, adapter_name)
    layers = lora_layers(model)
    with torch.no_grad():
        for target in targets:
            layers[target].lora_A[adapter_name].weight.copy_(tensors[f"{target}.lora_A.weight"])
            layers[target].lora_B[adapter_name].weight.copy_(tensors[f"{target}.lora_B.weight"])
    return provenance


def _read_provenance(path: Path) -> dict[str, Any]:
    """Our provenance file; adapters saved by PEFT have none, which is allowed."""
    if not path.is_file():
        return {}
    try:
        provenance = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise AdapterLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(provenance, dict) or not isinstance(provenance.get("lora_config", {}), dict):
        raise AdapterLoadError(f"{path}: expected a JSON object with a 'lora_config' object")
    return provenance


def _adapter_config(model: nn.Module, adapter_name: str) -> LoRAConfig:
    configs = {layer.configs[adapter_name] for layer in lora_layers(model).values() if adapter_name in layer.configs}
    if not configs:
        raise KeyError(f"the model has no adapter named {adapter_name!r}")
    return next(iter(configs))


def _peft_config(config: LoRAConfig) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": list(config.target_modules),
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "init_lora_weights": _peft_init(config),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


# PEFT LoraConfig fields that change what an adapter computes, with the values plain LoRA has. An adapter
# with any other value would load here and give other outputs than in PEFT, so it is refused.
PLAIN_LORA = {
    "init_lora_weights": lambda v: v in (True, False, "gaussian"),  # others (pissa, olora, …) change the base
    "use_dora": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "modules_to_save": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "layers_to_transform": lambda v: v is None or v == [],
    "layers_pattern": lambda v: not v,
    "lora_bias": lambda v: not v,
    "use_qalora": lambda v: not v,
    "target_parameters": lambda v: not v,
    "exclude_modules": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "megatron_config": lambda v: v is None,
    "alora_invocation_tokens": lambda v: v is None,
    "layer_replication": lambda v: not v,
    "use_bdlora": lambda v: not v,
    "velora_config": lambda v: not v,
    "monteclora_config": lambda v: not v,
    "kasa_config": lambda v: not v,
    "arrow_config": lambda v: not v,
}


def _unsupported_peft_field(raw: dict[str, Any]) -> str | None:
    for field, plain in PLAIN_LORA.items():
        if field in raw and not plain(raw[field]):
            return f"{field}={raw[field]!r} is not supported (plain LoRA has none)"
    targets = raw.get("target_modules")
    if isinstance(targets, str) and not targets.replace("_", "").replace(".", "").isalnum():
        return f"target_modules={targets!r} is a regular expression, which is not supported: a list of module names is"
    return None


def _peft_init(config: LoRAConfig) -> bool | str:
    """PEFT's name for the init, where PEFT has one: its "gaussian" is N(0, 1/r²), so our N(0, 1) at r = 1 too.
    N(0, 1) at any r > 1 has none; PEFT's default is written, and provenance keeps ours."""
    if config.init == "gaussian" or (config.init == "normal" and {config.r, *config.rank_pattern.values()} == {1}):
        return "gaussian"
    return True


def _strip_prefix(key: str, path: Path) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise AdapterLoadError(f"{path}: tensor {key!r} lacks the {PEFT_PREFIX!r} prefix of PEFT's layout")
    return key[len(PEFT_PREFIX):]


def _target_list(targets: Any) -> list[str]:
    # PEFT stores target_modules as a list (order not significant) or a single module name.
    if isinstance(targets, str):
        return [targets]
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return sorted(targets)
    raise ValueError(f"target_modules={targets!r} is invalid: a list of module names is allowed")
