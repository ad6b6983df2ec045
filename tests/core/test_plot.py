"""Routing plot and band-energy chart: size, not blank, and drawn from the trace's numbers."""
import builtins
import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib", reason="matplotlib draws the FeRA plots (requirements-dev.txt)")

from matplotlib.colors import to_hex  # noqa: E402

from fera_core import plot  # noqa: E402
from fera_core.trace import COND, UNCOND, RoutingTrace  # noqa: E402


def handover_trace(steps=6):
    """Weights hand over from expert 0 to expert 2; uncond rows lag one step; energies move to the fine band."""
    trace = RoutingTrace(meta={"adapter": "demo.safetensors", "settings": {"strength": 0.8, "tau": 0.7}},
                         percent_of=lambda s: 1 - s / 10)
    for step in range(steps):
        a = step / (steps - 1)
        b = max(step - 1, 0) / (steps - 1)
        w = torch.tensor([[1 - a, 0.0, a], [1 - b, 0.0, b]])
        e = torch.tensor([[1 - a, a / 2, a / 2]] * 2)
        trace.record(e, w, sigma=torch.tensor([10.0 - step] * 2), cond_or_uncond=[COND, UNCOND], step=step)
    return trace


def test_plot_size_not_blank_and_title():
    img = plot.plot_routing(handover_trace())
    assert img.dtype == np.uint8 and img.shape == (600, 800, 3)
    assert (img < 128).any() and (img > 250).mean() > 0.3  # lines and text on a white background
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7]}
    assert len(colours) > 50  # several series, legend, text: not a flat picture
    fig = plot.routing_figure(handover_trace())
    assert fig._suptitle.get_text() == "demo.safetensors  strength 0.8  tau 0.7"
    assert plot.routing_figure(handover_trace(), title="mine")._suptitle.get_text() == "mine"


def test_plotted_numbers_are_the_traces():
    trace = handover_trace()
    fig = plot.routing_figure(trace)
    top, bottom = fig.axes[:2]
    lines = {line.get_label(): line for line in top.get_lines()}
    assert set(lines) == {f"expert {m} ({c})" for m in range(3) for c in ("cond", "uncond")}
    assert lines["expert 2 (cond)"].get_linestyle() == "-" and lines["expert 2 (uncond)"].get_linestyle() == "--"
    cond = trace.step_weights("cond")
    uncond = trace.step_weights("uncond")
    np.testing.assert_allclose(lines["expert 2 (cond)"].get_xdata(), [s for s, _, _ in cond])
    np.testing.assert_allclose(lines["expert 2 (cond)"].get_ydata(), [w[2] for _, _, w in cond], rtol=1e-6)
    np.testing.assert_allclose(lines["expert 0 (uncond)"].get_ydata(), [w[0] for _, _, w in uncond], rtol=1e-6)
    # stacked energies: the top of the stack at step 5 is the sum of the bands, the first band is band 0
    fills = bottom.collections
    assert len(fills) == 3
    band0_top = fills[0].get_paths()[0].vertices[:, 1].max()
    assert band0_top == pytest.approx(1.0)  # band 0 holds everything at step 0
    assert top.get_xlim() == bottom.get_xlim()
    assert bottom.get_xlabel() == "sampling step" and "router weight" in top.get_ylabel()


def test_plot_against_sigma_and_save(tmp_path):
    trace = handover_trace()
    fig = plot.routing_figure(trace, x="sigma")
    line = next(line for line in fig.axes[0].get_lines() if line.get_label() == "expert 0 (cond)")
    np.testing.assert_allclose(line.get_xdata(), [10.0 - s for s in range(6)])
    assert fig.axes[1].get_xscale() == "log" and fig.axes[1].xaxis_inverted()
    path = plot.save_routing_plot(trace, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["r.png"]
    with pytest.raises(ValueError, match="x must be"):
        plot.plot_routing(trace, x="time")
    with pytest.raises(ValueError, match="empty"):
        plot.plot_routing(RoutingTrace())


def rgb(hex_colour: str) -> np.ndarray:
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])


