"""fera_core.schedule: the expert schedule's checks, interpolation, JSON form and device blend (no ComfyUI).
The widget's JavaScript reads the same fixture (tests/js/test_fera_schedule_data.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fera_core.schedule import ExpertSchedule, interp

CASES = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "schedule_cases.json").read_text())


def test_curves_are_linear_between_keyframes_and_hold_beyond_them():
    s = ExpertSchedule.parse({"curves": [[[0.2, 1.0], [0.6, 0.0]], [[0.5, 0.25]], []]})
    # by hand: 1 - (p - 0.2) / 0.4 between 0.2 and 0.6
    assert s.at(0.0) == [1.0, 0.25, None]
    assert s.at(0.3) == pytest.approx([0.75, 0.25, None], abs=1e-15)
    assert s.at(0.5) == pytest.approx([0.25, 0.25, None], abs=1e-15)
    assert s.at(0.9) == [0.0, 0.25, None]
    assert s.drawn == (True, True, False) and not s.empty
    assert ExpertSchedule.parse({"curves": [[], []]}).empty


def test_the_table_is_the_schedule_at_every_percent():
    """Interpolating the union of knots (each curve evaluated there) reproduces every curve."""
    s = ExpertSchedule.parse(CASES["valid"][1])
    knots, values = s.table()
    assert knots == [0.1, 0.3, 0.9]
    assert values == [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0]]
    s = ExpertSchedule.parse(CASES["valid"][0])
    knots, values = s.table()
    for p in np.linspace(0, 1, 101):
        want = [0.0 if v is None else v for v in s.at(p)]
        got = [np.interp(p, knots, [row[m] for row in values]) for m in range(3)]
        assert got == pytest.approx(want, abs=1e-12), p


def test_json_form_round_trips_and_text_is_read_too():
    s = ExpertSchedule.parse(CASES["valid"][0])
    data = s.to_dict()
    assert data["format"] == "fera.expert_schedule" and data["version"] == 1
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert ExpertSchedule.parse(json.dumps(data)) == s


@pytest.mark.parametrize("data, message", [
    ({"curves": [[[0.5, -0.1]], [], []]}, "expert 0, keyframe 0: weight -0.1 is negative"),
    ({"curves": [[], [[0.6, 1], [0.4, 0]]]}, "expert 1: keyframe percents must rise strictly, got [0.6, 0.4]"),
    ({"curves": [[[1.5, 1]]]}, "percent 1.5 is outside 0..1"),
    ({"curves": [[[0.5, float("nan")]]]}, "must be finite"),
    ({"curves": [[[0.5]]]}, "expected [percent, weight], got [0.5]"),
    ({"curves": [[[0.5, True]]]}, "expected [percent, weight]"),
    ({"curves": []}, "needs one curve per expert"),
    ({"curves": [[]], "format": "x"}, "not a FeRA expert schedule"),
    ({"curves": [[]], "version": 2}, "version 2 is not supported"),
    ({"keyframes": []}, 'a FeRA schedule is {"curves"'),
    ("{oops", "not JSON"),
])
def test_bad_schedules_are_refused_with_a_message(data, message):
    with pytest.raises(ValueError) as err:
        ExpertSchedule.parse(data)
    assert message in str(err.value)


def test_expert_count_is_checked():
    s = ExpertSchedule.parse({"curves": [[], []]})
    assert s.check(2) is s
    with pytest.raises(ValueError, match="the schedule has 2 expert curves, the adapter 3 experts"):
        s.check(3)


def test_from_steps_puts_a_keyframe_per_step():
    steps = [{"percent": 0.0, "strengths": [0.9, 0.1]}, {"percent": 0.5, "strengths": [0.4, 0.6]}]
    assert ExpertSchedule.from_steps(steps).curves == (((0.0, 0.9), (0.5, 0.4)), ((0.0, 0.1), (0.5, 0.6)))
    with pytest.raises(ValueError, match="no schedule percents"):
        ExpertSchedule.from_steps([{"percent": None, "strengths": [1.0]}])


def test_interp_is_numpy_interp_on_tensors():
    xp = torch.tensor([0.1, 0.4, 0.5, 0.9], dtype=torch.float64)
    fp = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    x = torch.tensor([0.0, 0.1, 0.25, 0.45, 0.5, 0.7, 0.9, 1.0], dtype=torch.float64)
    want = np.stack([np.interp(x.numpy(), xp.numpy(), fp[:, m].numpy()) for m in range(2)], axis=1)
    np.testing.assert_allclose(interp(x, xp, fp).numpy(), want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(interp(x, xp, fp[:, 0]).numpy(), want[:, 0], rtol=0, atol=1e-15)
    one = interp(x, xp[:1], fp[:1])
    assert one.shape == (8, 2) and (one == fp[0]).all()


def test_device_blend_is_convex_per_row_and_leaves_undrawn_experts_to_the_router():
    s = ExpertSchedule.parse({"curves": [[[0.0, 0.0], [1.0, 1.0]], [[0.5, 0.5]], []]})
    router = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    percent = torch.tensor([0.25, 0.75])
    scheduled = torch.tensor([[0.25, 0.5, 0.0], [0.75, 0.5, 0.0]])
    for blend in (0.0, 0.3, 1.0):
        got = s.on("cpu", blend).mix(router, percent)
        want = (1 - blend) * router + blend * scheduled
        want[:, 2] = router[:, 2]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    assert torch.equal(s.on("cpu", 0.0).mix(router, percent), router)  # blend 0: the router's weights exactly
    assert torch.equal(s.on("cpu", 1.0).mix(router, percent)[:, :2], scheduled[:, :2])
