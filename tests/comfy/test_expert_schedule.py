"""A drawn expert schedule in a real ComfyUI (COMFYUI_PATH): Apply FeRA's schedule and blend, the FeRA
Schedule node, the trace and the bake of a drawn schedule, on a tiny SD1.5-architecture model.

Expectations are computed by hand as in test_apply_controls (hand_routing.py): fera_core's plain hooks on the same ComfyUI
layers with the expert weights from a formula written here, the schedule percent of each call's sigma
found by bisecting ComfyUI's percent_to_sigma (not the pack's table).
"""
import json

import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402

from hand_routing import EFFECT, TOL, HandRouted, softmax_router  # noqa: E402
from hook_replay import hooked_conds, percent_of  # noqa: E402
from tiny_sampling import conds, sample, sample_one  # noqa: E402

nodes = pack_module("nodes.adapter_nodes")
schedule_nodes = pack_module("nodes.schedule_nodes")
bake_nodes = pack_module("nodes.bake_nodes")
routing = pack_module("nodes.routing")
tracing = pack_module("nodes.tracing")
inspect = pack_module("nodes.inspect_nodes")
core_schedule = pack_module("fera_core.schedule")

# experts 0 and 1: two keyframes each (a crossfade between percents 0.25 and 0.75); expert 2: none, the router's
CROSSFADE = {"curves": [[[0.25, 1.0], [0.75, 0.0]], [[0.25, 0.0], [0.75, 1.0]], []]}
CONSTANT = {"curves": [[[0.3, 0.25]], [[0.0, 0.5], [1.0, 0.5]], [[0.9, 0.25]]]}  # = mix "1, 2, 1" normalised


def apply(patcher, adapter, **settings):
    """Apply FeRA's node with its defaults, as a workflow gives them."""
    args = dict(strength=1.0, temperature=0.0, force_expert=-1, mix="", gains="", start_percent=0.0,
                end_percent=1.0) | settings
    return nodes.ApplyFeRA.execute(patcher, adapter, **args).args[0]


def traced(model):
    """(sampled output, the run's trace) of Apply FeRA's model, recorded by the pack's own tracing."""
    fera = routing.routings_of(model)[0]
    fera.tracing = True
    out = sample(model, steps=6, denoise=1.0)
    return out, fera.log.runs[-1].trace.frozen()


def test_blend_0_equals_no_schedule_bit_for_bit(patcher, adapter):
    plain = sample(apply(patcher, adapter), steps=6, denoise=1.0)
    blend0 = sample(apply(patcher, adapter, schedule=CROSSFADE, blend=0.0), steps=6, denoise=1.0)
    assert torch.equal(blend0, plain)
    blended = sample(apply(patcher, adapter, schedule=CROSSFADE, blend=1.0), steps=6, denoise=1.0)
    assert (blended - plain).abs().max() > EFFECT  # the schedule does act: the check above can fail


def test_an_old_workflows_widget_values_run_as_before(patcher, adapter):
    """Apply FeRA's seven widget values of workflows saved before schedule and blend existed."""
    old = nodes.ApplyFeRA.execute(patcher, adapter, 1.0, 0.0, -1, "", "", 0.0, 1.0).args[0]
    assert routing.routings_of(old)[0].schedule is None
    assert torch.equal(sample(old), sample(routing.apply_fera(patcher, adapter, 1.0)))
    empty = apply(patcher, adapter, schedule=json.loads(schedule_nodes.EMPTY), blend=1.0)  # the node's default
    assert torch.equal(sample(empty), sample(old))


def test_blend_1_with_a_constant_schedule_is_the_fixed_mix(patcher, adapter):
    """Gains act after the schedule as after a fixed mix. The weights are the same numbers (0.25, 0.5, 0.25
    are exact), so both runs compute the same; TOL as for any two runs of a model."""
    mixed = sample(apply(patcher, adapter, mix="1, 2, 1", gains="1, 0.5, 2"), steps=6, denoise=1.0)
    drawn = sample(apply(patcher, adapter, schedule=CONSTANT, blend=1.0, gains="1, 0.5, 2"), steps=6, denoise=1.0)
    torch.testing.assert_close(drawn, mixed, rtol=0, atol=TOL)
    router = sample(apply(patcher, adapter, gains="1, 0.5, 2"), steps=6, denoise=1.0)
    assert (router - mixed).abs().max() > EFFECT


