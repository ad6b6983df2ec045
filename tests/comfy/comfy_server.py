"""A real ComfyUI server with the pack installed, driven over HTTP, and its web frontend in headless Chromium.

Helpers of the host tests that need a server (their fixtures are in conftest.py): ComfyUI runs as
`python main.py --cpu` in a subprocess on a free loopback port, with a temporary --base-directory
whose custom_nodes/comfyui-fera is a symlink to this repository, so ComfyUI imports the pack exactly
as it imports an installed one (nothing is written into the ComfyUI checkout). ui_to_api turns a UI
workflow into the API prompt the frontend would queue. Chromium is driven over the DevTools protocol.
"""
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT, write_random_checkpoint

PACK_DIR_NAME = "comfyui-fera"
WORKFLOW = PACK_ROOT / "workflows" / "apply_fera.json"
WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))  # every one must open from the Templates browser
REFERENCE = PACK_ROOT.parent / "shared" / "fixtures" / "reference"
SD15_ADAPTER = REFERENCE / "sd15_reference_adapter.pt"
# A reference adapter for a tiny UNet: a well-formed file that does not fit SD1.5.
TINY_ADAPTER = next((p for p in (REFERENCE / "tiny_reference_adapter.pt",
                                 PACK_ROOT / "tests" / "fixtures" / "tiny_reference_adapter.pt") if p.is_file()),
                    REFERENCE / "tiny_reference_adapter.pt")
needs_sd15_adapter = pytest.mark.skipif(not SD15_ADAPTER.is_file(),
                                        reason=f"reference SD1.5 adapter not found at {SD15_ADAPTER}")
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


@contextlib.contextmanager
def running_server(base: Path, comfy_root: Path):
    """A ComfyUI server (checkout comfy_root) on the empty folder `base`, with the pack installed; stopped on exit.

    Runs with the interpreter running the tests unless COMFYUI_PYTHON names another.
    """
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
            cwd=comfy_root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
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


def add_sd15_checkpoint(server: ComfyServer) -> str:
    """A random full-size SD1.5 checkpoint in the server's models/checkpoints; returns its name.

    The file (2.1 GB, about a minute to write) is cached at FERA_SD15_CHECKPOINT, by default
    <tempdir>/fera-test-cache/random_sd15_seed0.safetensors, and written there when missing.
    """
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

def input_specs(info: dict) -> list[tuple[str, list]]:
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


def widget_names(info: dict) -> list[str]:
    """Names of the node's widget values, as widgets_values lists them (incl. seed controls)."""
    names = []
    for name, spec in input_specs(info):
        if _is_widget(spec):
            names.append(name)
            opts = spec[1] if len(spec) > 1 else {}
            # The frontend's rule: an INT named seed or noise_seed gets a control unless the node says otherwise.
            if opts.get("control_after_generate", spec[0] == "INT" and name in ("seed", "noise_seed")):
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
        values = dict(zip(widget_names(info), node.get("widgets_values", []), strict=True))
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


# Core nodes whose interface changed between the tested ComfyUI versions (0.3.64 -> 0.33): Train LoRA lost
# its model output and gained widgets, Load LoRA Model gained 'bypass'. A workflow saves them as 0.33 does;
# on an older host ui_to_api_by_name matches them by name, as a user there re-sets and reconnects them.
CHANGED_CORE_NODES = {"TrainLoraNode", "LoraModelLoader"}


def saved_widget_names(node: dict) -> list[str]:
    """Names of a saved node's widget values, from the workflow's own widget inputs (frontend rule for seeds)."""
    names = []
    for slot in node.get("inputs", []):
        if "widget" in slot:
            names.append(slot["name"])
            if slot["type"] == "INT" and slot["name"] in ("seed", "noise_seed"):
                names.append("control_after_generate")
    return names


def ui_to_api_by_name(workflow: dict, object_info: dict) -> dict:
    """ui_to_api, but CHANGED_CORE_NODES take their widget values by name (values this host's node has no input
    for are dropped) and links leave them from the output of the saved output's type."""
    changed = {n["id"]: n for n in workflow["nodes"] if n["type"] in CHANGED_CORE_NODES}
    nodes = []
    for node in workflow["nodes"]:
        if node["id"] in changed:
            values = dict(zip(saved_widget_names(node), node.get("widgets_values", []), strict=True))
            node = dict(node, widgets_values=[values[name] for name in widget_names(object_info[node["type"]])])
        nodes.append(node)
    links = []
    for link in workflow["links"]:
        link_id, src, slot, dst, dst_slot, typ = link
        if src in changed:
            slot = object_info[changed[src]["type"]]["output"].index(typ)
        links.append([link_id, src, slot, dst, dst_slot, typ])
    return ui_to_api(dict(workflow, nodes=nodes, links=links), object_info)


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


# ---------------------------------------------------------------- real frontend (headless Chromium)

class Chromium:
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


# The texts of the open dialogs (a missing-node or missing-model dialog, an error).
DIALOGS_JS = ("Array.from(document.querySelectorAll('.p-dialog, [role=dialog]'))"
              ".map(d => d.innerText).filter(t => t.trim())")


def open_frontend(server, **window) -> Chromium:
    """Headless Chromium showing the server's web frontend, ready (node types registered, the pack's too).
    window: width and height of the browser window."""
    pytest.importorskip("aiohttp", reason="aiohttp (a ComfyUI dependency) drives Chromium here")
    code, _ = server.post("/settings/Comfy.TutorialCompleted", True)  # else a template dialog covers the canvas
    assert code == 200
    browser = Chromium(CHROMIUM, **window)
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
