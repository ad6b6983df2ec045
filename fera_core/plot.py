"""Pictures of routing traces and band energies, drawn with matplotlib (imported when used).

Figures are built with matplotlib's object API on an Agg canvas: no pyplot, so no global
backend or figure state is touched inside a host application.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .trace import RoutingTrace

STYLES = {"cond": "-", "uncond": "--", None: ":"}
X_LABELS = {"step": "sampling step", "sigma": "sigma (noise level, high to low)"}

# The one palette of every routing picture: these figures and the trace node's live chart, which
# receives the colours with its data (nodes/inspect_nodes.py, nodes/tracing.py) and has no copy.
# Experts are lines in matplotlib's categorical colours (C0..C6, then C9 for the grey C7); bands
# are stacked areas along a dark-to-light ramp (matplotlib's cividis from 0.15 up), lowest
# frequency darkest. No band colour is an expert colour, or near one.
EXPERT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
BAND_RAMP = ("#243c6e", "#545a6d", "#7a7a78", "#a39a74", "#d1bf61", "#fee838")


def expert_colors(n: int) -> list[str]:
    return [EXPERT_COLORS[m % len(EXPERT_COLORS)] for m in range(n)]


def band_colors(n: int) -> list[str]:
    """n colours evenly along BAND_RAMP (linear in RGB between its stops), band 0 the darkest."""
    stops = np.array([[int(h[i:i + 2], 16) for i in (1, 3, 5)] for h in BAND_RAMP], dtype=float)
    at = np.linspace(0, len(BAND_RAMP) - 1, n) if n > 1 else np.zeros(1)
    rgb = [np.interp(at, np.arange(len(BAND_RAMP)), stops[:, c]) for c in range(3)]
    return ["#%02x%02x%02x" % tuple(round(float(channel[k])) for channel in rgb) for k in range(n)]


def palette(num_experts: int, num_bands: int) -> dict:
    """{"experts": [...], "bands": [...]}: the hex colours of a chart with these counts."""
    return {"experts": expert_colors(num_experts), "bands": band_colors(num_bands)}


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("FeRA plots need matplotlib: pip install matplotlib") from err
    return Figure, FigureCanvasAgg


def routing_series(trace: RoutingTrace, x: str = "step") -> dict:
    """What the routing plot draws: {cond label: (xs, weights (S, M), energies (S, n))}, means over the
    rows of each step (cond and uncond rows see the same latent, so their energies agree)."""
    if x not in X_LABELS:
        raise ValueError(f"x must be one of {sorted(X_LABELS)}, not {x!r}")
    series = {}
    for cond in sorted({r["cond"] for r in trace.rows()}, key=lambda c: list(STYLES).index(c)):
        by_step: dict = {}
        for r in trace.rows():
            if r["cond"] == cond:
                by_step.setdefault(r["step"], []).append(r)
        steps = sorted(by_step, key=lambda s: -1 if s is None else s)
        xs = [s if x == "step" else by_step[s][0]["sigma"] for s in steps]
        series[cond] = (np.array(xs, dtype=float),
                        np.array([np.mean([r["weights"] for r in by_step[s]], axis=0) for s in steps]),
                        np.array([np.mean([r["energies"] for r in by_step[s]], axis=0) for s in steps]))
    return series


def title_of(meta: dict) -> str:
    """'adapter.safetensors  strength 1  tau 0.7 ...' from a trace's meta."""
    name = meta.get("adapter", "FeRA")
    settings = "  ".join(f"{k} {v}" for k, v in meta.get("settings", {}).items())
    return f"{name}  {settings}".strip()


def routing_figure(trace: RoutingTrace, title: str = "", x: str = "step", size=(8.0, 6.0), dpi: int = 100):
    """The matplotlib Figure of plot_routing (for tests and notebooks)."""
    Figure, FigureCanvasAgg = _matplotlib()
    series = routing_series(trace, x)
    if not series:
        raise ValueError("the routing trace is empty: nothing to plot")
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    num_experts = next(iter(series.values()))[1].shape[1]
    colors = expert_colors(num_experts)
    for cond, (xs, weights, _) in series.items():
        for m in range(num_experts):
            top.plot(xs, weights[:, m], STYLES[cond], color=colors[m], marker=".",
                     label=f"expert {m}" + (f" ({cond})" if cond else ""))
    top.set_ylabel("router weight\n(after controls)")
    top.set_ylim(-0.02, 1.02)
    top.grid(alpha=0.3)
    top.legend(fontsize="small", ncol=max(1, len(series)), loc="upper right")
    xs, _, energies = series.get("cond", next(iter(series.values())))
    n = energies.shape[1]
    bottom.stackplot(xs, energies.T, labels=[f"band {k}" + (" (lowest freq.)" if k == 0 else
                                                            " (highest)" if k == n - 1 else "") for k in range(n)],
                     colors=band_colors(n), alpha=0.8)
    bottom.set_ylabel("share of latent energy\n(stacked bands)")
    bottom.set_ylim(0, max(1.0, float(energies.sum(1).max())) if len(energies) else 1.0)
    bottom.set_xlabel(X_LABELS[x])
    bottom.legend(fontsize="small", loc="upper right")
    bottom.grid(alpha=0.3)
    if x == "sigma":
        bottom.set_xscale("log")
        bottom.invert_xaxis()
    else:
        bottom.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    fig.suptitle(title or title_of(trace.meta), fontsize="medium")
    return fig


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def plot_routing(trace: RoutingTrace, title: str = "", x: str = "step") -> np.ndarray:
    """(H, W, 3) uint8 image: router weights per expert (cond solid, uncond dashed) and stacked band
    energies against the sampling step (x='step') or sigma (x='sigma')."""
    return _pixels(routing_figure(trace, title, x))


def save_routing_plot(trace: RoutingTrace, path, title: str = "", x: str = "step") -> Path:
    fig = routing_figure(trace, title, x)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_band_energies(energies, labels: list[str] | None = None, title: str = "", size=(5.0, 3.0),
                       dpi: int = 100) -> np.ndarray:
    """(H, W, 3) uint8 image: one stacked bar of band energies per latent row."""
    Figure, FigureCanvasAgg = _matplotlib()
    energies = np.asarray(energies, dtype=float).reshape(len(energies), -1)
    rows, n = energies.shape
    labels = labels or [f"row {i}" for i in range(rows)]
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    left = np.zeros(rows)
    colors = band_colors(n)
    for k in range(n):
        ax.barh(range(rows), energies[:, k], left=left, color=colors[k],
                label=f"band {k}" + (" (lowest freq.)" if k == 0 else " (highest)" if k == n - 1 else ""))
        left += energies[:, k]
    ax.set_yticks(range(rows), labels)
    ax.invert_yaxis()
    ax.set_xlabel("share of latent energy")
    ax.set_xlim(0, max(1.0, float(left.max())))
    ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(n, 4))
    if title:
        ax.set_title(title, fontsize="small")
    return _pixels(fig)
