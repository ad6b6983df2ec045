"""The pack inside a real ComfyUI server (COMFYUI_PATH), driven over HTTP like a user's frontend.

A module-scoped fixture starts `python main.py --cpu` as a subprocess on a free loopback port with
a temporary --base-directory whose custom_nodes/comfyui-fera is a symlink to this repository, so
ComfyUI imports the pack exactly as it imports an installed one (nothing is written into the
ComfyUI checkout). Checked:
- the server log shows the pack loaded, with no import error or traceback from it;
- /object_info lists the pack's nodes in category FeRA, with a tooltip on every input and output;
- workflows/apply_fera.json agrees with /object_info (widget order, link types);
- every workflow in workflows/ is listed by /api/workflow_templates and served byte for byte where
  the Templates browser fetches it;
- slow: that workflow, converted to the API format, runs on a random full-size SD1.5 checkpoint
  and saves an image; a missing or a misfitting adapter fails with a clear execution error;
- slow, needs /usr/bin/chromium: the real web frontend loads the workflow with every node type
  known, the same widgets and the same API prompt; its Templates browser opens every workflow of
  the pack's section with every node built (screenshots written to the temp directory).

The server runs with the interpreter running pytest unless COMFYUI_PYTHON names another. The
random checkpoint (2.1 GB, about a minute to write) is cached at FERA_SD15_CHECKPOINT, by default
<tempdir>/fera-test-cache/random_sd15_seed0.safetensors, and written there when missing.
"""
import asyncio
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT, comfyui_root, write_random_checkpoint

COMFY_ROOT = comfyui_root()  # skips this whole module without COMFYUI_PATH
pytestmark = pytest.mark.comfy

PACK_DIR_NAME = "comfyui-fera"
FERA_NODES = ("LoadFeRAAdapter", "ApplyFeRA", "LoadFeRAModelOnly", "FeRARoutingTrace", "FeRARoutingPlot",
              "SaveFeRATrace", "FeRALatentBandEnergy", "TrainFeRA", "SaveFeRAAdapter", "BakeFeRAToLoRA",
              "BakeFeRAToLoRASchedule", "FeRASchedule")
WORKFLOW = PACK_ROOT / "workflows" / "apply_fera.json"
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))  # every one must open from the Templates browser
REFERENCE = PACK_ROOT.parent / "shared" / "fixtures" / "reference"
SD15_ADAPTER = REFERENCE / "sd15_reference_adapter.pt"
# A reference adapter for a tiny UNet: a well-formed file that does not fit SD1.5.
TINY_ADAPTER = next((p for p in (REFERENCE / "tiny_reference_adapter.pt",
                                 PACK_ROOT / "tests" / "fixtures" / "tiny_reference_adapter.pt") if p.is_file()),
                    REFERENCE / "tiny_reference_adapter.pt")
CHECKPOINT_NAME = "random_sd15.safetensors"
CHROMIUM = Path("/usr/bin/chromium")

SERVER_START_TIMEOUT = 240  # s; the first import of torch + ComfyUI on a busy machine
RUN_TIMEOUT = 1500  # s; one 64x64 two-step SD1.5 run is about a minute on two busy CPU cores
HTTP_TIMEOUT = 30

