"""FeRAConfig: the reference's fields and defaults, plus what an adapter file must record."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .indicator import REFERENCE, check_definition

REFERENCE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class FeRAConfig:
    """Hyper-parameters of a FeRA adapter.

    The first eight fields and their defaults are the reference's (scale = alpha / rank).
    indicator: which FEI definition the router was trained with ("reference" or "partition").
    match_full_name: the reference matches target_modules as substrings of a layer's *child*
        name, so "to_out.0" never matches (the child is "0") and reference files only adapt
        to_q/k/v. True matches against the full dotted path instead, which fixes that; keep
        False to reproduce reference adapters.
    base_model: the model family the adapter was trained for (sd15, sd2, sdxl, sd3, flux, ...).
    """

    rank: int = 4
    alpha: float = 1.0
    dropout: float = 0.0
    num_bands: int = 3
    num_experts: int = 3
    router_tau: float = 0.7
    target_modules: list[str] = field(default_factory=lambda: list(REFERENCE_TARGETS))
    fecl_weight: float = 0.1
    router_hidden: int = 64
    indicator: str = REFERENCE
    match_full_name: bool = False
    base_model: str = "unknown"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> "FeRAConfig":
        for name in ("rank", "num_bands", "num_experts", "router_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("alpha", "router_tau", "fecl_weight", "dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.router_tau <= 0:
            raise ValueError(f"router_tau must be > 0, got {self.router_tau}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a list of names, got {self.target_modules!r}")
        check_definition(self.indicator)
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeRAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**data).validate()
