"""The FeRA Schedule editor and the chart's schedule layer in a real ComfyUI server and its real frontend
(COMFYUI_PATH, headless Chromium), and workflows/schedule_fera.json.

The editor is driven with real mouse and key events (DevTools Input.dispatch*), so the browser's own
hit-testing, the DOM widget's place over the graph canvas and ComfyUI's own undo are all involved;
what is checked is the widget value the frontend saves in the workflow.
"""
import json
import tempfile
import time
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT
from comfy_server import (CHROMIUM, DIALOGS_JS, FIRST_RELEASE_WORKFLOWS, MISSING_NODES_JS, PACK_DIR_NAME, open_frontend,
                          ui_to_api, with_added_widgets)
from fera_core.plot import EXPERT_COLORS, palette

SCHEDULE_WORKFLOW = PACK_ROOT / "workflows" / "schedule_fera.json"
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
SHIFT, CTRL = 8, 2  # DevTools modifier bits

# In the page: the schedule node's editor, and client coordinates of a (percent, weight) in its chart.
_HELPERS = """
window.feraTest = {
  data: null,
  node: (id) => window.app.graph.getNodeById(id),
  saved: (id) => JSON.parse(window.app.graph.serialize().nodes.find((n) => Number(n.id) === id).widgets_values[0]),
  async point(id, percent, weight) {
    const d = this.data ??= await import('/extensions/%s/fera_schedule_data.js');
    const ed = this.node(id).feraSchedule, c = ed.canvas, box = c.getBoundingClientRect();
    const at = d.toXY(percent, weight, d.plotArea(c.clientWidth, c.clientHeight), d.weightTop(ed.schedule));
    return {x: box.left + at.x * box.width / c.clientWidth, y: box.top + at.y * box.height / c.clientHeight};
  },
  async pixel(id, percent, weight) {
    const d = this.data ??= await import('/extensions/%s/fera_schedule_data.js');
    const ed = this.node(id).feraSchedule, c = ed.canvas, s = c.width / c.clientWidth;
    const at = d.toXY(percent, weight, d.plotArea(c.clientWidth, c.clientHeight), d.weightTop(ed.schedule));
    return Array.from(c.getContext('2d').getImageData(Math.round(at.x * s), Math.round(at.y * s), 1, 1).data);
  },
  async legend(id, expert) {
    const d = this.data ??= await import('/extensions/%s/fera_schedule_data.js');
    const ed = this.node(id).feraSchedule, c = ed.canvas, box = c.getBoundingClientRect();
    const b = d.legendBoxes(ed.schedule.curves.length, d.plotArea(c.clientWidth, c.clientHeight))[expert];
    return {x: box.left + (b.x + 10) * box.width / c.clientWidth, y: box.top + (b.y + 7) * box.height / c.clientHeight};
  },
};
""" % (PACK_DIR_NAME, PACK_DIR_NAME, PACK_DIR_NAME)

# the canvas's backing store is its on-screen size times the pixel ratio
_SHARP = ("(() => {{ const c = {0}; const b = c.getBoundingClientRect();"
          " return Math.abs(c.width - b.width * window.devicePixelRatio) <= 2 && b.width > 50; }})()")
_PIXELS = ("(() => {{ const c = {0}; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
           " let h = 0; for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + d[i + 1] + d[i + 2]) | 0;"
           " return h; }})()")


def _schedule_node(wf) -> int:
    return next(n["id"] for n in wf["nodes"] if n["type"] == "FeRASchedule")


