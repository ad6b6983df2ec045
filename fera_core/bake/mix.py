"""Which fixed expert mix a bake uses: given weights, one expert, the router's own mix for a latent
or band energies, or the mean mix of a traced run. One resolution for the CLI and the ComfyUI node."""
from __future__ import annotations

from ..adapter_file import FeRAAdapter
from ..router import RoutingControls
from ..trace import RoutingTrace
from .lora import router_mix

ROWS = ("all", "cond", "uncond")


def trace_rows(rows: str) -> str | None:
    """A ROWS choice as RoutingTrace selects rows (None: all)."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    return None if rows == "all" else rows


def resolve_mix(adapter: FeRAAdapter, *, mix=None, expert: int | None = None, latent=None, energies=None,
                trace: RoutingTrace | None = None, window: tuple[float, float] = (0.0, 1.0), rows: str = "all",
                temperature: float | None = None) -> tuple[list[float], dict]:
    """(weights, source) for exactly one of mix, expert, latent, energies, trace.

    mix and expert go through the router's controls (normalised, as Apply FeRA uses them); latent
    and energies through the router itself (mean over rows, at `temperature` if given); trace is the
    mean of the traced weights of `rows` in the schedule window. source describes it for the
    file's metadata.
    """
    given = [k for k, v in (("mix", mix), ("expert", expert), ("latent", latent), ("energies", energies),
                            ("trace", trace)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"a bake needs exactly one mix source (mix, expert, latent, energies or trace), got {given}")
    if trace is not None:
        weights = trace.mean_weights(window[0], window[1], trace_rows(rows))
        return weights, {"kind": "trace", "window": list(window), "rows": rows}
    if mix is not None:
        return router_mix(adapter, controls=RoutingControls(mix=list(mix))), {"kind": "mix"}
    if expert is not None:
        controls = RoutingControls.forced(expert, adapter.config.num_experts)
        return router_mix(adapter, controls=controls), {"kind": "expert", "expert": expert}
    controls = RoutingControls(tau=temperature or None)
    if energies is not None:
        energies = [float(e) for e in energies]
        return router_mix(adapter, energies=energies, controls=controls), {"kind": "router", "energies": energies}
    return router_mix(adapter, latent=latent, controls=controls), {"kind": "router", "latent_shape": list(latent.shape)}
