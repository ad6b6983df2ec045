"""web/fera_schedule_data.js against fera_core.schedule on the shared fixture (tests/fixtures/schedule_cases.json):
the widget draws the weights Python routes with, writes text Python reads back unchanged, and refuses what
Python refuses. Runs the module with node (skipped without it)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fera_core.schedule import ExpertSchedule

ROOT = Path(__file__).resolve().parents[2]
CASES = json.loads((ROOT / "tests" / "fixtures" / "schedule_cases.json").read_text())


def _js_values(schedules: list, percents: list) -> list:
    """web/fera_schedule_data.js's valuesAt and serialize(parseSchedule(...)) of each schedule, run by node."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = (f"import * as s from {json.dumps((ROOT / 'web' / 'fera_schedule_data.js').as_uri())};"
              "const [schedules, percents] = JSON.parse(process.argv[1]);"
              "console.log(JSON.stringify(schedules.map((d) => { const r = s.parseSchedule(JSON.stringify(d));"
              " return r.error ? {error: r.error} : {values: percents.map((p) => s.valuesAt(r.schedule, p)),"
              " text: s.serialize(r.schedule)}; })));")
    done = subprocess.run([node, "--input-type=module", "-e", script, json.dumps([schedules, percents])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_javascript_draws_the_same_schedule_and_refuses_the_same_ones():
    percents = CASES["percents"]
    js = _js_values(CASES["valid"] + CASES["invalid"], percents)
    for data, got in zip(CASES["valid"], js):
        s = ExpertSchedule.parse(data)
        assert ExpertSchedule.parse(got["text"]) == s  # what the widget writes, Python reads back unchanged
        for p, values in zip(percents, got["values"]):
            assert values == pytest.approx(s.at(p), abs=1e-12), (data, p)
    for data, got in zip(CASES["invalid"], js[len(CASES["valid"]):]):
        assert "error" in got, data
        with pytest.raises(ValueError):
            ExpertSchedule.parse(data)
