"""Routing traces in a real ComfyUI (COMFYUI_PATH): per-run traces found from the sampler's output,
and the inspection nodes, on a tiny SD1.5-architecture model with random weights."""
import json

import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402

from fera_core import plot  # noqa: E402
from tiny_sampling import conds, make_adapter  # noqa: E402

routing = pack_module("nodes.routing")
tracing = pack_module("nodes.tracing")
inspect = pack_module("nodes.inspect_nodes")
core = pack_module("fera_core")
RoutingTrace = pack_module("fera_core.trace").RoutingTrace


def spectra_noise(seed=7):
    """Row 0: smooth (low-frequency) noise; row 1: white noise. Different spectra at every step."""
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.randn(1, 4, 2, 2, generator=gen), size=(8, 8), mode="bilinear")
    return torch.cat([smooth / smooth.std(), torch.randn(1, 4, 8, 8, generator=gen)])


def run(model, seed=7, steps=4, denoise=1.0, latent=None, cfg=5.0):
    pos, neg = conds()
    latent = torch.zeros(2, 4, 8, 8) if latent is None else latent
    out = comfy.sample.sample(model, spectra_noise(seed), steps, cfg, "euler", "normal", pos, neg, latent,
                              denoise=denoise, seed=seed, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


class Inputs:
    """The latent rows and sigmas the diffusion model receives, seen by a plain torch pre-hook."""

    def __init__(self, model):
        self.seen = []
        self.handle = model.diffusion_model.register_forward_pre_hook(
            lambda _m, args: self.seen.append((args[0].detach().clone(), args[1].detach().clone())))


def test_trace_of_a_cfg_run_with_two_spectra_and_a_window(patcher, adapter):
    """Hand-computed: the rows the model received, their energies, the router with the controls, and the
    weights zeroed outside start/end percent, per step, cond and uncond, row by row."""
    controls = routing.RoutingControls(tau=0.5, gains=[1.0, 2.0, 0.5])
    model = routing.apply_fera(patcher, adapter, 1.0, controls, start_percent=0.2, end_percent=0.5, tracing=True)
    seen = Inputs(patcher.model)
    try:
        out = run(model)
    finally:
        seen.handle.remove()
    (fera,) = routing.routings_of(model)
    found = fera.log.find(out)
    assert found is not None and len(fera.log.runs) == 1
    rows = found.trace.rows()
    sampling = patcher.model.model_sampling
    schedule = comfy.samplers.calculate_sigmas(sampling, "normal", 4)
    hi, lo = sampling.percent_to_sigma(0.2), sampling.percent_to_sigma(0.5)
    assert len(seen.seen) == 4 and len(rows) == 16  # one CFG call per euler step, 2 latents x cond/uncond
    router = adapter.router.float()
    for step, (x, _timestep) in enumerate(seen.seen):
        call = rows[4 * step:4 * step + 4]
        assert {r["step"] for r in call} == {step}  # ComfyUI batches [uncond, cond] or [cond, uncond]
        assert sorted((r["cond"], r["row"]) for r in call) == [("cond", 0), ("cond", 1), ("uncond", 0), ("uncond", 1)]
        assert [r["row"] for r in call] == [0, 1, 0, 1] and call[0]["cond"] != call[2]["cond"]
        e = core.band_energies(x, 3, "partition")
        w = router(e, controls)
        active = bool(lo <= float(schedule[step]) <= hi)
        assert active == (step == 1)  # the window 0.2..0.5 holds the second of four steps only
        for i, r in enumerate(call):
            assert r["sigma"] == pytest.approx(float(schedule[step]), rel=1e-6)
            assert r["energies"] == pytest.approx(e[i].tolist(), abs=1e-6)
            assert r["weights"] == pytest.approx((w[i] if active else torch.zeros(3)).tolist(), abs=1e-6)
            assert sampling.percent_to_sigma(r["percent"]) == pytest.approx(r["sigma"], rel=0.01)
        assert abs(call[0]["energies"][0] - call[1]["energies"][0]) > 0.1  # the two spectra differ
    assert [r["percent"] for r in rows[::4]] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=0.01)
    assert found.trace.meta["settings"] == {"strength": 1.0, "tau": 0.5, "gains": [1.0, 2.0, 0.5],
                                            "percent": [0.2, 0.5]}