def crossfade_route(adapter, patcher, blend):
    """By hand: per row, (1 - blend) * router + blend * schedule for experts 0 and 1, the router for expert 2,
    the schedule interpolated at the row's percent between 0.25 and 0.75 (held outside)."""
    sampling = patcher.model.model_sampling

    def route(energies, sigmas):
        router = softmax_router(adapter)(energies, sigmas)
        fade = torch.tensor([min(max((percent_of(sampling, float(s)) - 0.25) / 0.5, 0.0), 1.0) for s in sigmas])
        drawn = torch.stack([1 - fade, fade, router[:, 2]], dim=1)
        weights = (1 - blend) * router + blend * drawn
        weights[:, 2] = router[:, 2]
        return weights
    return route


def test_a_two_keyframe_schedule_gives_each_step_the_interpolated_mix(patcher, adapter):
    """Six steps of the normal schedule, at percents 0, 0.2, ..., 1: two steps before the first keyframe
    (held), two between the keyframes, two after the last (held). The pack finds a call's percent in a
    1001-point table of percent_to_sigma; at these sigmas it is within 1e-6 of the bisected percent
    (measured), 2e-6 in a weight (slope 1 / 0.5)."""
    blend = 0.5
    got, trace = traced(apply(patcher, adapter, schedule=CROSSFADE, blend=blend))
    route = crossfade_route(adapter, patcher, blend)
    rows = trace.rows()
    percents = sorted({round(r["percent"], 3) for r in rows})
    assert percents == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], percents
    for r in rows:
        want = route(torch.tensor([r["energies"]]), torch.tensor([r["sigma"]]))[0]
        torch.testing.assert_close(torch.tensor(r["weights"]), want, rtol=0, atol=1e-5)
    want = HandRouted(patcher.model, adapter, route).sample(patcher, steps=6, denoise=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    router = sample(apply(patcher, adapter), steps=6, denoise=1.0)
    assert (got - router).abs().max() > EFFECT


def test_the_trace_records_the_blend_and_the_schedule(patcher, adapter):
    _, trace = traced(apply(patcher, adapter, schedule=CROSSFADE, blend=0.3))
    assert trace.meta["schedule"] == core_schedule.ExpertSchedule.parse(CROSSFADE).to_dict()
    assert trace.meta["settings"]["blend"] == 0.3 and "blend 0.3" in trace.meta["title"]
    data = inspect.chart_data("run", trace)  # what the trace node's chart draws
    assert data["schedule"] == trace.meta["schedule"]
    assert [r["percent"] for r in data["rows"]] == [r["percent"] for r in trace.rows()]
    assert "schedule" not in traced(apply(patcher, adapter))[1].meta


def test_the_live_chart_gets_the_schedule_and_each_steps_percent_when_the_run_starts(patcher, adapter,
                                                                                    monkeypatch):
    """A live run's first event carries what the chart needs to draw the schedule ahead of the router: the
    schedule and the percent of every step (within the table's 1e-4 of the bisected percent); a run without
    a schedule sends neither. The events are caught where they would go to ComfyUI's server."""
    sent = []
    monkeypatch.setattr(tracing.TracedRun, "_send", lambda self, kind, **data: sent.append(dict(data, kind=kind)))
    sampling = patcher.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "karras", 5)
    live = tracing.Request(live=True, sid="client")
    fera = routing.routings_of(apply(patcher, adapter, schedule=CROSSFADE, blend=0.5))[0]
    tracing.TracedRun(fera.meta(), live, sigmas, sampling)
    (start,) = sent
    assert start["kind"] == "start" and start["total"] == 5
    assert start["schedule"] == core_schedule.ExpertSchedule.parse(CROSSFADE).to_dict()
    want = [percent_of(sampling, s) for s in sigmas[:-1].tolist()]
    assert start["percents"] == pytest.approx(want, abs=1e-4) and want[1] - want[0] > 0.05
    sent.clear()
    tracing.TracedRun(routing.routings_of(apply(patcher, adapter))[0].meta(), live, sigmas, sampling)
    assert sent[0]["schedule"] is None and sent[0]["percents"] is None


