"""Makes the README's pictures in docs/images/, so they show what the code does today.

    python docs/make_pictures.py demo       the demo's sample grid and routing chart (fera_core only)
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python docs/make_pictures.py [demo] [trace] [train]
                                            the trace node's live chart and the training workflow: screenshots
                                            of the real frontend in headless Chromium (all three by default)

The ComfyUI pictures reuse the host tests' server and browser helpers (tests/comfy/comfy_server.py):
a random-weight SD1.5 checkpoint and synthetic images, so nothing is downloaded.
"""
import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
TRACE_STEPS = 20
TRAIN_STEPS = 30


def demo_pictures():
    from fera_core.__main__ import main
    with tempfile.TemporaryDirectory() as out:
        if main(["demo", "--output", out]) != 0:
            raise SystemExit("the demo failed")
        for name in ("demo_samples.png", "demo_routing.png"):
            shutil.copyfile(Path(out, name), IMAGES / name)


def _set_widgets(wf: dict, values: dict):
    """values: node type -> {widget index: value}, applied to every node of that type."""
    for node in wf["nodes"]:
        for index, value in values.get(node["type"], {}).items():
            node["widgets_values"][index] = value
    return wf


def _shoot(browser, box: list, path: Path, scale=1.0, at=(120, 120)):
    """Frame the graph rectangle box = [x, y, w, h] at page position `at` (clear of the frontend's side
    bar and tabs, which lie over the canvas) and capture that part of the page."""
    browser.eval(f"""(() => {{ const c = window.app.canvas; c.ds.scale = {scale};
        c.ds.offset[0] = {at[0]} / {scale} - {box[0]}; c.ds.offset[1] = {at[1]} / {scale} - {box[1]};
        c.setDirty(true, true); }})()""")
    time.sleep(1.5)
    origin = browser.eval("(() => { const r = window.app.canvas.canvas.getBoundingClientRect(); return [r.left, r.top]; })()")
    clip = dict(x=origin[0] + at[0], y=origin[1] + at[1], width=box[2] * scale, height=box[3] * scale, scale=1)
    data = browser.call("Page.captureScreenshot", format="png", clip=clip)["data"]
    path.write_bytes(base64.b64decode(data))


def _run_in_frontend(browser, wf: dict, done_js: str, timeout=3600):
    browser.eval(f"window.app.loadGraphData({json.dumps(wf)})")
    browser.wait_for(f"window.app.graph._nodes.length === {len(wf['nodes'])}", timeout=60)
    time.sleep(1.0)
    browser.eval("window.app.queuePrompt(0, 1)")
    browser.wait_for(done_js, timeout=timeout)
    time.sleep(2.0)


def _training_images(folder: Path):
    """Four striped rectangles, one orientation and stripe period each (the demo's kind of data)."""
    from PIL import Image
    import numpy as np
    folder.mkdir()
    y, x = np.mgrid[:64, :64]
    for i in range(4):
        stripes = ((x if i % 2 else y) // (2 + i // 2)) % 2
        box = (abs(x - 32) < 12 + 4 * i) & (abs(y - 32) < 20 - 3 * i)
        rgb = np.stack([np.where(box, 40 + 200 * stripes, 210)] * 3, -1).astype(np.uint8)
        rgb[..., i % 3] = np.where(box, 230, rgb[..., i % 3])
        Image.fromarray(rgb).save(folder / f"stripes{i}.png")


def trace_picture(browser, ckpt: str):
    inspect = _set_widgets(json.loads((ROOT / "workflows" / "inspect_routing.json").read_text()), {
        "CheckpointLoaderSimple": {0: ckpt}, "EmptyLatentImage": {0: 256, 1: 256, 2: 1},
        "KSampler": {0: 11, 1: "fixed", 2: TRACE_STEPS}})
    trace = next(n for n in inspect["nodes"] if n["type"] == "FeRARoutingTrace")
    node_js = f"window.app.graph.getNodeById({trace['id']})"
    _run_in_frontend(browser, inspect, f"{node_js}.feraChart.run && {node_js}.feraChart.run.done")
    x, y, w, h = browser.eval(f"[...{node_js}.pos, ...{node_js}.size]")
    _shoot(browser, [x - 10, y - 40, w + 20, h + 50], IMAGES / "trace_node.png", scale=1.25)


def train_picture(browser, ckpt: str):
    train = _set_widgets(json.loads((ROOT / "workflows" / "train_fera.json").read_text()), {
        "CheckpointLoaderSimple": {0: ckpt}, "LoadFeRATrainingImages": {1: 64, 2: 64},
        "EmptyLatentImage": {0: 64, 1: 64}, "KSampler": {2: 8},
        "TrainFeRA": {0: TRAIN_STEPS, 1: 3e-4, 14: "fp32"}})
    shown = [n["id"] for n in train["nodes"] if n["type"] in ("LossGraphNode", "SaveImage")]
    _run_in_frontend(browser, train, " && ".join(f"window.app.graph.getNodeById({i}).imgs?.length > 0" for i in shown))
    group = next(g for g in train["groups"] if g["title"] == "Train")
    _shoot(browser, group["bounding"], IMAGES / "train_workflow.png", scale=0.9)


def comfy_pictures(names):
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit(f"{' and '.join(names)} need COMFYUI_PATH (a ComfyUI checkout) and ComfyUI's Python")
    sys.path[:0] = [str(ROOT / "tests" / "comfy")]
    from comfy_host import comfyui_root
    from comfy_server import add_sd15_checkpoint, open_frontend, running_server

    with tempfile.TemporaryDirectory() as base, running_server(Path(base), comfyui_root()) as server:
        ckpt = add_sd15_checkpoint(server)
        _training_images(server.base / "input" / "fera_training")  # before the page lists the input folders
        browser = open_frontend(server, width=1900, height=1500)
        try:
            for name, make in (("trace", trace_picture), ("train", train_picture)):
                if name in names:
                    make(browser, ckpt)
        finally:
            browser.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pictures", nargs="*", choices=["demo", "trace", "train"], default=["demo", "trace", "train"],
                        help="which pictures to make (default: all; trace and train need ComfyUI)")
    names = parser.parse_args().pictures
    IMAGES.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    if "demo" in names:
        demo_pictures()
    if {"trace", "train"} & set(names):
        comfy_pictures(names)
    for png in sorted(IMAGES.glob("*.png")):
        print(f"{png.relative_to(ROOT)}: {png.stat().st_size // 1024} kB")


if __name__ == "__main__":
    main()
