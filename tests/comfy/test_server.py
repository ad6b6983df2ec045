"""The pack inside a real ComfyUI server (COMFYUI_PATH), driven over HTTP like a user's frontend.

The pack is installed as a symlink in the server's custom_nodes, as a user would install it. Checked:
- the server log shows the pack loaded, with no import error or traceback from it;
- /object_info lists the pack's nodes in category FeRA, with a tooltip on every input and output;
- every workflow in workflows/ uses only nodes this ComfyUI has (no missing node on any tested
  version) and agrees with /object_info (widget counts, output names, link types);
- every workflow in workflows/ is listed by /api/workflow_templates and served byte for byte where
  the Templates browser fetches it;
- slow: that workflow, converted to the API format, runs on a random full-size SD1.5 checkpoint
  and saves an image; a missing or a misfitting adapter fails with a clear execution error;
- slow, needs /usr/bin/chromium: the real web frontend loads the workflow with every node type
  known, the same widgets and the same API prompt; its Templates browser opens every workflow of
  the pack's section with every node built and none missing (screenshots written to the temp
  directory).

The server, checkpoint and Chromium driver are comfy_server.py's (fixtures: conftest.py).
"""
import json
import re
import struct
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT
from comfy_server import (CHANGED_CORE_NODES, CHROMIUM, DIALOGS_JS, HTTP_TIMEOUT, PACK_DIR_NAME, SD15_ADAPTER,
                          TINY_ADAPTER, WORKFLOW, WORKFLOWS, input_specs, needs_sd15_adapter, open_frontend,
                          saved_widget_names, small_prompt, ui_to_api, ui_to_api_by_name, widget_names)

FIRST_RELEASE_WORKFLOWS = sorted((PACK_ROOT / "tests" / "fixtures" / "v0.1" / "workflows").glob("*.json"))
FERA_NODES = ("LoadFeRAAdapter", "ApplyFeRA", "LoadFeRAModelOnly", "FeRARoutingTrace", "FeRARoutingPlot",
              "SaveFeRATrace", "FeRALatentBandEnergy", "LoadFeRATrainingImages", "TrainFeRA", "SaveFeRAAdapter",
              "BakeFeRAToLoRA", "BakeFeRAToLoRASchedule")


def _execution_error(entry: dict) -> dict:
    status = entry["status"]
    assert status["status_str"] == "error", f"expected an execution error, got {json.dumps(status)[:2000]}"
    errors = [data for kind, data in status["messages"] if kind == "execution_error"]
    assert len(errors) == 1, status["messages"]
    return errors[0]


# ---------------------------------------------------------------- fast checks

def _plain_lines(log: str) -> str:
    """The log without colour codes and level tags: newer ComfyUI writes '[INFO] message'."""
    return re.sub(r"^(?:\[[A-Z]+\] )?", "", re.sub(r"\x1b\[[0-9;]*m", "", log), flags=re.M)


def _tracebacks(log: str) -> list[str]:
    """Each 'Traceback ...' block of the log: its indented frames and the exception line."""
    blocks, current = [], None
    for line in log.splitlines():
        if line.startswith("Traceback (most recent call last):"):
            current = [line]
            blocks.append(current)
        elif current is not None:
            current.append(line)
            if line and not line[0].isspace():
                current = None  # the exception line ends the block
    return ["\n".join(b) for b in blocks]


def test_pack_loads_without_errors(server, object_info):
    log = _plain_lines(server.startup_log)
    pack_path = re.escape(str(server.base / "custom_nodes" / PACK_DIR_NAME))
    loaded = re.findall(rf"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: {pack_path}\s*$", log, re.M)
    assert loaded == [""], f"pack not listed as imported (or listed as failed) in the log:\n{log[-4000:]}"
    # Tracebacks (ComfyUI logs a few of its own for optional deps, e.g. torchaudio) must not involve the pack.
    ours = [b for b in _tracebacks(log) if PACK_DIR_NAME in b or str(PACK_ROOT) in b]
    assert not ours, "traceback from the pack:\n" + "\n".join(ours)
    complaints = [line for line in log.splitlines()
                  if (PACK_DIR_NAME in line or str(PACK_ROOT) in line)
                  and re.search(r"error|cannot import|import failed|skip|warning|exception", line, re.I)]
    assert not complaints, complaints
    for node_id in FERA_NODES:
        assert node_id in object_info, f"{node_id} missing from /object_info (comfy_entrypoint failed?)"