def lab(hex_colour: str) -> np.ndarray:
    """CIELAB (D65) of an sRGB colour: distances in it follow what the eye tells apart."""
    c = rgb(hex_colour) / 255
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ lin
    f = np.cbrt(xyz / [0.95047, 1.0, 1.08883])  # every colour here is above the cube-root's linear toe
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_bands_never_share_a_colour_with_experts():
    """Any number of bands (Latent Band Energy allows 16) against all expert colours: none equal, and
    none within 20 CIELAB units (the old live chart's light orange band was 14 from expert 1's orange).
    Band colours darken towards the low frequencies."""
    experts = plot.expert_colors(len(plot.EXPERT_COLORS))
    assert len(set(experts)) == len(experts) and plot.expert_colors(10)[8:] == experts[:2]  # more experts: cycle
    for n in range(1, 17):
        bands = plot.band_colors(n)
        assert len(bands) == n and not set(bands) & set(experts), n
        assert min(np.linalg.norm(lab(b) - lab(e)) for b in bands for e in experts) > 20, n
        lightness = [lab(b)[0] for b in bands]
        assert lightness == sorted(lightness), n
    assert plot.palette(3, 4) == {"experts": experts[:3], "bands": plot.band_colors(4)}


def test_figures_draw_with_the_palette():
    fig = plot.routing_figure(handover_trace())
    top, bottom = fig.axes[:2]
    experts, bands = plot.expert_colors(3), plot.band_colors(3)
    for line in top.get_lines():
        assert line.get_color() == experts[int(line.get_label().split()[1])], line.get_label()
    fills = [to_hex(c.get_facecolor()[0][:3]) for c in bottom.collections]
    assert fills == bands
    legend = [to_hex(h.get_facecolor()[:3]) for h in bottom.get_legend().legend_handles]
    assert legend == bands
    img = plot.plot_band_energies([[0.5, 0.3, 0.2]])
    pixels = img.reshape(-1, 3).astype(int)
    count = lambda colour: int((np.abs(pixels - rgb(colour)).sum(1) <= 3).sum())  # noqa: E731
    assert all(count(b) > 500 for b in bands), [count(b) for b in bands]
    assert all(count(e) == 0 for e in experts), [count(e) for e in experts]


def test_the_web_chart_has_no_copy_of_the_palette():
    """The live chart gets its colours with its data (nodes/tracing.chart_head), the schedule editor with
    its input's definition (nodes/schedule_nodes.keyframes_input): a colour written into the JS would be a
    second palette to keep in step."""
    colours = {c.lower() for c in plot.EXPERT_COLORS + plot.BAND_RAMP}
    scripts = sorted((Path(__file__).resolve().parents[2] / "web").glob("*.js"))
    assert len(scripts) >= 3, scripts  # the chart, the schedule editor and their data modules at least
    for path in scripts:
        found = colours & {c.lower() for c in re.findall(r"#[0-9a-fA-F]{6}\b", path.read_text())}
        assert not found, (path.name, found)


def test_band_energy_chart():
    img = plot.plot_band_energies([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], ["smooth", "noise"], title="bands")
    assert img.shape == (300, 500, 3) and img.dtype == np.uint8 and (img < 128).any()
    # bar lengths are the energies: band 0 pixels span 7x more width in row 0 than in row 1
    mask = (np.abs(img.astype(int) - rgb(plot.band_colors(3)[0])).sum(-1) < 10)
    ys = np.nonzero(mask.any(1))[0]
    rows = [r for r in np.split(ys, np.nonzero(np.diff(ys) > 1)[0] + 1) if len(r) > 10]
    widths = [mask[r].sum(1).max() for r in rows]
    assert widths[0] / widths[1] == pytest.approx(7.0, rel=0.05)


def test_missing_matplotlib_names_the_fix(monkeypatch):
    real = builtins.__import__

    def no_mpl(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    fresh = importlib.reload(plot)  # importing fera_core.plot itself needs no matplotlib
    with pytest.raises(ImportError, match="pip install matplotlib"):
        fresh.plot_routing(handover_trace())
