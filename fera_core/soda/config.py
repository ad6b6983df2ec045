"""SODAConfig: which factorisation, which side is rotated, how rotations are split into Kronecker factors.

SODA (Zhang et al., WACV 2025, arXiv 2405.21050) writes a frozen weight as spectrum times basis,
W0 = S B, adds a learned increment to the spectrum and rotates the basis by an orthogonal
R = R_1 (x) R_2 (x) ... . The paper leaves open which side the rotation acts on and how a
dimension is split into factors; the choices made here are the fields below, recorded in every
adapter file so a file always means the same weights.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..config import REFERENCE_TARGETS

SVD, QR = "svd", "qr"
VARIANTS = (SVD, QR)
IN, OUT = "in", "out"  # the rotated side: the weight's input features (W R) or its output features (R W)
SIDES = (IN, OUT)
METHODS = {f"soda-{v}": v for v in VARIANTS}  # the names users type (CLI --method, node inputs)


def balanced_split(n: int) -> list[int]:
    """The default factor sizes of an n x n rotation: [a, n / a] with a the largest divisor <= sqrt(n)
    (320 -> [16, 20], 768 -> [24, 32], 1280 -> [32, 40]), the two-factor split with the fewest
    parameters; [n] when n is prime (one factor: the rotation is a full n x n orthogonal matrix)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return [n] if a == 1 else [a, n // a]


@dataclass
class SODAConfig:
    variant: str = SVD  # "svd": W0 = U diag(s) V^T, tune s; "qr": LQ (side in) / QR (side out), tune diag
    side: str = IN  # which basis is rotated: "in" (V, or LQ's Q: W' = (...) R) or "out" (U, or QR's Q: R (...))
    # Factor sizes by rotated dimension, overriding balanced_split, e.g. {"320": [4, 8, 10]}; JSON keys are strings.
    factor_sizes: dict[str, list[int]] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=lambda: list(REFERENCE_TARGETS))
    match_full_name: bool = True  # targets are module paths or path suffixes (no reference rule to reproduce)
    base_model: str = "unknown"  # model family id the adapter was trained for (fera_core.families)

    @property
    def method(self) -> str:
        return f"soda-{self.variant}"

    @property
    def fecl(self):
        """No frequency-energy consistency loss: SODA has no router, and its paper trains with the plain
        diffusion loss (fera_core.training.step reads this)."""
        return None

    def kron_sizes(self, n: int) -> list[int]:
        return list(self.factor_sizes.get(str(n), balanced_split(n)))

    def validate(self) -> "SODAConfig":
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {self.side!r}")
        if not isinstance(self.factor_sizes, dict):
            raise ValueError(f"factor_sizes must map a dimension to its factor sizes, got {self.factor_sizes!r}")
        for n, sizes in self.factor_sizes.items():
            product = 1
            for s in sizes if isinstance(sizes, list) else [0]:
                product *= s if isinstance(s, int) and not isinstance(s, bool) and s >= 1 else 0
            if not str(n).isdigit() or product != int(n):
                raise ValueError(f"factor sizes {sizes!r} for dimension {n!r}: need positive integers whose "
                                 "product is the dimension")
        self.factor_sizes = {str(n): list(s) for n, s in self.factor_sizes.items()}
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a list of names, got {self.target_modules!r}")
        return self

    def to_dict(self) -> dict:
        return dict(asdict(self), method="soda")

    @classmethod
    def from_dict(cls, data: dict) -> "SODAConfig":
        data = dict(data)
        if data.pop("method", "soda") != "soda":
            raise ValueError("not a SODA config (method is not 'soda')")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}")
        return cls(**data).validate()


def parse_factor_sizes(text: str) -> dict[str, list[int]]:
    """'320=16x20, 640=20x32' -> {'320': [16, 20], '640': [20, 32]} (CLI and node text inputs)."""
    out = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        n, sep, sizes = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[str(int(n))] = [int(s) for s in sizes.lower().split("x")]
        except ValueError:
            raise ValueError(f"factor sizes: {item!r} is not DIM=AxB[xC...], e.g. 320=16x20") from None
    return out