class Mouse:
    def __init__(self, browser):
        self.browser = browser

    def _event(self, kind, at, button="left", modifiers=0, buttons=0):
        self.browser.call("Input.dispatchMouseEvent", type=kind, x=at["x"], y=at["y"], button=button,
                          buttons=buttons, clickCount=1, modifiers=modifiers)

    def point(self, node_id, percent, weight):
        return self.browser.eval(f"window.feraTest.point({node_id}, {percent}, {weight})")

    def drag(self, start, end, modifiers=0):
        self._event("mousePressed", start, modifiers=modifiers, buttons=1)
        if end is not None:
            middle = {"x": (start["x"] + end["x"]) / 2, "y": (start["y"] + end["y"]) / 2}
            for at in (middle, end):
                self._event("mouseMoved", at, modifiers=modifiers, buttons=1)
        self._event("mouseReleased", end or start, modifiers=modifiers)

    def right_click(self, at):
        self._event("mousePressed", at, button="right", buttons=2)
        self._event("mouseReleased", at, button="right")


def _key(browser, key, code, modifiers):
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, modifiers=modifiers,
                     windowsVirtualKeyCode=ord(key.upper()))


def _open_schedule_workflow(server, **window):
    browser = open_frontend(server, **window)
    wf = json.loads(SCHEDULE_WORKFLOW.read_text())
    browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
    browser.wait_for(f"window.app.graph.nodes.length === {len(wf['nodes'])}", timeout=60)
    time.sleep(1.0)
    assert not browser.eval(DIALOGS_JS) and browser.eval(MISSING_NODES_JS) == []
    browser.eval(_HELPERS)
    return browser, wf


def _frame(browser, node_js, scale=1.0):
    """Show the node at the canvas's top left at this zoom."""
    browser.eval(f"(() => {{ const n = {node_js}; const c = window.app.canvas; c.ds.scale = {scale};"
                 " c.ds.offset[0] = -n.pos[0] + 60; c.ds.offset[1] = -n.pos[1] + 80; c.setDirty(true, true); })()")
    time.sleep(0.5)


def test_schedule_workflow_wires_the_trace_into_the_schedule_and_the_schedule_into_apply(object_info):
    """The workflow's own wiring (test_server checks every workflow's nodes, widgets and links against
    /object_info): the router's run, its trace as the schedule's start, the scheduled run with its chart."""
    wf = json.loads(SCHEDULE_WORKFLOW.read_text())
    api = ui_to_api(wf, object_info)
    by_type = {}
    for node_id, node in api.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (schedule,) = by_type["FeRASchedule"]
    keyframes = json.loads(api[schedule]["inputs"]["keyframes"])
    assert keyframes["format"] == "fera.expert_schedule" and all(keyframes["curves"])
    router, drawn = sorted(by_type["ApplyFeRA"], key=lambda k: "schedule" in api[k]["inputs"])
    assert api[drawn]["inputs"]["schedule"] == [schedule, 0] and 0 < api[drawn]["inputs"]["blend"] < 1
    traces = {api[t]["inputs"]["model"][0]: t for t in by_type["FeRARoutingTrace"]}
    assert api[schedule]["inputs"]["trace"] == [traces[router], 0]  # "start from what the router did"
    assert drawn in traces  # the scheduled run's chart shows the schedule under the router's lines


