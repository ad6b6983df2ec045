"""workflows/inspect_routing.json in a real ComfyUI server and its real frontend (COMFYUI_PATH).

The server, checkpoint and Chromium driver are comfy_server.py's (fixtures: conftest.py). Checked:
- the workflow agrees with /object_info (widgets, link types);
- slow: it runs through /prompt on a random full-size SD1.5 checkpoint; the trace node's output is
  the run's trace (steps x cond/uncond rows), the plot and band chart are saved, the JSON and CSV
  parse back; a re-queue with a new seed shows the new run, not the old one appended; the live
  "fera.trace" events arrive over the websocket, and a workflow without a trace node sends none;
- slow, needs /usr/bin/chromium: queued from the frontend, the chart inside the trace node is drawn
  (a screenshot is written to the temp directory).
"""
import asyncio
import json
import struct
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from fera_core import plot
from comfy_host import PACK_ROOT
from comfy_server import (CHROMIUM, DIALOGS_JS, PACK_DIR_NAME, needs_sd15_adapter, open_frontend, small_prompt, ui_to_api,
                          widget_names)

INSPECT = PACK_ROOT / "workflows" / "inspect_routing.json"
STEPS = 3


def _by_type(prompt: dict) -> dict:
    out = {}
    for node_id, node in prompt.items():
        out.setdefault(node["class_type"], []).append(node_id)
    return out