# Socket types that the frontend draws as widgets (a list is a V1 combo).
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# ---------------------------------------------------------------- server

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.startup_log = ""  # the log once the server answered: import messages, before any prompt ran

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=HTTP_TIMEOUT) as r:
            return json.load(r)

    def post(self, path: str, payload) -> tuple[int, object]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as r:
                body = r.read()
                return r.status, json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def peak_rss_mb(self) -> float | None:
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) / 1024 if m else None

    def run_prompt(self, prompt: dict, timeout: float = RUN_TIMEOUT) -> dict:
        """POST an API prompt, wait for it in /history; returns its history entry.

        Raises AssertionError with the server's answer if the prompt is refused at validation.
        """
        code, answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        assert code == 200, f"/prompt refused the prompt ({code}): {json.dumps(answer)[:3000]}"
        return self.wait(answer["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """The /history entry of a queued prompt once it has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited ({self.proc.returncode}):\n{self.log()[-4000:]}"
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(1.0)
        self.post("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log()[-3000:]}")


def _link_or_copy(src: Path, dst: Path):
    try:
        dst.symlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    for sub in ("models/checkpoints", "models/fera", "models/loras", "user", "input", "output", "temp"):
        (base / sub).mkdir(parents=True)
    for adapter in (SD15_ADAPTER, TINY_ADAPTER):
        if adapter.is_file():
            _link_or_copy(adapter, base / "models" / "fera" / adapter.name)

    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    port = _free_port()
    log_path = base / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
             "--disable-auto-launch"],
            cwd=COMFY_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    srv = ComfyServer(base, port, proc, log_path)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{srv.log()[-4000:]}")
            try:
                srv.get("/system_stats")
                srv.startup_log = srv.log()
                break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer within {SERVER_START_TIMEOUT} s:\n{srv.log()[-4000:]}")
            time.sleep(0.5)
        yield srv
    finally:
        peak = srv.peak_rss_mb()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        if peak is not None:
            print(f"\nComfyUI server peak RSS: {peak:.0f} MB (log: {log_path})")


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def sd15_checkpoint(server) -> str:
    """A random full-size SD1.5 checkpoint in the server's models/checkpoints; returns its name."""
    cached = Path(os.environ.get("FERA_SD15_CHECKPOINT")
                  or Path(tempfile.gettempdir()) / "fera-test-cache" / "random_sd15_seed0.safetensors")
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(cached, "sd15", seed=0)
    dst = server.base / "models" / "checkpoints" / CHECKPOINT_NAME
    if not dst.exists():
        _link_or_copy(cached, dst)
    return CHECKPOINT_NAME


# ---------------------------------------------------------------- UI workflow -> API prompt

def _input_specs(info: dict) -> list[tuple[str, list]]:
    """[(name, [type, options])] in the order the frontend creates the node's inputs."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            specs.append((name, info["input"][section][name]))
    return specs


def _is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _widget_names(info: dict) -> list[str]:
    """Names of the node's widget values, as widgets_values lists them (incl. seed controls)."""
    names = []
    for name, spec in _input_specs(info):
        if _is_widget(spec):
            names.append(name)
            opts = spec[1] if len(spec) > 1 else {}
            if opts.get("control_after_generate"):
                names.append("control_after_generate")
            if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                raise NotImplementedError(f"upload widget of {name} is not modelled")
    return names


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt the frontend's graphToPrompt makes of a UI workflow (no groups/subgraphs)."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            raise NotImplementedError("muted/bypassed nodes are not modelled")
        info = object_info[node["type"]]
        values = dict(zip(_widget_names(info), node.get("widgets_values", []), strict=True))
        values.pop("control_after_generate", None)
        inputs = dict(values)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, from_node, from_slot, to_node, _, _ = links[slot["link"]]
                assert to_node == node["id"]
                inputs[slot["name"]] = [str(from_node), from_slot]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                   "_meta": {"title": node.get("title") or info["display_name"]}}
    return prompt


def small_prompt(object_info: dict, ckpt: str, **node_inputs) -> dict:
    """workflows/apply_fera.json as an API prompt, at 64x64 with two steps on `ckpt`."""
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    (ckpt_id,), (latent_id,), (sampler_id,) = (by_type[t] for t in ("CheckpointLoaderSimple", "EmptyLatentImage",
                                                                     "KSampler"))
    prompt[ckpt_id]["inputs"]["ckpt_name"] = ckpt
    prompt[latent_id]["inputs"].update(width=64, height=64, batch_size=1)
    prompt[sampler_id]["inputs"].update(steps=2, seed=7)
    for class_type, changes in node_inputs.items():
        for node_id in by_type[class_type]:
            prompt[node_id]["inputs"].update(changes)
    return prompt


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
        for name, spec in _input_specs(info):
            tooltip = spec[1].get("tooltip") if len(spec) > 1 else None
            assert isinstance(tooltip, str) and tooltip.strip(), f"{node_id}.{name} has no tooltip"
        tooltips = info.get("output_tooltips") or []
        assert len(tooltips) == len(info["output"]), (node_id, tooltips)
        assert all(isinstance(t, str) and t.strip() for t in tooltips), (node_id, tooltips)


