"""Routing traces: what is recorded per call and how rows are labelled."""
import json

import pytest
import torch

from fera_core.trace import COND, FORMAT, UNCOND, VERSION, RoutingTrace


def call(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, 3, generator=g)
    w = torch.softmax(torch.randn(n, 3, generator=g), 1)
    return e.to(dtype), w.to(dtype)


def test_empty_trace():
    trace = RoutingTrace()
    assert trace.rows() == []
    data = json.loads(trace.to_json())
    assert data["format"] == FORMAT and data["version"] == VERSION and data["rows"] == []
    assert RoutingTrace.from_json(trace.to_json()).rows() == []


def test_rows_per_call_with_sigma_per_row_and_cond_uncond_chunks():
    trace = RoutingTrace()
    e0, w0 = call(4, 0)
    e1, w1 = call(2, 1)
    # ComfyUI batches [cond rows..., uncond rows...] with cond_or_uncond = [0, 1]
    trace.record(e0, w0, sigma=torch.tensor([14.6, 14.6, 3.0, 3.0]), cond_or_uncond=[COND, UNCOND])
    trace.record(e1, w1, sigma=0.5)  # scalar sigma, no cond info
    rows = trace.rows()
    assert len(rows) == 6
    assert [(r["call"], r["row"], r["cond"]) for r in rows] == [
        (0, 0, "cond"), (0, 1, "cond"), (0, 0, "uncond"), (0, 1, "uncond"), (1, 0, None), (1, 1, None)]
    assert [r["sigma"] for r in rows] == pytest.approx([14.6, 14.6, 3.0, 3.0, 0.5, 0.5])
    for r, (e, w) in zip(rows, [(e0[i], w0[i]) for i in range(4)] + [(e1[i], w1[i]) for i in range(2)]):
        assert r["energies"] == pytest.approx(e.tolist()) and r["weights"] == pytest.approx(w.tolist())
    assert json.loads(trace.to_json())["rows"] == json.loads(json.dumps(rows))


def test_uncond_first_and_single_chunk():
    trace = RoutingTrace()
    trace.record(*call(4), sigma=torch.tensor([2.0]), cond_or_uncond=(UNCOND, COND))
    trace.record(*call(3), cond_or_uncond=[COND])
    rows = trace.rows()
    assert [r["cond"] for r in rows] == ["uncond", "uncond", "cond", "cond", "cond", "cond", "cond"]
    assert [r["row"] for r in rows] == [0, 1, 0, 1, 0, 1, 2]
    assert [r["sigma"] for r in rows] == [2.0] * 4 + [None] * 3  # a one-element sigma applies to every row


def test_recording_detaches_and_reads_low_precision():
    trace = RoutingTrace()
    e, w = call(2, dtype=torch.bfloat16)
    w = w.float().requires_grad_(True)
    trace.record(e, w * 2, sigma=torch.tensor([1.0, 2.0], requires_grad=True))
    assert not trace.calls[0].weights.requires_grad and not trace.calls[0].sigma.requires_grad
    rows = trace.rows()
    assert rows[0]["energies"] == pytest.approx(e[0].float().tolist())
    assert rows[1]["weights"] == pytest.approx((w[1] * 2).tolist())
    json.loads(trace.to_json())  # plain floats only


def test_clear():
    trace = RoutingTrace()
    trace.record(*call(2))
    trace.clear()
    assert trace.rows() == []


def test_records_model_routing_of_a_real_step():
    """A trace fed from FeRAModel.prepare_forward holds exactly what the layers were given."""
    from fera_core import FeRAConfig, FeRAModel

    model = torch.nn.ModuleDict({"to_q": torch.nn.Linear(4, 4)})
    fm = FeRAModel(model, FeRAConfig())
    z = torch.randn(2, 4, 16, 16)
    w = fm.prepare_forward(z)
    trace = RoutingTrace()
    trace.record(fm.current_e_t, w, sigma=torch.tensor([7.0, 7.0]), cond_or_uncond=[COND, UNCOND])
    rows = trace.rows()
    assert rows[0]["weights"] == pytest.approx(fm.fera_layers[0].routing_weights[0].tolist())
    assert [r["cond"] for r in rows] == ["cond", "uncond"] and [r["row"] for r in rows] == [0, 0]


def sampled_trace(steps=4, rows=2, percent_of=None):
    """A CFG run as ComfyUI makes it: per step one call of [cond rows, uncond rows], sigma per row."""
    schedule = torch.linspace(10.0, 0.0, steps + 1)
    trace = RoutingTrace(meta={"adapter": "a.safetensors"}, schedule=schedule, percent_of=percent_of)
    for step in range(steps):
        e, w = call(2 * rows, seed=step)
        trace.record(e, w, sigma=schedule[step].expand(2 * rows), cond_or_uncond=[COND, UNCOND], step=step,
                     areas=[0, 1])
    return trace