@pytest.mark.parametrize("schedule, blend, message", [
    ({"curves": [[[0.5, -0.2]], [], []]}, 1.0, "expert 0, keyframe 0: weight -0.2 is negative"),
    ({"curves": [[[0.7, 1.0], [0.3, 0.0]], [], []]}, 1.0, "expert 0: keyframe percents must rise strictly"),
    ({"curves": [[], []]}, 1.0, "the schedule has 2 expert curves, the adapter 3 experts"),
    (CROSSFADE, 1.5, "blend must lie in 0..1"),
])
def test_bad_schedules_are_refused_with_a_message(patcher, adapter, schedule, blend, message):
    with pytest.raises(ValueError) as err:
        apply(patcher, adapter, schedule=schedule, blend=blend)
    assert message in str(err.value)
    assert not patcher.object_patches and not patcher.wrappers
    if "keyframe" in message:  # the schedule node refuses it already
        with pytest.raises(ValueError, match=message.split(":")[0]):
            schedule_nodes.FeRASchedule.execute(json.dumps(schedule))


def test_the_schedule_node_checks_its_keyframes_and_offers_the_traced_mix(patcher, adapter):
    text = json.dumps(CROSSFADE)
    out = schedule_nodes.FeRASchedule.execute(text)
    assert out.args[0] == core_schedule.ExpertSchedule.parse(CROSSFADE).to_dict() and not out.ui
    assert json.loads(json.dumps(out.args[0])) == out.args[0]  # plain JSON
    with pytest.raises(ValueError, match="expert 1, keyframe 0: percent 2.0 is outside 0..1"):
        schedule_nodes.FeRASchedule.execute(json.dumps({"curves": [[], [[2.0, 1.0]], []]}))
    _, trace = traced(apply(patcher, adapter))
    preset = schedule_nodes.FeRASchedule.execute(text, trace).ui["fera_schedule_trace"][0]
    steps = trace.step_weights()
    percents = [trace.rows()[0]["percent"]] + [next(r["percent"] for r in trace.rows() if r["step"] == k)
                                               for k, _, _ in steps[1:]]
    assert preset["curves"] == [[[p, w[m]] for p, (_, _, w) in zip(percents, steps)] for m in range(3)]


def test_the_percent_table_inverts_percent_to_sigma(patcher):
    sampling = patcher.model.model_sampling
    assert tracing.percent_table(sampling) is tracing.percent_table(sampling)  # made once per model_sampling
    percent_at = tracing.percent_function(sampling)
    for scheduler in ("normal", "karras"):
        for sigma in comfy.samplers.calculate_sigmas(sampling, scheduler, 20)[:-1].tolist():
            assert abs(percent_at(sigma) - percent_of(sampling, sigma)) < 1e-4, (scheduler, sigma)


class HostReads(torch.Tensor):
    """A tensor that records every read of its values on the host (and so do tensors computed from it)."""
    reads = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__",
                                             "__index__", "__array__"):
            cls.reads.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs or {})


def test_routing_a_call_with_a_schedule_reads_nothing_on_the_host(patcher, adapter):
    """The per-run tables are made when the run starts; a model call only launches device work."""
    fera = routing.routings_of(apply(patcher, adapter, schedule=CROSSFADE, blend=0.5, gains="1, 2, 1"))[0]
    run = fera._new_run(patcher.model.model_sampling)
    router, controls = fera._router_on(run, torch.device("cpu"))
    fera._schedule_on(run, torch.device("cpu"))
    energies = torch.rand(4, 3).as_subclass(HostReads)
    sigma = torch.tensor([14.0, 14.0, 3.0, 3.0]).as_subclass(HostReads)
    HostReads.reads.clear()
    with torch.inference_mode():  # as ComfyUI samples
        weights = fera._route(run, router, controls, energies, sigma)
    assert isinstance(weights, HostReads) and HostReads.reads == []
    float(weights.sum())
    assert HostReads.reads == ["__float__"]  # a read would have been seen


