"""Routing traces: what is recorded per call and how rows are labelled."""
import json

import pytest
import torch

from fera_core.trace import COND, UNCOND, RoutingTrace


def call(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(n, 3, generator=g)
    w = torch.softmax(torch.randn(n, 3, generator=g), 1)
    return e.to(dtype), w.to(dtype)


def test_empty_trace():
    trace = RoutingTrace()
    assert trace.rows() == [] and json.loads(trace.to_json()) == {"version": 1, "rows": []}


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
    assert json.loads(trace.to_json()) == {"version": 1, "rows": json.loads(json.dumps(rows))}


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