def test_step_percent_area_and_one_host_copy_after_finish():
    trace = sampled_trace(percent_of=lambda s: 1 - s / 10)
    trace.finish()
    assert all(c.energies is None for c in trace.calls) and len(trace._packed) == 3  # three device tensors
    rows = trace.rows()
    assert [(r["step"], r["row"], r["cond"], r["area"]) for r in rows[:4]] == [
        (0, 0, "cond", 0), (0, 1, "cond", 0), (0, 0, "uncond", 1), (0, 1, "uncond", 1)]
    assert [r["percent"] for r in rows[::4]] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert rows[5]["weights"] == pytest.approx(call(4, seed=1)[1][1].tolist())
    with pytest.raises(ValueError, match="finished"):
        trace.record(*call(2))


def test_step_derived_from_schedule_when_not_recorded():
    """Calls without a step (a sampler that reports no progress) get the schedule interval of their sigma;
    a second evaluation inside an interval (heun-like) belongs to the same step."""
    trace = RoutingTrace(schedule=[10.0, 5.0, 1.0, 0.0])
    for s in (10.0, 7.0, 5.0, 1.0, 0.5):
        trace.record(*call(1), sigma=s)
    assert [r["step"] for r in trace.rows()] == [0, 0, 1, 2, 2]


def test_step_and_mean_weights():
    trace = sampled_trace(percent_of=lambda s: 1 - s / 10)
    rows = trace.rows()
    per_step = trace.step_weights("cond")
    assert [s for s, _, _ in per_step] == [0, 1, 2, 3]
    assert per_step[0][1] == pytest.approx(10.0)
    want = [sum(r["weights"][m] for r in rows[:2]) / 2 for m in range(3)]
    assert per_step[0][2] == pytest.approx(want)
    both = trace.step_weights()
    assert both[1][2] == pytest.approx([sum(r["weights"][m] for r in rows[4:8]) / 4 for m in range(3)])
    # percent window 0.25..0.5 = steps 1 and 2, uncond rows only
    window = [r for r in rows if r["cond"] == "uncond" and r["step"] in (1, 2)]
    assert trace.mean_weights(0.25, 0.5, "uncond") == pytest.approx(
        [sum(r["weights"][m] for r in window) / 4 for m in range(3)])
    assert trace.mean_weights() == pytest.approx([sum(r["weights"][m] for r in rows) / len(rows) for m in range(3)])
    with pytest.raises(ValueError, match="no traced rows"):
        trace.mean_weights(0.8, 0.9)
    with pytest.raises(ValueError, match="cond must be"):
        trace.mean_weights(cond="positive")
    with pytest.raises(ValueError, match="no schedule percents"):
        sampled_trace().mean_weights(0.0, 0.5)


def test_json_and_csv_round_trip():
    trace = sampled_trace(percent_of=lambda s: 1 - s / 10)
    trace.meta["settings"] = {"strength": 1.0}
    rows = trace.rows()
    again = RoutingTrace.from_json(trace.to_json())
    assert again.rows() == rows and again.meta == trace.meta  # floats survive JSON exactly
    csv_rows = RoutingTrace.from_csv(trace.to_csv()).rows()
    assert csv_rows == rows  # repr() of a float parses back to the same float
    no_sigma = RoutingTrace()
    no_sigma.record(*call(2))
    assert RoutingTrace.from_csv(no_sigma.to_csv()).rows() == no_sigma.rows()
    assert no_sigma.rows()[0]["sigma"] is None and no_sigma.rows()[0]["step"] is None
    with pytest.raises(ValueError, match="not a FeRA routing trace"):
        RoutingTrace.from_json('{"rows": []}')
    with pytest.raises(ValueError, match="version 1 is not supported"):
        RoutingTrace.from_json(json.dumps({"format": FORMAT, "version": 1, "rows": []}))
    with pytest.raises(ValueError, match="lacks"):
        RoutingTrace.from_json(json.dumps({"format": FORMAT, "version": VERSION, "rows": [{"call": 0}]}))
    with pytest.raises(ValueError, match="header"):
        RoutingTrace.from_csv("a,b\n1,2\n")


def test_memory_is_bounded_for_long_schedules():
    """1000 CFG steps of a batch of 8 fit; beyond max_calls calls are counted, not kept."""
    trace = RoutingTrace()
    e, w = call(16)
    for step in range(1000):
        trace.record(e, w, sigma=torch.full((16,), 1.0), cond_or_uncond=[COND, UNCOND], step=step)
    trace.finish()
    packed = sum(t.numel() * t.element_size() for t in trace._packed)
    assert packed == 1000 * 16 * (3 + 3 + 1) * 4  # 448 KB: energies, weights and sigma per row, float32
    assert trace.dropped == 0 and len(trace.rows()) == 16000
    small = RoutingTrace(max_calls=5)
    for step in range(12):
        small.record(*call(2), step=step)
    assert len(small.calls) == 5 and small.dropped == 7
    assert json.loads(small.to_json())["dropped_calls"] == 7
