"""workflows/train_fera.json in a real ComfyUI server (COMFYUI_PATH), driven over HTTP.

Uses comfy_server.py's server (own instance for this module) and random full-size SD1.5
checkpoint, and the real frontend (headless Chromium) for the loader's list after a save. The
workflow loads its images and captions with the pack's own Load FeRA Training Images, so it runs
unchanged on every tested ComfyUI version (test_server.py checks that no node is missing).
"""
import json
import struct

import pytest
import torch

from comfy_host import PACK_ROOT
from comfy_server import CHROMIUM, TINY_ADAPTER, open_frontend, ui_to_api
from fera_core.adapter_file import load_adapter

WORKFLOW = PACK_ROOT / "workflows" / "train_fera.json"


def _source(wf, node, slot):
    """(type, output slot) of what feeds input `slot` of `node`."""
    link = next(link for link in wf["links"] if link[0] == node["inputs"][slot]["link"])
    return next(n["type"] for n in wf["nodes"] if n["id"] == link[1]), link[2]


def test_train_workflow_feeds_folder_images_and_captions_to_training(object_info):
    """Checkpoint -> Load FeRA Training Images (its CLIP) -> VAE Encode -> Train FeRA, with one conditioning
    per image from the captions; trained and base model sampled with the same seed and settings."""
    wf = json.loads(WORKFLOW.read_text())
    by_type = {}
    for node in wf["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    assert {"TrainFeRA", "SaveFeRAAdapter", "LossGraphNode", "VAEEncode", "KSampler"} <= set(by_type)
    (loader,), (encode,), (train,) = by_type["LoadFeRATrainingImages"], by_type["VAEEncode"], by_type["TrainFeRA"]
    assert _source(wf, loader, 1) == ("CheckpointLoaderSimple", 1)  # the model's own CLIP
    assert _source(wf, encode, 0) == ("LoadFeRATrainingImages", 0)
    assert _source(wf, train, 1) == ("VAEEncode", 0) and _source(wf, train, 2) == ("LoadFeRATrainingImages", 1)
    assert loader["widgets_values"] == ["fera_training", 512, 512, "a photo in the style of sks"]
    samplers = by_type["KSampler"]
    assert {_source(wf, n, 0)[0] for n in samplers} == {"TrainFeRA", "CheckpointLoaderSimple"}  # trained beside base
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
        pixels = (torch.rand(80, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    (folder / "img1.txt").write_text("random noise in the style of sks")  # img0: the default caption
    prompt = ui_to_api(json.loads(WORKFLOW.read_text()), object_info)
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    prompt[by_type["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = sd15_checkpoint
    prompt[by_type["LoadFeRATrainingImages"][0]]["inputs"].update(width=64, height=64)
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
    assert load_adapter(saved[-1]).training_settings["images"] == 2
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
