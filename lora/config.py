"""LoRA configuration: rank, scaling, dropout, init and target modules, validated on creation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


class LoRAConfigError(ValueError):
    """A LoRA setting is outside what is allowed; the message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        super().__init__(f"{field}={value!r} is invalid: {allowed} is allowed")
        self.field, self.value, self.allowed = field, value, allowed


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# How A is initialised; B always starts at zero so that ΔW = B·A = 0 before training.
INIT_METHODS = {
    "normal": "A ~ N(0, 1), the seed notebook's choice (std 1.0)",
    "kaiming": "A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); PEFT's default (init_lora_weights=True)",
    "gaussian": "A ~ N(0, (1/r)^2), PEFT's init_lora_weights='gaussian' (std 1/r)",
}


MAX_RANK = 2**16  # far above any layer's side here; a typo like r=10**9 is refused before any allocation


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
    target_modules: tuple[str, ...] = ()  # the names of the nn.Linear modules to adapt; required

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, str)):
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            object.__setattr__(self, "target_modules", tuple(targets))
        checks = [
            ("r", isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "an integer >= 1"),
            ("r", not isinstance(self.r, int) or self.r <= MAX_RANK, f"an integer up to {MAX_RANK}"),
            ("alpha", _is_number(self.alpha) and self.alpha > 0, "a finite number > 0"),
            ("dropout", _is_number(self.dropout) and 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            ("init", isinstance(self.init, str) and self.init in INIT_METHODS, f"one of {sorted(INIT_METHODS)}"),
            ("use_rslora", isinstance(self.use_rslora, bool), "true or false"),
            ("target_modules", bool(self.target_modules) and all(isinstance(t, str) and t for t in self.target_modules),
             "a non-empty list of the names of the nn.Linear modules to adapt"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = getattr(self, name)
                raise LoRAConfigError(name, list(value) if isinstance(value, tuple) else value, allowed)

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
            raise LoRAConfigError("keys", unknown, f"only {sorted(cls.__dataclass_fields__)}")
        return cls(**data)