def test_requeue_with_a_new_seed_is_a_new_run(patcher, adapter):
    model = routing.apply_fera(patcher, adapter, 1.0, tracing=True)
    first, second = run(model, seed=7), run(model, seed=8)
    (fera,) = routing.routings_of(model)
    a, b = fera.log.find(first), fera.log.find(second)
    assert a is not None and b is not None and a is not b
    assert len(a.trace.rows()) == len(b.trace.rows()) == 16  # replaced, not appended
    assert a.trace.rows()[0]["energies"] != b.trace.rows()[0]["energies"]
    assert fera.log.find(run(model, seed=7)) is not a  # the same seed again: its own, newest run
    assert fera.log.find(first + 1e-3) is None  # a latent changed after sampling is nobody's output


def test_two_samplers_sharing_a_model_are_told_apart(patcher, adapter):
    """A hires-fix-like second pass (denoise 0.5 from the first pass) on the same FeRA model."""
    model = routing.apply_fera(patcher, adapter, 1.0, tracing=True)
    first = run(model, steps=4)
    second = run(model, steps=6, denoise=0.5, latent=first)
    (fera,) = routing.routings_of(model)
    one, two = fera.log.find(first), fera.log.find(second)
    assert one is not two
    assert [r["step"] for r in one.trace.rows()[::4]] == [0, 1, 2, 3]
    assert [r["step"] for r in two.trace.rows()[::4]] == [0, 1, 2, 3, 4, 5]
    assert one.trace.rows()[0]["sigma"] > 5 * two.trace.rows()[0]["sigma"]


def test_fingerprint_survives_device_moves_and_float_casts(patcher, adapter):
    model = routing.apply_fera(patcher, adapter, 1.0, tracing=True)
    out = run(model)
    (fera,) = routing.routings_of(model)
    want = fera.log.find(out)
    for dtype in (torch.float16, torch.bfloat16):
        assert fera.log.find(out.to(dtype)) is want
    assert fera.log.find(out[:1]) is None  # another shape


def test_tracing_changes_nothing_and_keeps_the_callers_callback(patcher, adapter):
    """A traced run gives the untraced run's latent with a seeded ancestral sampler (the seed and the other
    arguments reach the sampler), calls the caller's step callback at every step, and keeps its own
    schedule. Same computation in one process: 1e-6, while another seed moves the latent by O(1).
    Its metadata: no window for the default 0..1, the adapter's indicator."""
    pos, neg = conds()
    steps = {}

    def go(model, key):
        steps[key] = []
        out = comfy.sample.sample(model, spectra_noise(7), 4, 5.0, "euler_ancestral", "normal", pos, neg,
                                  torch.zeros(2, 4, 8, 8), seed=7, disable_pbar=True,
                                  callback=lambda step, *_: steps[key].append(step))
        comfy.model_management.unload_all_models()
        return out

    off = go(routing.apply_fera(patcher, adapter, 1.0, tracing=False), "off")
    model = routing.apply_fera(patcher, adapter, 1.0, tracing=True)
    on = go(model, "on")
    torch.testing.assert_close(on, off, rtol=0, atol=1e-6)
    assert steps["on"] == steps["off"] == [0, 1, 2, 3]
    (fera,) = routing.routings_of(model)
    trace = fera.log.find(on).trace
    sigmas = comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "normal", 4)
    torch.testing.assert_close(trace.schedule.cpu(), sigmas, rtol=0, atol=0)
    assert trace.meta["settings"] == {"strength": 1.0, "tau": adapter.config.router_tau}
    assert trace.meta["indicator"] == adapter.config.indicator and trace.meta["adapter"] == "FeRA adapter (SD1.5)"