def test_workflow_matches_object_info(object_info):
    wf = json.loads(WORKFLOW.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] >= max(nodes)
    assert wf["last_link_id"] >= max(link[0] for link in wf["links"])
    assert {"CheckpointLoaderSimple", "LoadFeRAAdapter", "ApplyFeRA", "KSampler", "CLIPTextEncode",
            "EmptyLatentImage", "VAEDecode", "SaveImage"} <= {n["type"] for n in wf["nodes"]}
    for node in wf["nodes"]:
        info = object_info[node["type"]]
        assert node["properties"]["Node name for S&R"] == node["type"]
        assert len(node.get("widgets_values", [])) == len(_widget_names(info)), node["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out_type = object_info[nodes[src]["type"]]["output"][src_slot]
        assert out_type == typ, (link_id, out_type, typ)
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id and target["type"] == typ, (link_id, target)
    api = ui_to_api(wf, object_info)
    fera = next(n for n in api.values() if n["class_type"] == "LoadFeRAAdapter")["inputs"]
    assert fera == {"adapter_name": "sd15_reference_adapter.pt", "reference_alpha": 1.0, "reference_tau": 0.7}
    apply = next(n for n in api.values() if n["class_type"] == "ApplyFeRA")["inputs"]
    assert {k: v for k, v in apply.items() if not isinstance(v, list)} == {
        "strength": 1.0, "temperature": 0.0, "force_expert": -1, "mix": "", "gains": "",
        "start_percent": 0.0, "end_percent": 1.0, "blend": 1.0}
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

needs_sd15_adapter = pytest.mark.skipif(not SD15_ADAPTER.is_file(),
                                        reason=f"reference SD1.5 adapter not found at {SD15_ADAPTER}")


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

class _Chromium:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, which
    ComfyUI itself depends on), so the test needs no browser-automation package."""

    def __init__(self, exe: Path, width=1600, height=1000, start_timeout=60):
        import aiohttp
        self._aiohttp = aiohttp
        self.profile = tempfile.mkdtemp(prefix="fera-chromium-")
        self.proc = subprocess.Popen(
            [str(exe), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             f"--user-data-dir={self.profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.loop = asyncio.new_event_loop()
        self.session = self.ws = None
        self.msg_id = 0
        self.exceptions = []
        try:
            port_file = Path(self.profile) / "DevToolsActivePort"
            deadline = time.monotonic() + start_timeout
            while not (port_file.is_file() and "\n" in port_file.read_text()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("chromium did not start its DevTools endpoint")
                time.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=HTTP_TIMEOUT) as r:
                pages = [p for p in json.load(r) if p["type"] == "page"]
            self.loop.run_until_complete(self._connect(pages[0]["webSocketDebuggerUrl"]))
        except BaseException:
            self.close()
            raise

    async def _connect(self, url):
        self.session = self._aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method, params):
        self.msg_id += 1
        my_id = self.msg_id
        await self.ws.send_str(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = await self.ws.receive()
            if msg.type != self._aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"DevTools connection closed: {msg}")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
            if data.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(data["params"]["exceptionDetails"])

    def call(self, method, timeout=60, **params):
        return self.loop.run_until_complete(asyncio.wait_for(self._call(method, params), timeout))

    def eval(self, expression, timeout=60):
        r = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                      returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"JS error in {expression[:200]}: {json.dumps(r['exceptionDetails'])[:2000]}")
        return r["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.eval(expression, timeout=20):
                    return
            except RuntimeError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout} s waiting for {expression}")

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        try:
            if self.ws is not None:
                self.loop.run_until_complete(asyncio.wait_for(self.ws.close(), 10))
            if self.session is not None:
                self.loop.run_until_complete(asyncio.wait_for(self.session.close(), 10))
        except Exception:
            pass
        self.loop.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        shutil.rmtree(self.profile, ignore_errors=True)


_DIALOGS_JS = ("Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))"
               ".map(d => d.innerText).filter(t => t.trim())")
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


def _open_frontend(server, **window) -> _Chromium:
    """Headless Chromium showing the server's web frontend, ready (node types registered, the pack's too).
    window: width and height of the browser window."""
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI dependency) drives Chromium here")
    code, _ = server.post("/settings/Comfy.TutorialCompleted", True)  # else a template dialog covers the canvas
    assert code == 200
    browser = _Chromium(CHROMIUM, **window)
    try:
        browser.call("Runtime.enable")
        browser.call("Page.enable")
        browser.call("Page.navigate", url=server.url + "/")
        browser.wait_for("!!(window.app && window.app.graph && window.LiteGraph && ['KSampler', 'FeRARoutingTrace']"
                         ".every(t => window.LiteGraph.registered_node_types[t]))", timeout=180)
    except BaseException:
        browser.close()
        raise
    return browser


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_frontend_loads_workflow(server, object_info):
    wf = json.loads(WORKFLOW.read_text())
    browser = _open_frontend(server)
    try:
        registered = browser.eval("Object.keys(window.LiteGraph.registered_node_types)")
        missing = sorted({n["type"] for n in wf["nodes"]} - set(registered))
        assert not missing, f"node types unknown to the frontend: {missing}"

        browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
        browser.wait_for(f"window.app.graph.nodes.length === {len(wf['nodes'])}", timeout=60)
        time.sleep(1.0)  # let dialogs (missing nodes/models) open if any would
        dialogs = browser.eval(_DIALOGS_JS)
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
            assert seen["widgets"] == _widget_names(object_info[node["type"]]), seen
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
def test_templates_browser_opens_every_workflow(server, object_info):
    """Templates browser -> the pack's section -> each workflow: it loads, every node built."""
    browser = _open_frontend(server)
    try:
        for workflow in WORKFLOWS:
            types = sorted(n["type"] for n in json.loads(workflow.read_text())["nodes"])
            browser.eval("window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            browser.wait_for(f"{_CLICK_TEXT_JS}({json.dumps(PACK_DIR_NAME)}) > 0", timeout=60)
            browser.wait_for(f"{_CLICK_TEXT_JS}({json.dumps(workflow.stem)}) > 0", timeout=60)
            browser.wait_for(f"JSON.stringify({_GRAPH_TYPES_JS}) === {json.dumps(json.dumps(types, separators=(',', ':')))}",
                             timeout=60)
            # A workflow may use a core node of newer ComfyUI (train_fera.json's image-folder loader):
            # only such nodes, never the pack's, may be missing on an older host.
            absent = sorted({t for t in types if t not in object_info})
            assert not [t for t in absent if "FeRA" in t]
            assert sorted(set(browser.eval(_MISSING_NODES_JS))) == absent, workflow.name
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