def test_a_drawn_schedule_bakes_to_hook_keyframes_that_replay_apply_fera(patcher, adapter, models_dir, tmp_path,
                                                                           monkeypatch):
    """Apply FeRA with the schedule alone (blend 1) == its bake (per-expert LoRAs and one hook keyframe per
    step, placed as for a traced run) replayed by ComfyUI's own hook nodes, as in test_baked_schedules."""
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    drawn = {"curves": [[[0.0, 1.5], [0.6, 0.2]], [[0.3, 0.0], [1.0, 1.2]], [[0.5, 0.4]]]}
    pos, neg = conds()
    model = apply(patcher, adapter, schedule=drawn, blend=1.0, strength=1.5)
    fera = sample_one(model, pos, neg, 6, "karras")
    sigmas = comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "karras", 6)
    names, text = bake_nodes.BakeFeRAToLoRASchedule.execute(adapter, None, "drawn", 1.5, schedule=drawn,
                                                            model=patcher, sigmas=sigmas).args
    data = json.loads(text)
    percent_at = tracing.percent_function(patcher.model.model_sampling)
    parsed = core_schedule.ExpertSchedule.parse(drawn)
    assert [s["strengths"] for s in data["steps"]] == [parsed.at(percent_at(s)) for s in sigmas[:-1].tolist()]
    workflow = json.loads((tmp_path / "output" / "drawn_00001_workflow.json").read_text())
    hooked = sample_one(patcher, *hooked_conds(workflow, pos, neg), 6, "karras")
    effect, error = (fera - sample_one(patcher, pos, neg, 6, "karras")).abs().max(), (hooked - fera).abs().max()
    assert error < 2e-4 < effect / 100, (float(error), float(effect))
    assert all((models_dir / "loras" / n).is_file() for n in names.split("\n"))


@pytest.mark.parametrize("inputs, message", [
    (dict(schedule=CROSSFADE), "expert 2 has no keyframes"),
    (dict(schedule={"curves": [[[0, 1]]] * 3}), "needs the model and sigmas"),
    (dict(), "needs a trace, or a schedule with the model and sigmas"),
])
def test_bake_refuses_what_it_cannot_place(patcher, adapter, models_dir, inputs, message):
    sigmas = comfy.samplers.calculate_sigmas(patcher.model.model_sampling, "normal", 4)
    given = dict(model=patcher, sigmas=sigmas) if "schedule" in inputs and message.startswith("expert") else {}
    with pytest.raises(ValueError) as err:
        bake_nodes.BakeFeRAToLoRASchedule.execute(adapter, None, "x", 1.0, **inputs, **given)
    assert message in str(err.value)
    assert not list((models_dir / "loras").iterdir())


def test_a_traced_run_with_a_schedule_bakes_what_it_did(patcher, adapter, models_dir, tmp_path, monkeypatch):
    """The trace holds the blended weights, so Bake FeRA to LoRA Schedule replays a scheduled run."""
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    pos, neg = conds()
    model = apply(patcher, adapter, schedule=CROSSFADE, blend=0.6)
    fera = routing.routings_of(model)[0]
    fera.tracing = True
    out = sample_one(model, pos, neg, 6, "karras")
    bake_nodes.BakeFeRAToLoRASchedule.execute(adapter, fera.log.runs[-1].trace.frozen(), "scheduled", 1.0)
    workflow = json.loads((tmp_path / "output" / "scheduled_00001_workflow.json").read_text())
    hooked = sample_one(patcher, *hooked_conds(workflow, pos, neg), 6, "karras")
    assert (hooked - out).abs().max() < 2e-4
