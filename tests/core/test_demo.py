"""python -m fera_core demo --quick: its four files, and routing that changes over the sampling run."""
import json
import time

import numpy as np
import pytest
import torch

from fera_core import load_adapter
from fera_core.__main__ import main
from fera_core.demo.model import ASSET, TinyFlowUNet, load_base
from fera_core.trace import RoutingTrace

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    start = time.time()
    try:
        assert main(["demo", "--quick", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, time.time() - start


def test_quick_demo_writes_its_four_files(quick, capsys):
    out, seconds = quick
    names = ["demo_samples.png", "demo_routing.png", "demo_trace.json", "demo_adapter.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    from matplotlib.image import imread
    grid = imread(out / "demo_samples.png")
    assert grid.shape[0] > 300 and grid.shape[1] > 300
    adapter = load_adapter(out / "demo_adapter.safetensors")
    assert adapter.config.indicator == "partition" and len(adapter.layers) == 23  # 12 attention + 11 conv layers
    print(f"\nquick demo: {seconds:.1f} s")  # its time is reported, not asserted: a busy machine doubles it


def test_routing_chart_is_the_plot_nodes_figure(quick):
    from matplotlib.image import imread

    from fera_core.plot import plot_routing
    out, _ = quick
    trace = RoutingTrace.from_json((out / "demo_trace.json").read_text())
    drawn = (imread(out / "demo_routing.png")[..., :3] * 255).round().astype(np.uint8)
    expected = plot_routing(trace, title="FeRA demo: expert weights while sampling")
    assert drawn.shape == expected.shape
    assert np.abs(drawn.astype(int) - expected.astype(int)).mean() < 1.0  # same figure (PNG is lossless)


def test_expert_weights_differ_between_early_and_late_steps(quick):
    """The router hands over as the spectrum of the sample changes: the mean weights of the first and last
    sampling steps differ by more than 0.1 in some expert, while the rows of one step agree closely."""
    out, _ = quick
    trace = json.loads((out / "demo_trace.json").read_text())
    rows = trace["rows"]
    steps = sorted({r["step"] for r in rows})
    first = np.array([r["weights"] for r in rows if r["step"] == steps[0]])
    last = np.array([r["weights"] for r in rows if r["step"] == steps[-1]])
    shift = np.abs(first.mean(0) - last.mean(0)).max()
    assert shift > 0.1, (first.mean(0), last.mean(0))
    assert first.std(0).max() < shift / 2  # at one noise level the rows route alike
    e_first = np.mean([r["energies"] for r in rows if r["step"] == steps[0]], axis=0)
    e_last = np.mean([r["energies"] for r in rows if r["step"] == steps[-1]], axis=0)
    assert e_first[-1] > 0.5 > e_last[-1]  # noise: mostly the finest band; the sample: coarser bands


def test_shipped_model_is_small_and_loads():
    assert ASSET.stat().st_size < 5 * 2**20
    model = load_base()
    assert isinstance(model, TinyFlowUNet) and not any(p.requires_grad for p in model.parameters())


def test_readme_first_command_is_the_demo():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    first = readme.split("```")[1]
    assert first.strip().endswith("python -m fera_core demo") and "torch==2.13.0 -r requirements.txt" in first
