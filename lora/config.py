"""LoRA configuration: rank, scaling, dropout, init and target modules, validated on creation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


class LoRAConfigError(ValueError):
    """A LoRA setting is outside what is allowed; the message names the value and the allowed range."""


# How A is initialised; B always starts at zero so that ΔW = B·A = 0 before training.
INIT_METHODS = {
    "normal": "A ~ N(0, 1), the seed notebook's choice (std 1.0)",
    "kaiming": "A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); PEFT's default (init_lora_weights=True)",
    "gaussian": "A ~ N(0, (1/r)^2), PEFT's init_lora_weights='gaussian' (std 1/r)",
}


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of one adapter (Hu et al. 2021, arXiv 2106.09685).

    scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023).
    """

    r: int = 1
    alpha: float = 1.0
    dropout: float = 0.0
    init: str = "normal"
    use_rslora: bool = False
    target_modules: tuple[str, ...] = field(default=("linear1", "linear2", "linear3"))

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, str)):
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            object.__setattr__(self, "target_modules", tuple(targets))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LoRAConfigError(f"lora rank r={self.r!r} is invalid: an integer >= 1 is allowed")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
            math.isfinite(self.alpha) and self.alpha > 0
        ):
            raise LoRAConfigError(f"lora alpha={self.alpha!r} is invalid: a finite number > 0 is allowed")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (
            0.0 <= self.dropout < 1.0
        ):
            raise LoRAConfigError(f"lora dropout={self.dropout!r} is invalid: a number in [0, 1) is allowed")
        if self.init not in INIT_METHODS:
            raise LoRAConfigError(f"lora init={self.init!r} is invalid: one of {sorted(INIT_METHODS)} is allowed")
        if not isinstance(self.use_rslora, bool):
            raise LoRAConfigError(f"lora use_rslora={self.use_rslora!r} is invalid: true or false is allowed")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise LoRAConfigError(
                f"lora target_modules={list(self.target_modules)!r} is invalid: a non-empty list of module names is allowed"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise LoRAConfigError(f"unknown LoRA config keys {unknown}: allowed are {sorted(cls.__dataclass_fields__)}")
        return cls(**data)