def test_schedule_node_runs_from_the_api_and_refuses_bad_keyframes(server):
    keyframes = json.dumps({"curves": [[[0.0, 1.0], [1.0, 0.0]], [], [[0.5, 0.3]]]})
    entry = server.run_prompt({"1": {"class_type": "FeRASchedule", "inputs": {"keyframes": keyframes}}})
    assert entry["status"]["status_str"] == "success", entry["status"]
    bad = json.dumps({"curves": [[[0.5, -0.5]], [], []]})
    entry = server.run_prompt({"1": {"class_type": "FeRASchedule", "inputs": {"keyframes": bad}}})
    errors = [d for kind, d in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and "weight -0.5 is negative" in errors[0]["exception_message"], entry["status"]


@pytest.mark.slow
@needs_chromium
def test_editor_edits_with_the_mouse_undoes_and_round_trips(server):
    browser, wf = _open_schedule_workflow(server, width=1600, height=1000)
    node_id = _schedule_node(wf)
    node_js = f"window.feraTest.node({node_id})"
    saved = lambda: browser.eval(f"window.feraTest.saved({node_id})")["curves"]  # noqa: E731
    mouse = Mouse(browser)
    try:
        _frame(browser, node_js)
        start = saved()
        assert start == json.loads(next(n for n in wf["nodes"] if n["id"] == node_id)["widgets_values"][0])["curves"]
        # the experts in fera_core.plot's colours (the chart's and the Routing Plot's), sent with the input's
        # definition: the middle of expert 0's keyframe at (0, 1) and of expert 1's at (0.5, 1)
        assert browser.eval(f"{node_js}.feraSchedule.expertColors") == list(EXPERT_COLORS)
        for m, (p, w) in enumerate([(0, 1), (0.5, 1)]):
            want = [int(EXPERT_COLORS[m][i:i + 2], 16) for i in (1, 3, 5)]
            got = browser.eval(f"window.feraTest.pixel({node_id}, {p}, {w})")
            assert max(abs(a - b) for a, b in zip(got, want)) <= 3, (m, got, want)

        # add: a press on empty chart space adds a keyframe to the active expert (0), snapped to 0.05
        mouse.drag(mouse.point(node_id, 0.352, 0.96), None)
        after_add = saved()
        assert after_add[0] == [[0, 1], [0.35, 0.95], [0.5, 0]] and after_add[1:] == start[1:], after_add
        # drag: it follows the mouse, snapped; with Shift held, not snapped
        mouse.drag(mouse.point(node_id, 0.35, 0.95), mouse.point(node_id, 0.42, 0.6))
        assert saved()[0] == [[0, 1], [0.4, 0.6], [0.5, 0]]
        mouse.drag(mouse.point(node_id, 0.4, 0.6), mouse.point(node_id, 0.433, 0.612), modifiers=SHIFT)
        (p, w) = saved()[0][1]
        assert abs(p - 0.433) < 0.005 and abs(w - 0.612) < 0.01 and (p, w) != (0.45, 0.6), (p, w)
        dragged = saved()
        # delete: right-click on it
        mouse.right_click(mouse.point(node_id, p, w))
        assert saved()[0] == [[0, 1], [0.5, 0]]
        # ComfyUI's own undo, one edit per Ctrl+Z, and redo
        _key(browser, "z", "KeyZ", CTRL)
        browser.wait_for(f"JSON.stringify(window.feraTest.saved({node_id}).curves) === {json.dumps(json.dumps(dragged, separators=(',', ':')))}", timeout=20)
        _key(browser, "z", "KeyZ", CTRL)
        browser.wait_for(f"window.feraTest.saved({node_id}).curves[0][1][0] === 0.4", timeout=20)
        assert browser.eval(f"window.feraTest.node({node_id}).feraSchedule.schedule.curves[0][1]") == [0.4, 0.6]
        _key(browser, "z", "KeyZ", CTRL | SHIFT)
        browser.wait_for(f"window.feraTest.saved({node_id}).curves[0][1][0] !== 0.4", timeout=20)
        assert saved() == dragged

        # a press on a curve adds a keyframe on it (its value there); the legend picks the active expert
        mouse.drag(mouse.point(node_id, 0.25, 0.5), None)
        assert [0.25, 0.5] in saved()[1] and len(saved()[1]) == 4
        mouse.drag(browser.eval(f"window.feraTest.legend({node_id}, 2)"), None)
        mouse.drag(mouse.point(node_id, 0.8, 0.75), None)
        assert saved()[2] == [[0.5, 0], [0.8, 0.75], [1, 1]]

        # numbers: the selected keyframe (the one just added) takes a typed weight, as one undo step
        browser.eval(f"(() => {{ const i = {node_js}.feraSchedule.inputs.weight; i.value = '0.123';"
                     " i.dispatchEvent(new Event('change')); })()")
        assert saved()[2][1] == [0.8, 0.123]
        _key(browser, "z", "KeyZ", CTRL)
        browser.wait_for(f"window.feraTest.saved({node_id}).curves[2][1][1] === 0.75", timeout=20)

        # presets: structure then texture; the traced mix once the node has run with a trace
        pick = ("(() => {{ const s = {0}.feraSchedule.inputs.preset; s.value = '{1}';"
                " s.dispatchEvent(new Event('change')); return s.querySelector('option[value=trace]').disabled; }})()")
        assert browser.eval(pick.format(node_js, "structure")) is True
        assert saved() == [[[0, 1], [0.5, 0]], [[0, 0], [0.5, 1], [1, 0]], [[0.5, 0], [1, 1]]]
        traced = {"format": "fera.expert_schedule", "version": 1,
                  "curves": [[[0.01, 0.7], [0.6, 0.2]], [[0.01, 0.2], [0.6, 0.5]], [[0.01, 0.1], [0.6, 0.3]]]}
        browser.eval(f"{node_js}.onExecuted({{fera_schedule_trace: [{json.dumps(traced)}]}})")
        assert browser.eval(pick.format(node_js, "trace")) is False
        assert saved() == traced["curves"]

        # save -> load: the same keyframes, and the prompt sends them as the node's input
        workflow = browser.eval("JSON.stringify(window.app.graph.serialize())")
        browser.eval("window.app.graph.clear()")
        browser.eval(f"window.app.loadGraphData({workflow})")
        browser.wait_for(f"!!window.feraTest.node({node_id})?.feraSchedule", timeout=30)
        assert saved() == traced["curves"]
        prompt = json.loads(browser.eval("window.app.graphToPrompt().then(p => JSON.stringify(p.output))"))
        assert json.loads(prompt[str(node_id)]["inputs"]["keyframes"])["curves"] == traced["curves"]
        entry = server.run_prompt({"1": {"class_type": "FeRASchedule",
                                         "inputs": {"keyframes": prompt[str(node_id)]["inputs"]["keyframes"]}}})
        assert entry["status"]["status_str"] == "success", entry["status"]

        shot = Path(tempfile.gettempdir()) / f"fera-schedule-editor-{server.port}.png"
        browser.screenshot(shot)
        print(f"\nschedule editor screenshot: {shot}")
        _editor_follows_zoom_and_pixel_ratio(browser, node_id, mouse)
        assert not [e for e in browser.exceptions if "fera" in json.dumps(e)]
    finally:
        browser.close()


def _editor_follows_zoom_and_pixel_ratio(browser, node_id, mouse):
    """Canvas zoom and a 2x screen: the backing store is the on-screen size times the pixel ratio, redrawn,
    and a press still lands on the keyframe under the pointer."""
    canvas = f"window.feraTest.node({node_id}).feraSchedule.canvas"
    redraw = "window.app.canvas.setDirty(true, true)"  # per poll: the widget may move after a frame is drawn
    width, before = browser.eval(f"{canvas}.width"), browser.eval(_PIXELS.format(canvas))
    _frame(browser, f"window.feraTest.node({node_id})", scale=2.0)
    browser.wait_for(f"({redraw}, {canvas}.width > {width} * 1.5 && {_SHARP.format(canvas)})", timeout=20)
    browser.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=2, mobile=False)
    browser.wait_for(f"({redraw}, window.devicePixelRatio === 2 && {_SHARP.format(canvas)})", timeout=20)
    assert browser.eval(_PIXELS.format(canvas)) != before
    keys = browser.eval(f"window.feraTest.saved({node_id}).curves[1]")
    p, w = keys[1]  # drag expert 1's middle keyframe by a small step at this zoom
    mouse.drag(mouse.point(node_id, p, w), mouse.point(node_id, p + 0.1, w - 0.2))
    moved = browser.eval(f"window.feraTest.saved({node_id}).curves[1]")
    assert moved[1] == [round(p + 0.1, 4), round(w - 0.2, 4)] and moved[0] == keys[0], (keys, moved)