def inspect_prompt(object_info: dict, ckpt: str, seed=7) -> dict:
    prompt = ui_to_api(json.loads(INSPECT.read_text()), object_info)
    ids = _by_type(prompt)
    prompt[ids["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = ckpt
    prompt[ids["EmptyLatentImage"][0]]["inputs"].update(width=64, height=64, batch_size=1)
    prompt[ids["KSampler"][0]]["inputs"].update(steps=STEPS, seed=seed)
    return prompt


def run_with_events(server, prompt: dict, timeout=1500) -> tuple[dict, list[dict]]:
    """Queue `prompt` as a websocket client would; returns its /history entry and the fera.* events."""
    import aiohttp

    async def go():
        client_id = uuid.uuid4().hex
        events = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url.replace('http', 'ws')}/ws?clientId={client_id}") as ws:
                code, answer = server.post("/prompt", {"prompt": prompt, "client_id": client_id})
                assert code == 200, answer
                prompt_id = answer["prompt_id"]
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    msg = await ws.receive(timeout=timeout)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(msg.data)
                    if data["type"].startswith("fera."):
                        events.append(data)
                    done = data["type"] in ("execution_success", "execution_error") or (
                        data["type"] == "executing" and data["data"].get("node") is None)
                    if done and data["data"].get("prompt_id") == prompt_id:
                        return server.wait(prompt_id), events
        raise AssertionError("prompt did not finish")
    return asyncio.run(go())


def test_inspect_workflow_matches_object_info(object_info):
    wf = json.loads(INSPECT.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["version"] == 0.4 and wf["last_node_id"] >= max(nodes)
    assert {"FeRARoutingTrace", "FeRARoutingPlot", "SaveFeRATrace", "FeRALatentBandEnergy", "ApplyFeRA",
            "KSampler"} <= {n["type"] for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert len(node.get("widgets_values", [])) == len(widget_names(object_info[node["type"]])), node["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert object_info[nodes[src]["type"]]["output"][src_slot] == typ, link_id
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == typ
    # the trace node reads the sampler's model and the sampler's output
    api = ui_to_api(wf, object_info)
    ids = _by_type(api)
    trace = api[ids["FeRARoutingTrace"][0]]["inputs"]
    sampler = api[ids["KSampler"][0]]["inputs"]
    assert trace["model"] == sampler["model"] and trace["latent"] == [ids["KSampler"][0], 0]


@pytest.mark.slow
@needs_sd15_adapter
def test_inspect_workflow_runs_and_requeue_shows_the_new_run(server, object_info, sd15_checkpoint):
    prompt = inspect_prompt(object_info, sd15_checkpoint, seed=7)
    ids = _by_type(prompt)
    entry, events = run_with_events(server, prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs = entry["outputs"]
    chart = outputs[ids["FeRARoutingTrace"][0]]["fera_trace"][0]
    assert chart["title"].startswith("sd15_reference_adapter.pt  strength 1.0")
    assert chart["experts"] == 3 and chart["bands"] == 3
    rows = chart["rows"]
    assert sorted({r["step"] for r in rows}) == list(range(STEPS))
    assert len(rows) == 2 * STEPS and {r["cond"] for r in rows} == {"cond", "uncond"}
    # live events: start, one per step with that step's rows, end; all of this run
    kinds = [e["data"]["kind"] for e in events if e["type"] == "fera.trace"]
    assert kinds == ["start"] + ["step"] * STEPS + ["end"], kinds
    assert len({e["data"]["run"] for e in events}) == 1 and events[0]["data"]["run"] == chart["run"]
    assert events[0]["data"]["node"] == ids["KSampler"][0] and events[0]["data"]["total"] == STEPS
    assert events[0]["data"]["colors"] == chart["colors"] == plot.palette(3, 3)  # the Routing Plot's colours
    live_rows = [r for e in events[1:-1] for r in e["data"]["rows"]]
    assert [(r["step"], r["cond"], r["weights"]) for r in live_rows] == [(r["step"], r["cond"], r["weights"])
                                                                         for r in rows]
    # the plot (800 x 600) and the band chart are images; the trace files parse back
    plot_save = next(k for k in ids["SaveImage"] if prompt[k]["inputs"]["images"][0] == ids["FeRARoutingPlot"][0])
    image = outputs[plot_save]["images"][0]
    data = (server.base / image["type"] / image["subfolder"] / image["filename"]).read_bytes()
    assert image["filename"].startswith("routing") and struct.unpack(">II", data[16:24]) == (800, 600)
    files = outputs[ids["SaveFeRATrace"][0]]["fera_files"]
    texts = [(server.base / "output" / f["subfolder"] / f["filename"]).read_text() for f in files]
    saved = json.loads(texts[0])
    assert saved["format"] == "fera.routing_trace" and saved["version"] == 2
    assert [r["weights"] for r in saved["rows"]] == [r["weights"] for r in rows]
    assert texts[1].splitlines()[0].startswith("call,step,row,cond,area,sigma,percent,energy_0")
    assert len(texts[1].splitlines()) == 1 + len(rows)
    assert outputs[ids["PreviewImage"][0]]["images"]

    again, events2 = run_with_events(server, inspect_prompt(object_info, sd15_checkpoint, seed=8))
    chart2 = again["outputs"][ids["FeRARoutingTrace"][0]]["fera_trace"][0]
    assert chart2["run"] != chart["run"] and len(chart2["rows"]) == 2 * STEPS  # replaced, not appended
    assert chart2["rows"][0]["energies"] != rows[0]["energies"]
    assert [e["data"]["kind"] for e in events2][0] == "start"
    names = [f["filename"] for f in again["outputs"][ids["SaveFeRATrace"][0]]["fera_files"]]
    assert names != [f["filename"] for f in files]  # no collision with the first run's files


@pytest.mark.slow
@needs_sd15_adapter
def test_workflow_without_trace_node_sends_nothing(server, object_info, sd15_checkpoint):
    entry, events = run_with_events(server, small_prompt(object_info, sd15_checkpoint))
    assert entry["status"]["status_str"] == "success"
    assert events == []


@pytest.mark.slow
@needs_sd15_adapter
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_frontend_draws_the_chart_in_the_trace_node(server, object_info, sd15_checkpoint):
    wf = json.loads(INSPECT.read_text())
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            node["widgets_values"][0] = sd15_checkpoint
        elif node["type"] == "EmptyLatentImage":
            node["widgets_values"][:3] = [64, 64, 1]
        elif node["type"] == "KSampler":
            node["widgets_values"][0] = 11
            node["widgets_values"][1] = "fixed"
            node["widgets_values"][2] = STEPS
    browser = open_frontend(server, width=1800, height=1100)
    try:
        browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
        browser.wait_for(f"window.app.graph._nodes.length === {len(wf['nodes'])}", timeout=60)
        time.sleep(1.0)
        assert not browser.eval(DIALOGS_JS)
        trace_id = next(n["id"] for n in wf["nodes"] if n["type"] == "FeRARoutingTrace")
        node_js = f"window.app.graph.getNodeById({trace_id})"
        # the chart widget exists and is not serialised into the workflow
        assert browser.eval(f"!!{node_js}.feraChart")
        saved = json.loads(browser.eval("JSON.stringify(window.app.graph.serialize())"))
        assert next(n for n in saved["nodes"] if n["id"] == trace_id)["widgets_values"] == [True, 0]
        # frame the trace node, then queue from the frontend (its websocket gets the live events)
        browser.eval(f"(() => {{ const n = {node_js}; const c = window.app.canvas;"
                     " c.ds.scale = 1.2; c.ds.offset[0] = -n.pos[0] + 40; c.ds.offset[1] = -n.pos[1] + 60;"
                     " c.setDirty(true, true); })()")
        browser.eval("window.app.queuePrompt(0, 1)")
        browser.wait_for(f"{node_js}.feraChart.run && {node_js}.feraChart.run.done"
                         f" && {node_js}.feraChart.run.steps.size === {STEPS}", timeout=1500)
        time.sleep(1.0)
        drawn = browser.eval(
            f"(() => {{ const c = {node_js}.feraChart.canvas; const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; const seen = new Set();"
            " for (let i = 0; i < d.length; i += 16) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);"
            " return {w: c.width, h: c.height, colours: seen.size}; })()")
        assert drawn["w"] > 200 and drawn["h"] > 100 and drawn["colours"] > 10, drawn
        _bands_and_experts_in_their_own_colours(browser, f"{node_js}.feraChart")
        shot = Path(tempfile.gettempdir()) / f"fera-inspect-{server.port}.png"
        browser.screenshot(shot)
        print(f"\ninspect screenshot: {shot} (chart canvas {drawn})")
        _chart_follows_zoom_dpi_theme_and_hover(browser, f"{node_js}.feraChart")
        assert not [e for e in browser.exceptions if "fera" in json.dumps(e)]
    finally:
        browser.close()


# Per panel of the chart (weights above, energies below), how many canvas pixels have each of the
# run's expert and band colours (within 3 levels per channel: lines are antialiased at their edges).
_PANEL_COLOURS_JS = """(async (chart) => {
  const { layout } = await import(%s);
  const c = chart.canvas, scale = c.width / c.clientWidth, data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const rgb = (h) => [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
  const areas = layout(c.clientWidth, c.clientHeight), out = {};
  for (const [panel, r] of Object.entries(areas)) {
    out[panel] = {};
    for (const kind of ['experts', 'bands']) {
      out[panel][kind] = chart.run.colors[kind].map((h) => {
        const [R, G, B] = rgb(h);
        let n = 0;
        for (let y = Math.ceil(r.y * scale) + 2; y < Math.floor((r.y + r.h) * scale) - 2; y++)
          for (let x = Math.ceil(r.x * scale) + 2; x < Math.floor((r.x + r.w) * scale) - 2; x++) {
            const i = 4 * (y * c.width + x);
            if (Math.abs(data[i] - R) <= 3 && Math.abs(data[i + 1] - G) <= 3 && Math.abs(data[i + 2] - B) <= 3) n++;
          }
        return n;
      });
    }
  }
  return out;
})"""


def _bands_and_experts_in_their_own_colours(browser, chart_js):
    """The live chart draws with fera_core.plot's palette, sent by the server: the band areas are in band
    colours, and no pixel of the energy panel has an expert's colour (the chart once filled the bands
    in the experts' blue, orange and green)."""
    colours = browser.eval(f"{chart_js}.run.colors")
    assert colours == plot.palette(3, 3), colours
    counts = browser.eval(f"{_PANEL_COLOURS_JS % json.dumps(f'/extensions/{PACK_DIR_NAME}/fera_chart_data.js')}"
                          f"({chart_js})")
    print(f"\nchart pixels per colour: {counts}")
    assert counts["energies"]["bands"][0] > 500, counts  # band 0 (low frequencies) holds most of a latent's energy
    assert counts["energies"]["experts"] == [0, 0, 0], counts
    assert sum(counts["weights"]["experts"]) > 50, counts  # the expert lines above


def _chart_follows_zoom_dpi_theme_and_hover(browser, chart_js):
    """Canvas zoom and a 2x screen: the backing store is the on-screen size times the pixel ratio
    (crisp, redrawn). The light theme repaints the background; hovering draws the step's values
    and leaving restores the chart."""
    canvas = f"{chart_js}.canvas"
    sharp = (f"(() => {{ const c = {canvas}; const b = c.getBoundingClientRect();"
             " return Math.abs(c.width - b.width * window.devicePixelRatio) <= 2 && b.width > 50; })()")
    pixels = (f"(() => {{ const c = {canvas}; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
              " let h = 0; for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + d[i + 1] + d[i + 2]) | 0;"
              " const p = c.getContext('2d').getImageData(2, 2, 1, 1).data; return [h, p[0] + p[1] + p[2]]; })()")
    width = browser.eval(f"{canvas}.width")
    browser.eval("(() => { window.app.canvas.ds.scale *= 2; window.app.canvas.setDirty(true, true); })()")
    redraw = "window.app.canvas.setDirty(true, true)"  # per poll: the widget may move after a frame is drawn
    browser.wait_for(f"({redraw}, {canvas}.width > {width} * 1.5 && {sharp})", timeout=20)
    browser.call("Emulation.setDeviceMetricsOverride", width=1800, height=1100, deviceScaleFactor=2, mobile=False)
    browser.wait_for(f"({redraw}, window.devicePixelRatio === 2 && {sharp})", timeout=20)
    _, dark = browser.eval(pixels)
    browser.eval("window.app.extensionManager.setting.set('Comfy.ColorPalette', 'light')")
    browser.wait_for(f"{pixels}[1] > {dark} + 300", timeout=20)  # background: dark grey -> near white
    time.sleep(1.0)  # the palette's remaining variables
    move = (f"(() => {{ const c = {canvas}; const b = c.getBoundingClientRect();"  # the node may have moved
            " c.dispatchEvent(new MouseEvent('mousemove', {clientX: b.left + b.width / 2,"
            " clientY: b.top + b.height / 3, bubbles: true})); })()")
    leave = f"{canvas}.dispatchEvent(new MouseEvent('mouseleave'))"
    seen = []
    for event in (move, leave) * 3:
        browser.eval(event)
        seen.append((browser.eval(f"{chart_js}.hover") is not None, browser.eval(pixels)[0]))
    assert [h for h, _ in seen] == [True, False] * 3
    # from the second pair on (the first may still lay text out with a fallback font):
    # hovering draws the same values each time, and leaving restores the same chart
    assert seen[2][1] != seen[3][1] and seen[2][1] == seen[4][1] and seen[3][1] == seen[5][1]