def test_tracing_off_records_nothing(patcher, adapter):
    """Outside a prompt with a trace node (here: no server at all) a run makes no TracedRun."""
    model = routing.apply_fera(patcher, adapter, 1.0)
    assert tracing.requested(None) is None and tracing.requested(False) is None
    out = run(model)
    (fera,) = routing.routings_of(model)
    assert len(fera.log.runs) == 0 and fera.log.find(out) is None
    with pytest.raises(ValueError, match="No traced sampling run"):
        inspect.FeRARoutingTrace.execute(model, {"samples": out}, live=False)


def test_trace_plot_save_nodes(patcher, adapter, tmp_path, monkeypatch):
    model = routing.apply_fera(patcher, adapter, 1.0, tracing=True, name="tiny.safetensors")
    out = run(model)
    result = inspect.FeRARoutingTrace.execute(model, {"samples": out}, live=False)
    trace = result.result[0]
    assert isinstance(trace, RoutingTrace) and len(trace.rows()) == 16
    chart = result.ui["fera_trace"][0]
    assert chart["experts"] == 3 and chart["bands"] == 3 and len(chart["rows"]) == 16
    assert chart["colors"] == plot.palette(3, 3)  # the live chart draws with the Routing Plot's colours
    assert chart["title"].startswith("tiny.safetensors  strength 1.0")
    image = inspect.FeRARoutingPlot.execute(trace, "sigma").result[0]
    assert image.shape == (1, 600, 800, 3) and image.dtype == torch.float32 and 0 <= image.min() < image.max() <= 1

    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path))
    saved = [inspect.SaveFeRATrace.execute(trace, "fera/trace").ui["fera_files"] for _ in range(2)]
    names = [f["filename"] for files in saved for f in files]
    assert names == ["trace_00001_.json", "trace_00001_.csv", "trace_00002_.json", "trace_00002_.csv"]
    text = (tmp_path / "fera" / names[0]).read_text()
    assert RoutingTrace.from_json(text).rows() == trace.rows()
    assert RoutingTrace.from_csv((tmp_path / "fera" / names[1]).read_text()).rows() == trace.rows()
    assert sorted(p.name for p in (tmp_path / "fera").iterdir()) == sorted(names)  # no temporary files left

    with pytest.raises(ValueError, match="no FeRA adapter"):
        inspect.FeRARoutingTrace.execute(patcher, {"samples": out}, live=False)
    with pytest.raises(ValueError, match="adapter_index 1"):
        inspect.FeRARoutingTrace.execute(model, {"samples": out}, live=False, adapter_index=1)


def test_chained_adapters_are_traced_separately(patcher, adapter):
    other = make_adapter(patcher.model, seed=5)
    model = routing.apply_fera(routing.apply_fera(patcher, adapter, 1.0, tracing=True), other, 0.5, tracing=True)
    out = run(model)
    first = inspect.FeRARoutingTrace.execute(model, {"samples": out}, live=False).result[0]
    second = inspect.FeRARoutingTrace.execute(model, {"samples": out}, live=False, adapter_index=1).result[0]
    assert first.meta["settings"]["strength"] == 1.0 and second.meta["settings"]["strength"] == 0.5
    assert first.rows()[0]["weights"] != second.rows()[0]["weights"]


def test_latent_band_energy_node():
    gen = torch.Generator().manual_seed(0)
    samples = torch.cat([spectra_noise(), torch.randn(1, 4, 8, 8, generator=gen)])
    for indicator in ("reference", "partition"):
        text, chart = inspect.FeRALatentBandEnergy.execute({"samples": samples}, 4, indicator).result
        data = json.loads(text)
        assert data["indicator"] == indicator and data["num_bands"] == 4
        want = core.band_energies(samples, 4, indicator)
        torch.testing.assert_close(torch.tensor(data["rows"]), want, rtol=0, atol=1e-7)  # the same floats, via JSON
        assert chart.shape == (1, 300, 500, 3)
    assert sum(data["rows"][1]) == pytest.approx(1.0, abs=1e-5)  # partition bands add up
    with pytest.raises(ValueError, match="num_bands"):
        inspect.FeRALatentBandEnergy.execute({"samples": samples}, 0, "reference")
