"""FeRAConfig: the reference's fields and defaults, plus what an adapter file must record."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .fecl import FECLSettings
from .indicator import REFERENCE, check_definition

REFERENCE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class FeRAConfig:
    """Hyper-parameters of a FeRA adapter; the first eight fields and their defaults are the reference's."""

    rank: int = 4  # r of each expert's LoRA pair (lora_down r x in, lora_up out x r)
    alpha: float = 1.0  # LoRA alpha: every expert's update is scaled by scale = alpha / rank
    dropout: float = 0.0  # dropout on the experts' input while training (never at sampling)
    num_bands: int = 3  # n: frequency bands the indicator measures and the router reads
    num_experts: int = 3  # M: experts per adapted layer, mixed by the router
    router_tau: float = 0.7  # softmax temperature of the router (lower: one expert dominates)
    # Which layers get experts: child-name substrings (match_full_name False, the reference's rule) or
    # module paths / path suffixes (True).
    target_modules: list[str] = field(default_factory=lambda: list(REFERENCE_TARGETS))
    fecl_weight: float = 0.1  # weight of the frequency-energy consistency loss in training (0: plain MSE)
    router_hidden: int = 64  # width of the router MLP's hidden layer
    # Which indicator definition the router was trained with ("reference": the authors' DoG, finest band
    # dropped; "partition": DCT bands that partition the latent). A router only means something with its own.
    indicator: str = REFERENCE
    # The reference matches target_modules as substrings of a layer's *child* name, so "to_out.0" never
    # matches (the child is "0") and reference files adapt only to_q/k/v. True matches the full dotted
    # path instead; keep False to reproduce reference adapters.
    match_full_name: bool = False
    base_model: str = "unknown"  # model family id the adapter was trained for (fera_core.families)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def fecl(self) -> FECLSettings | None:
        """FECL as the training step adds it; None at weight 0 (plain MSE, no frozen forward)."""
        return FECLSettings(self.fecl_weight, self.num_bands, self.indicator) if self.fecl_weight else None

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