def test_object_info_nodes_have_category_and_tooltips(object_info):
    for node_id in FERA_NODES:
        info = object_info[node_id]
        assert info["category"] == "FeRA", (node_id, info["category"])
        assert info["python_module"].endswith(PACK_DIR_NAME), info["python_module"]
        assert info["display_name"] and info["description"], node_id
        for name, spec in input_specs(info):
            tooltip = spec[1].get("tooltip") if len(spec) > 1 else None
            assert isinstance(tooltip, str) and tooltip.strip(), f"{node_id}.{name} has no tooltip"
        tooltips = info.get("output_tooltips") or []
        assert len(tooltips) == len(info["output"]), (node_id, tooltips)
        assert all(isinstance(t, str) and t.strip() for t in tooltips), (node_id, tooltips)


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_matches_object_info(object_info, workflow):
    """Every node of every workflow is one this ComfyUI has (a missing node fails, on every tested
    version), with as many widget values as its inputs have widgets and links of the types it outputs."""
    wf = json.loads(workflow.read_text())
    missing = sorted({n["type"] for n in wf["nodes"]} - set(object_info))
    assert not missing, f"{workflow.name}: node types this ComfyUI does not have: {missing}"
    _agrees_with_object_info(wf, object_info)


@pytest.mark.parametrize("workflow", FIRST_RELEASE_WORKFLOWS, ids=lambda p: p.stem)
def test_workflows_of_the_first_release_still_open(object_info, workflow):
    """Node ids and widget lists are contracts: the workflows as the first release shipped them
    (tests/fixtures/v0.1) find every FeRA node with the same widgets and outputs. Their one core node
    that older hosts lack (0.33's LoadImageDataSetFromFolder) is checked only where the host has it."""
    wf = json.loads(workflow.read_text())
    fera = [n["type"] for n in wf["nodes"] if n["type"] in FERA_NODES]
    assert fera and set(fera) <= set(object_info), fera
    known = {n["id"] for n in wf["nodes"] if n["type"] in object_info}
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] in known]
    wf["links"] = [link for link in wf["links"] if link[1] in known and link[3] in known]
    kept = {link[0] for link in wf["links"]}
    for slot in (s for n in wf["nodes"] for s in n.get("inputs", [])):
        slot["link"] = slot["link"] if slot.get("link") in kept else None
    _agrees_with_object_info(wf, object_info)


