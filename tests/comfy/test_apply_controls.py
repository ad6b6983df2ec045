"""What Apply FeRA's settings do to the prediction, in a real ComfyUI (COMFYUI_PATH).

Each expectation is computed by hand, outside nodes/: fera_core's plain layers on the same
ComfyUI modules, with expert weights from a formula written here (the sigma window from the
sigmas ComfyUI hands the model, the controls from their definitions). Every check also shows
that the setting moves the result by far more than the tolerance, so a node or wrapper that
ignores it fails.
"""
import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
from fera_core.trace import RoutingTrace  # noqa: E402
from hand_routing import EFFECT, TOL, HandRouted, softmax_router  # noqa: E402
from tiny_sampling import conds, latents, make_adapter, sample, tiny_patcher  # noqa: E402

apply_fera = pack_module("nodes.routing").apply_fera
nodes = pack_module("nodes.adapter_nodes")


def test_partial_sigma_window_routes_only_the_steps_inside_it(patcher, adapter):
    """Window 0.25-0.75 of a 6-step schedule: experts at steps 2 and 3 only (timesteps ~600 and ~400).

    start = end = 1.0 would prove nothing: ComfyUI maps it to an empty range whichever way the
    comparison points. Measured (ComfyUI 0.3.64): 2.3e-5 from the hand-routed run, 0.15 from the
    unpatched model, 6.6 from FeRA at every step."""
    start, end, steps, strength = 0.25, 0.75, 6, 2.0  # strength: FeRA's effect on the result well above TOL
    sampling = patcher.model.model_sampling
    hi, lo = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)  # sigma falls as percent rises
    router = softmax_router(adapter)
    inside = lambda sigma: ((sigma <= hi) & (sigma >= lo)).float()[:, None]  # noqa: E731

    trace = RoutingTrace()
    got = sample(apply_fera(patcher, adapter, strength, start_percent=start, end_percent=end, trace=trace),
                 steps=steps, denoise=1.0)
    calls = {}
    for row in trace.rows():
        calls.setdefault(row["call"], []).append((row["sigma"], any(w != 0 for w in row["weights"])))
    routed = [all(on for _, on in rows) for rows in calls.values()]
    assert routed == [lo <= rows[0][0] <= hi for rows in calls.values()] == [False, False, True, True, False, False]

    want = HandRouted(patcher.model, adapter, lambda e, s: router(e, s) * strength * inside(s)).sample(
        patcher, steps=steps, denoise=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    full = sample(apply_fera(patcher, adapter, strength), steps=steps, denoise=1.0)
    plain = sample(patcher, steps=steps, denoise=1.0)
    assert (got - full).abs().max() > EFFECT and (got - plain).abs().max() > EFFECT



def test_sigma_window_includes_its_edges(patcher, adapter):
    """A step whose sigma is exactly start's or end's is inside, as in ComfyUI's ControlNet and
    conditioning timestep ranges (lo <= sigma <= hi). The schedule is the two edges, a sigma
    between them and one outside each."""
    import comfy.sample
    import comfy.samplers

    start, end = 0.25, 0.75
    sampling = patcher.model.model_sampling
    sigmas = torch.tensor([sampling.percent_to_sigma(p) for p in (0.1, start, 0.5, end, 0.9)] + [0.0])
    trace = RoutingTrace()
    pos, neg = conds()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    comfy.sample.sample_custom(apply_fera(patcher, adapter, 1.0, start_percent=start, end_percent=end, trace=trace),
                               noise, 5.0, comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latents(),
                               disable_pbar=True, seed=7)
    calls = {}
    for row in trace.rows():
        calls.setdefault(row["call"], []).append((row["sigma"], any(w != 0 for w in row["weights"])))
    assert [rows[0][0] for rows in calls.values()] == sigmas[:-1].tolist()  # the model saw the edges exactly
    assert [all(on for _, on in rows) for rows in calls.values()] == [False, True, True, True, False]

def _expected_route(adapter, case):
    """The expert weights (times strength) each Apply FeRA setting must give, from its definition."""
    n = adapter.config.num_experts
    if case == "temperature":
        return softmax_router(adapter, tau=0.2)
    if case.startswith("force_expert"):  # 0 is an expert too; -1 means none
        return lambda e, _s: torch.eye(n)[NODE_SETTINGS[case]["force_expert"]].expand(e.shape[0], n)
    if case == "mix":  # normalised to sum 1
        return lambda e, _s: torch.tensor([0.25, 0.5, 0.25]).expand(e.shape[0], n)
    if case == "gains":  # after the softmax, not renormalised
        return lambda e, s: softmax_router(adapter)(e, s) * torch.tensor([1.0, 0.0, 2.5])
    if case == "strength":
        return lambda e, s: softmax_router(adapter)(e, s) * 4.0
    raise AssertionError(case)


NODE_SETTINGS = {"temperature": dict(temperature=0.2), "force_expert": dict(force_expert=2),
                 "force_expert_0": dict(force_expert=0), "mix": dict(mix="1; 2, 1"),  # ';' separates too
                 "gains": dict(gains="1, 0, 2.5"), "strength": dict(strength=4.0)}


@pytest.fixture(scope="module")
def router_default(patcher, adapter):
    return sample(nodes.ApplyFeRA.execute(patcher, adapter, 1.0).args[0])


@pytest.mark.parametrize("case", sorted(NODE_SETTINGS))
def test_apply_fera_node_controls_change_the_prediction_as_defined(patcher, adapter, router_default, case):
    settings = dict(strength=1.0) | NODE_SETTINGS[case]
    got = sample(nodes.ApplyFeRA.execute(patcher, adapter, **settings).args[0])
    want = HandRouted(patcher.model, adapter, _expected_route(adapter, case)).sample(patcher)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert (got - router_default).abs().max() > EFFECT, f"{case} has no visible effect: the check would prove nothing"


def _other_latent(rows):
    """Row order with each latent's rows exchanged for the other latent's (2 latents, cond + uncond)."""
    return torch.arange(rows).view(-1, 2).flip(1).reshape(-1)


def _route_by_band(adapter, gain=30.0):
    """A decisive router: expert 0 when e_high - e_low < 0.5, else expert 2. The first step's noisy latents
    measure e = (0.32, 0.15, 0.52) smooth, (0.04, 0.10, 0.85) checkerboard: one on each side."""
    net = adapter.router.net
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net[0].weight[0, 0] = net[0].weight[1, -1] = 1.0
        net[0].weight[0, -1] = net[0].weight[1, 0] = -1.0
        net[0].bias[0], net[0].bias[1] = 0.5, -0.5
        net[2].weight[0, 0] = net[2].weight[2, 1] = gain


@pytest.mark.parametrize("dtype, fraction", [(torch.float16, 0.05), (torch.bfloat16, 0.3)])
def test_half_precision_models_route_each_row_by_its_own_latent(dtype, fraction):
    """A half-precision model: Apply FeRA equals fera_core's hooks on the same half-precision layers,
    to within a fraction of FeRA's effect far below what routing a row by the other latent changes.

    Both sides run the base model identically; what differs is where the experts' update is rounded,
    and half-precision layers downstream amplify that (measured on ComfyUI 0.3.64: 2.4% of the effect
    in fp16, 9% in bf16; routing each row by the other latent: 130%). Strength 4, so that FeRA's
    effect (1.6) stands well above one rounding step of the output (|out| ~60, so ~0.03 in fp16,
    ~0.2 in bf16). A float32 run, even of the same rounded weights, differs from the
    half model by that rounding (0.005 in fp16, 0.05 in bf16), so it cannot serve as reference here.
    Denoise 0.3 keeps the smooth and checkerboard latents apart through the added noise.
    """
    half = tiny_patcher(dtype)
    adapter = make_adapter(half.model)
    _route_by_band(adapter)
    strength, kw = 4.0, dict(denoise=0.3)
    route = lambda e, s: softmax_router(adapter)(e, s) * strength  # noqa: E731
    trace = RoutingTrace()
    got = sample(apply_fera(half, adapter, strength, trace=trace), **kw)
    first = [r["weights"] for r in trace.rows()[:2]]
    assert first[0][0] > 0.9 and first[1][2] > 0.9, first  # the two latents use different experts  # the two latents use different experts
    want = HandRouted(half.model, adapter, route).sample(half, **kw)
    swapped = HandRouted(half.model, adapter, lambda e, s: route(e, s)[_other_latent(len(e))]).sample(half, **kw)
    effect = (want - sample(half, **kw)).abs().max()
    tolerance = fraction * effect
    assert torch.isfinite(got).all()
    assert (swapped - want).abs().max() > 2 * tolerance, "the rows' routings are too alike to tell apart"
    assert (got - want).abs().max() < tolerance