def _trace_output(schedule):
    """A finished trace node output (FeRARoutingTrace's ui) of a 5-step run, router weights steady at 1/3."""
    rows = [{"step": k, "sigma": 10.0 - 2 * k, "percent": k / 4, "cond": "cond", "row": 0,
             "energies": [0.5, 0.3, 0.2], "weights": [1 / 3] * 3} for k in range(5)]
    return {"run": "r", "node": None, "title": "test", "experts": 3, "bands": 3, "colors": palette(3, 3),
            "schedule": schedule, "rows": rows}


@pytest.mark.slow
@needs_chromium
def test_chart_draws_the_schedule_and_old_workflows_load(server, object_info):
    browser, wf = _open_schedule_workflow(server, width=1800, height=1100)
    try:
        trace_id = next(n["id"] for n in wf["nodes"] if n["type"] == "FeRARoutingTrace")
        node_js = f"window.feraTest.node({trace_id})"
        _frame(browser, node_js, scale=1.2)
        canvas = f"{node_js}.feraChart.canvas"
        show = lambda schedule: browser.eval(  # noqa: E731
            f"(() => {{ {node_js}.onExecuted({{fera_trace: [{json.dumps(_trace_output(schedule))}]}});"
            f" return {_PIXELS.format(canvas)}; }})()")
        plain = show(None)
        schedule = {"format": "fera.expert_schedule", "version": 1, "curves": [[[0, 1], [1, 0]], [], []]}
        drawn = show(schedule)
        assert drawn != plain and show(None) == plain
        # the schedule's line, at step 1 (percent 0.25, weight 0.75), is drawn in expert 0's colour at 40% over
        # the panel (the router's lines are at 1/3 here)
        show(schedule)
        colour = browser.eval(
            f"(async () => {{ const d = await import('/extensions/{PACK_DIR_NAME}/fera_chart_data.js');"
            f" const c = {canvas}, s = c.width / c.clientWidth, run = {node_js}.feraChart.run;"
            " const rect = d.layout(c.clientWidth, c.clientHeight).weights;"
            " const x = d.stepX(run, 1, rect) * s, y = d.valueY(0.75, rect) * s;"
            " return Array.from(c.getContext('2d').getImageData(Math.round(x), Math.round(y), 1, 1).data); })()")
        background = browser.eval(f"Array.from({canvas}.getContext('2d').getImageData(3, 3, 1, 1).data)")
        want = [0.4 * int(EXPERT_COLORS[0][i:i + 2], 16) + 0.6 * b for i, b in zip((1, 3, 5), background)]
        assert max(abs(a - b) for a, b in zip(colour, want)) <= 4, (colour, want, background)
        shot = Path(tempfile.gettempdir()) / f"fera-schedule-chart-{server.port}.png"
        browser.screenshot(shot)
        print(f"\nchart with a schedule: {shot}")

        # the first release's workflows (before Apply FeRA's schedule and blend, and before the schedule bake's
        # trace became optional): they load, blend gets its default, and each prompts as it did, links included
        for path in FIRST_RELEASE_WORKFLOWS:
            old = json.loads(path.read_text())
            if not {"ApplyFeRA", "BakeFeRAToLoRASchedule"} & {n["type"] for n in old["nodes"]}:
                continue
            browser.eval(f"window.app.loadGraphData({json.dumps(old)})")
            browser.wait_for(f"window.app.graph.nodes.length === {len(old['nodes'])}", timeout=60)
            time.sleep(1.0)
            assert not browser.eval(DIALOGS_JS) and browser.eval(MISSING_NODES_JS) == [], path.name
            for node in (n for n in old["nodes"] if n["type"] == "ApplyFeRA"):
                seen = browser.eval(f"window.app.graph.getNodeById({node['id']}).widgets.map(w => w.value)")
                assert seen == [*node["widgets_values"], 1], (path.name, seen)
            api = json.loads(browser.eval("window.app.graphToPrompt().then(p => JSON.stringify(p.output))"))
            assert api == ui_to_api(with_added_widgets(old, object_info), object_info), path.name
        assert not [e for e in browser.exceptions if "fera" in json.dumps(e)]
    finally:
        browser.close()
