"""workflows/train_fera.json in a real ComfyUI server (COMFYUI_PATH), driven over HTTP.

Uses comfy_server.py's server (own instance for this module) and random full-size SD1.5
checkpoint, and the real frontend (headless Chromium) for the loader's list after a save. The workflow loads its images with ComfyUI 0.33's LoadImageDataSetFromFolder (one
image per list item); on hosts that only have the older LoadImageSetFromFolderNode (0.3.x, one
batch) the test swaps that node in, as a user of such a version would.
"""
import json
import struct

import pytest
import torch

from comfy_host import PACK_ROOT
from comfy_server import CHROMIUM, TINY_ADAPTER, open_frontend, ui_to_api, widget_names

WORKFLOW = PACK_ROOT / "workflows" / "train_fera.json"
NEW_LOADER, OLD_LOADER = "LoadImageDataSetFromFolder", "LoadImageSetFromFolderNode"


def workflow_for(object_info):
    wf = json.loads(WORKFLOW.read_text())
    if NEW_LOADER not in object_info:
        for node in wf["nodes"]:
            if node["type"] == NEW_LOADER:
                node["type"] = node["properties"]["Node name for S&R"] = OLD_LOADER
                node["widgets_values"] = node["widgets_values"] + ["None"]  # resize_method
    return wf


def test_train_workflow_matches_object_info(object_info):
    wf = workflow_for(object_info)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["version"] == 0.4 and wf["last_node_id"] >= max(nodes)
    assert {"TrainFeRA", "SaveFeRAAdapter", "LossGraphNode", "VAEEncode", "KSampler"} <= {n["type"] for n in wf["nodes"]}
    for node in wf["nodes"]:
        assert len(node.get("widgets_values", [])) == len(widget_names(object_info[node["type"]])), node["type"]
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert object_info[nodes[src]["type"]]["output"][src_slot] == typ, link_id
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == typ
    samplers = [n for n in wf["nodes"] if n["type"] == "KSampler"]
    models = {nodes[next(link for link in wf["links"] if link[0] == n["inputs"][0]["link"])[1]]["type"]
              for n in samplers}
    assert models == {"TrainFeRA", "CheckpointLoaderSimple"}  # trained model beside the base model
    assert samplers[0]["widgets_values"] == samplers[1]["widgets_values"]  # same seed and settings


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_train_workflow_runs_saves_adapter_loss_graph_and_both_samples(server, object_info, sd15_checkpoint):
    from PIL import Image
    folder = server.base / "input" / "fera_training"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    prompt = ui_to_api(workflow_for(object_info), object_info)
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    prompt[by_type["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = sd15_checkpoint
    prompt[by_type["EmptyLatentImage"][0]]["inputs"].update(width=64, height=64)
    for node_id in by_type["KSampler"]:
        prompt[node_id]["inputs"]["steps"] = 2
    prompt[by_type["TrainFeRA"][0]]["inputs"].update(steps=2, training_dtype="fp32")
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = sorted((server.base / "models" / "fera").glob("FeRA_trained_*.safetensors"))
    assert [p.name for p in saved][-1:] == [f"FeRA_trained_{len(saved):05}_.safetensors"]
    text = entry["outputs"][by_type["TrainFeRA"][0]]["text"][0]
    assert "layers" in text and "loss" in text, text
    graph = entry["outputs"][by_type["LossGraphNode"][0]]["images"][0]
    assert _png_size(server.base / graph["type"] / graph["subfolder"] / graph["filename"])
    for node_id in by_type["SaveImage"]:
        img = entry["outputs"][node_id]["images"][0]
        assert _png_size(server.base / img["type"] / img["subfolder"] / img["filename"]) == (64, 64)
    print(f"\nTrain FeRA on a full-size SD1.5 (2 steps): {text}")


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"headless browser not found at {CHROMIUM}")
def test_a_saved_adapter_is_offered_by_the_loader_without_reloading_the_page(server):
    """Load FeRA Adapter -> Save FeRA Adapter queued from the frontend: the loader's list gains the new file."""
    name = "refresh_check_00001_.safetensors"
    assert not (server.base / "models" / "fera" / name).exists()
    browser = open_frontend(server)
    try:
        browser.eval(f"""(() => {{
            window.app.graph.clear();
            const load = window.LiteGraph.createNode("LoadFeRAAdapter");
            const save = window.LiteGraph.createNode("SaveFeRAAdapter");
            window.app.graph.add(load);
            window.app.graph.add(save);
            load.connect(0, save, 0);
            load.widgets[0].value = {json.dumps(TINY_ADAPTER.name)};
            save.widgets[0].value = "refresh_check";
            window.feraLoader = load;
        }})()""")
        listed = "window.feraLoader.widgets[0].options.values.includes(%s)" % json.dumps(name)
        assert browser.eval(listed) is False
        browser.eval("window.app.queuePrompt(0, 1)")
        browser.wait_for(listed, timeout=120)
        assert (server.base / "models" / "fera" / name).is_file()
    finally:
        browser.close()