def _agrees_with_object_info(wf: dict, object_info: dict):
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    older = {n["id"] for n in wf["nodes"] if n["type"] in CHANGED_CORE_NODES
             and saved_widget_names(n) != widget_names(object_info[n["type"]])}  # saved by a newer ComfyUI
    for node in wf["nodes"]:
        info = object_info[node["type"]]
        assert node["properties"]["Node name for S&R"] == node["type"]
        if node["id"] in older:
            assert len(node["widgets_values"]) == len(saved_widget_names(node)), node["type"]
            continue
        assert len(node.get("widgets_values", [])) == len(widget_names(info)), node["type"]
        assert [s["name"] for s in node["outputs"]] == info["output_name"][:len(node["outputs"])], node["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][src_slot]
        assert out_type == typ or src in older, (link_id, out_type, typ)
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == typ, (link_id, target)
    (ui_to_api_by_name if older else ui_to_api)(wf, object_info)  # every widget value has its input


def test_workflow_matches_object_info(object_info):
    wf = json.loads(WORKFLOW.read_text())
    assert {"CheckpointLoaderSimple", "LoadFeRAAdapter", "ApplyFeRA", "KSampler", "CLIPTextEncode",
            "EmptyLatentImage", "VAEDecode", "SaveImage"} <= {n["type"] for n in wf["nodes"]}
    api = ui_to_api(wf, object_info)
    fera = next(n for n in api.values() if n["class_type"] == "LoadFeRAAdapter")["inputs"]
    assert fera == {"adapter_name": "sd15_reference_adapter.pt", "reference_alpha": 1.0, "reference_tau": 0.7}
    apply = next(n for n in api.values() if n["class_type"] == "ApplyFeRA")["inputs"]
    assert {k: v for k, v in apply.items() if not isinstance(v, list)} == {
        "strength": 1.0, "temperature": 0.0, "force_expert": -1, "mix": "", "gains": "",
        "start_percent": 0.0, "end_percent": 1.0}
    assert {k for k, v in apply.items() if isinstance(v, list)} == {"model", "fera_adapter"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_every_workflow_is_served_as_a_template(server, workflow):
    """The Templates browser lists the pack's workflows and fetches each from this URL."""
    listed = server.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS), listed
    url = f"{server.url}/api/workflow_templates/{PACK_DIR_NAME}/{workflow.name}"
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as r:
        assert r.read() == workflow.read_bytes()


# ---------------------------------------------------------------- full-size runs

@needs_sd15_adapter
def test_adapter_files_in_models_fera_are_offered_by_both_loaders(object_info):
    for node_id in ("LoadFeRAAdapter", "LoadFeRAModelOnly"):
        spec = object_info[node_id]["input"]["required"]["adapter_name"]
        options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
        assert SD15_ADAPTER.name in options, (node_id, options)


@pytest.mark.slow
@needs_sd15_adapter
def test_workflow_runs_and_saves_image(server, object_info, sd15_checkpoint):
    prompt = small_prompt(object_info, sd15_checkpoint)
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    save_id = next(k for k, n in prompt.items() if n["class_type"] == "SaveImage")
    images = entry["outputs"][save_id]["images"]
    assert len(images) == 1
    img = images[0]
    path = server.base / img["type"] / img["subfolder"] / img["filename"]
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (64, 64)


@pytest.mark.slow
@needs_sd15_adapter
def test_missing_adapter_gives_clear_error(server, object_info, sd15_checkpoint):
    name = "no_such_fera_adapter.safetensors"
    prompt = small_prompt(object_info, sd15_checkpoint, LoadFeRAAdapter={"adapter_name": name})
    code, answer = server.post("/prompt", {"prompt": prompt})
    if code != 200:  # hosts that validate V3 combos refuse it up front
        text = json.dumps(answer)
        assert code == 400 and "adapter_name" in text and name in text, text[:3000]
        return
    entry = server.wait(answer["prompt_id"])
    err = _execution_error(entry)
    assert err["node_type"] == "LoadFeRAAdapter"
    msg = err["exception_message"]
    assert name in msg and "models/fera" in msg, msg


@pytest.mark.slow
@needs_sd15_adapter
@pytest.mark.skipif(not TINY_ADAPTER.is_file(), reason=f"tiny reference adapter not found at {TINY_ADAPTER}")
def test_misfitting_adapter_gives_clear_error(server, object_info, sd15_checkpoint):
    prompt = small_prompt(object_info, sd15_checkpoint, LoadFeRAAdapter={"adapter_name": TINY_ADAPTER.name})
    entry = server.run_prompt(prompt)
    err = _execution_error(entry)
    assert err["node_type"] == "ApplyFeRA"
    msg = err["exception_message"]
    assert "does not fit" in msg and "Nothing was patched" in msg, msg
    assert "AdapterMismatchError" in err["exception_type"]


# ---------------------------------------------------------------- real frontend (headless Chromium)

# Clicks the innermost visible element whose own text is `text` (the Templates browser's section
# and card titles); returns how many there were.
_CLICK_TEXT_JS = """(text => {
  const own = e => Array.from(e.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  const hits = Array.from(document.querySelectorAll('body *')).filter(e => e.offsetParent !== null && own(e) === text);
  if (hits.length) hits[0].click();
  return hits.length;
})"""
# Node types of the graph on the canvas that the frontend does not know (missing nodes). Not
# has_errors: newer frontends also flag a node whose model file is absent, which is not our concern.
_MISSING_NODES_JS = "window.app.graph.nodes.filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)"
_GRAPH_TYPES_JS = "window.app.graph.nodes.map(n => n.type).sort()"


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_frontend_loads_workflow(server, object_info):
    wf = json.loads(WORKFLOW.read_text())
    browser = open_frontend(server)
    try:
        registered = browser.eval("Object.keys(window.LiteGraph.registered_node_types)")
        missing = sorted({n["type"] for n in wf["nodes"]} - set(registered))
        assert not missing, f"node types unknown to the frontend: {missing}"

        browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
        browser.wait_for(f"window.app.graph.nodes.length === {len(wf['nodes'])}", timeout=60)
        time.sleep(1.0)  # let dialogs (missing nodes/models) open if any would
        dialogs = browser.eval(DIALOGS_JS)
        assert not dialogs, f"dialogs after loading the workflow: {dialogs}"
        assert browser.eval(_MISSING_NODES_JS) == []

        # Every node was built from the server's definition, with the workflow's widget values.
        nodes = json.loads(browser.eval(
            # ids are numbers in the saved workflow, strings in the live graph of newer frontends
            "JSON.stringify(window.app.graph.nodes.map(n => ({id: Number(n.id), type: n.type, "
            "widgets: (n.widgets || []).map(w => w.name), values: (n.widgets || []).map(w => w.value), "
            "size: Array.from(n.size)})))"))
        by_id = {n["id"]: n for n in nodes}
        for node in wf["nodes"]:
            seen = by_id[node["id"]]
            assert seen["type"] == node["type"]
            assert seen["widgets"] == widget_names(object_info[node["type"]]), seen
            assert seen["values"] == node.get("widgets_values", []), seen

        # Saving it again gives back the same nodes and links, and the API prompt we derive.
        exported = json.loads(browser.eval("JSON.stringify(window.app.graph.serialize())"))
        assert exported["links"] == wf["links"]
        for node in exported["nodes"]:
            orig = next(n for n in wf["nodes"] if n["id"] == node["id"])
            node.setdefault("widgets_values", [])  # newer frontends leave out an empty list
            extra = node["outputs"][len(orig["outputs"]):]
            if extra:  # outputs a newer host added to the node (0.33's SaveImage passes its images on), unlinked
                assert [o["type"] for o in extra] == object_info[node["type"]]["output"][len(orig["outputs"]):]
                assert not any(o.get("links") for o in extra), extra
                node["outputs"] = node["outputs"][:len(orig["outputs"])]
            for key in ("type", "pos", "size", "inputs", "outputs", "widgets_values", "properties", "mode"):
                assert node.get(key) == orig.get(key), (node["type"], key, node.get(key), orig.get(key))
        api = json.loads(browser.eval("window.app.graphToPrompt().then(p => JSON.stringify(p.output))"))
        assert api == ui_to_api(wf, object_info)

        shot = Path(tempfile.gettempdir()) / f"fera-frontend-{server.port}.png"
        browser.screenshot(shot)
        print(f"\nfrontend screenshot: {shot}")

        # The missing-node check above can see a missing node.
        broken = json.loads(json.dumps(wf))
        broken["nodes"][0]["type"] = "FeRANodeThatDoesNotExist"
        browser.eval(f"window.app.loadGraphData({json.dumps(broken)})")
        browser.wait_for(f"({_MISSING_NODES_JS}).includes('FeRANodeThatDoesNotExist')", timeout=30)
    finally:
        browser.close()




@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_templates_browser_opens_every_workflow(server):
    """Templates browser -> the pack's section -> each workflow: it loads, every node built, none missing."""
    browser = open_frontend(server)
    try:
        for workflow in WORKFLOWS:
            types = sorted(n["type"] for n in json.loads(workflow.read_text())["nodes"])
            browser.eval("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            browser.wait_for(f"{_CLICK_TEXT_JS}({json.dumps(PACK_DIR_NAME)}) > 0", timeout=60)
            browser.wait_for(f"{_CLICK_TEXT_JS}({json.dumps(workflow.stem)}) > 0", timeout=60)
            browser.wait_for(f"JSON.stringify({_GRAPH_TYPES_JS}) === {json.dumps(json.dumps(types, separators=(',', ':')))}",
                             timeout=60)
            # No node may be missing, on any tested ComfyUI version (train_fera.json once used a
            # core loader that 0.3.64 lacks).
            assert browser.eval(_MISSING_NODES_JS) == [], workflow.name
            shot = Path(tempfile.gettempdir()) / f"fera-template-{workflow.stem}-{server.port}.png"
            browser.screenshot(shot)
            print(f"\n{workflow.name} opened from the Templates browser: {shot}")
        # The missing-node check sees a node type the frontend does not know.
        broken = json.loads(WORKFLOW.read_text())
        broken["nodes"][0]["type"] = "FeRANodeThatDoesNotExist"
        browser.eval(f"window.app.loadGraphData({json.dumps(broken)})")
        browser.wait_for(f"({_MISSING_NODES_JS}).includes('FeRANodeThatDoesNotExist')", timeout=30)
    finally:
        browser.close()
