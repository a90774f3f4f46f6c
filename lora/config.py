"""LoRA configuration: rank, scaling, dropout, init, target modules and per-layer rank and alpha patterns,
validated on creation."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any


class LoRAConfigError(ValueError):
    """A LoRA setting is outside what is allowed; the message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        super().__init__(f"{field}={value!r} is invalid: {allowed} is allowed")
        self.field, self.value, self.allowed = field, value, allowed


def is_integer(value: Any) -> bool:
    """An int, not a bool (YAML's true is not a rank of 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite int or float, not a bool; an int too large for a float (10**400) is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


# How A is initialised; B always starts at zero so that ΔW = B·A = 0 before training.
INIT_METHODS = {
    "normal": "A ~ N(0, 1), the seed notebook's choice (std 1.0)",
    "kaiming": "A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); PEFT's default (init_lora_weights=True)",
    "gaussian": "A ~ N(0, (1/r)^2), PEFT's init_lora_weights='gaussian' (std 1/r)",
}


class Pattern(dict):
    """A rank or alpha pattern as a config holds it: read like a dict, never changed, and compared in order,
    since the first key that matches a layer wins."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a LoRAConfig's pattern cannot change: make a new config (dataclasses.replace)")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and list(self.items()) == list(other.items())

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return Pattern, (dict(self),)


MAX_RANK = 2**16  # far above any layer's side here; a typo like r=10**9 is refused before any allocation
MAX_SCALING = 1e4  # alpha/r: the scales that train stay near 1-20; a typo like alpha=1e38 overflows float32 at inference


@dataclass(frozen=True)
class LoRAConfig:
    """Hyper-parameters of one adapter (Hu et al. 2021, arXiv 2106.09685).

    scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023). ``rank_pattern`` and
    ``alpha_pattern`` give some layers another r or alpha, as PEFT's do: a key is a regular expression matched
    against the end of a module's name (``linear2`` matches ``encoder.linear2``); the first key that matches wins.
    A ``target_modules`` name matches a module of that name or ending in ``.<name>``, as in PEFT.
    """

    r: int = 1
    alpha: float = 1.0
    dropout: float = 0.0
    init: str = "normal"
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ()  # names of the nn.Linear modules to adapt, matched as PEFT does; required
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        elif isinstance(targets, (set, frozenset)) and all(isinstance(t, str) for t in targets):
            targets = tuple(sorted(targets))  # a set, as PEFT allows, in a stable order
        elif isinstance(targets, list):
            targets = tuple(targets)
        object.__setattr__(self, "target_modules", targets)  # anything else (a generator, a dict) is refused below
        for name in ("rank_pattern", "alpha_pattern"):
            if isinstance(getattr(self, name), dict):  # a frozen copy: the config must not change with the caller's dict
                object.__setattr__(self, name, Pattern(getattr(self, name)))
        checks = [
            ("r", is_integer(self.r) and self.r >= 1, "an integer >= 1"),
            ("r", not isinstance(self.r, int) or self.r <= MAX_RANK, f"an integer up to {MAX_RANK}"),
            ("alpha", is_finite_number(self.alpha) and self.alpha > 0, "a finite number > 0"),
            ("dropout", is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0, "a number in [0, 1)"),
            ("init", isinstance(self.init, str) and self.init in INIT_METHODS, f"one of {sorted(INIT_METHODS)}"),
            ("use_rslora", isinstance(self.use_rslora, bool), "true or false"),
            ("target_modules", isinstance(self.target_modules, tuple) and bool(self.target_modules)
             and all(isinstance(t, str) and t for t in self.target_modules),
             "a non-empty list of the names of the nn.Linear modules to adapt"),
            ("rank_pattern", _is_pattern(self.rank_pattern, _is_rank),
             f"a mapping of module-name patterns (regular expressions) to integers 1..{MAX_RANK}"),
            ("alpha_pattern", _is_pattern(self.alpha_pattern, lambda v: is_finite_number(v) and v > 0),
             "a mapping of module-name patterns (regular expressions) to finite numbers > 0"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                value = getattr(self, name)
                raise LoRAConfigError(name, list(value) if isinstance(value, tuple) else value, allowed)
        if (largest := self.largest_scaling()) > MAX_SCALING:
            raise LoRAConfigError("scaling", largest, f"alpha/{'sqrt(r)' if self.use_rslora else 'r'} of at most "
                                  f"{MAX_SCALING:.0e} (the largest alpha over the smallest rank the config can give a layer)")

    def __hash__(self) -> int:
        return hash((self.r, self.alpha, self.dropout, self.init, self.use_rslora, self.target_modules,
                     self.rank_pattern, self.alpha_pattern))

    @property
    def scaling(self) -> float:
        """The scaling of a layer that no pattern names."""
        return _scaling(self.alpha, self.r, self.use_rslora)

    def largest_scaling(self) -> float:
        """The largest scaling any layer can get: the largest alpha, patterns included, over the smallest rank."""
        return _scaling(max([self.alpha, *self.alpha_pattern.values()]), min([self.r, *self.rank_pattern.values()]),
                        self.use_rslora)

    def rank_for(self, module_name: str) -> int:
        """r of the layer named ``module_name``: its ``rank_pattern`` entry, else ``r``."""
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        """alpha of the layer named ``module_name``: its ``alpha_pattern`` entry, else ``alpha``."""
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        """The scaling of the layer named ``module_name``, from its own r and alpha."""
        return _scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["rank_pattern"], data["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoRAConfig":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise LoRAConfigError("keys", unknown, f"only {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


def _is_rank(value: Any) -> bool:
    return is_integer(value) and 1 <= value <= MAX_RANK


def _is_pattern(pattern: Any, valid_value: Any) -> bool:
    if not isinstance(pattern, dict):
        return False
    for key, value in pattern.items():
        if not isinstance(key, str) or not key or not valid_value(value):
            return False
        try:
            re.compile(key)
        except re.error:
            return False
    return True


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the key must match the whole name or a dot-separated tail of it.
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r
