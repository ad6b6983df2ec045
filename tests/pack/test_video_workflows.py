"""workflows/train_fera_video.json and inspect_fera_video.json are wired as their descriptions say (no ComfyUI).

That every node exists on each tested ComfyUI is tests/comfy/test_server.py's check (it covers every
workflow); here: what feeds what. Both workflows use only nodes ComfyUI 0.3.64 and 0.33.0 both have
(0.3.64 has no folder loader for videos, so each clip has its own Load Video).
"""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


def load(name):
    wf = json.loads((WORKFLOWS / name).read_text())
    return wf, {n["id"]: n for n in wf["nodes"]}


def source(wf, nodes, node, name):
    """(node, output slot) wired into input `name` of `node`."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == name)
    assert link_id is not None, f"{node['type']} {node['id']}: {name} is not wired"
    link = next(link for link in wf["links"] if link[0] == link_id)
    assert link[3] == node["id"]
    return nodes[link[1]], link[2]


def chain(wf, nodes, node, name, *types):
    """Follow input `name` upstream through nodes of `types` (each entered by its first linked input)."""
    seen = []
    up, _ = source(wf, nodes, node, name)
    for k, want in enumerate(types):
        assert up["type"] == want, (node["type"], [n["type"] for n in seen], up["type"], want)
        seen.append(up)
        if k + 1 < len(types):
            up, _ = source(wf, nodes, up, next(i["name"] for i in up["inputs"] if i.get("link") is not None))
    return seen


def by_type(nodes, kind):
    return [n for n in nodes.values() if n["type"] == kind]


def test_video_training_workflow_trains_on_a_batch_of_clips_with_their_captions():
    """Each clip: Load Video -> frames -> its first 4k + 1 frames -> one size -> the video VAE's encode; the
    clips joined into one LATENT batch (one row a clip) with one caption each into Train FeRA; Save FeRA
    Adapter; then the same prompt and seed sampled with the trained model and the base model."""
    wf, nodes = load("train_fera_video.json")
    (train,) = by_type(nodes, "TrainFeRA")
    (batch,) = by_type(nodes, "LatentBatch")
    assert source(wf, nodes, train, "latents")[0] is batch
    vae_loader, = by_type(nodes, "VAELoader")
    sizes = []
    for name in ("samples1", "samples2"):
        encode, scale, frames, parts, video = chain(wf, nodes, batch, name, "VAEEncode", "ImageScale",
                                                    "ImageFromBatch", "GetVideoComponents", "LoadVideo")
        assert source(wf, nodes, encode, "vae")[0] is vae_loader
        batch_index, length = frames["widgets_values"]
        assert batch_index == 0 and length % 4 == 1  # a Wan VAE encodes 1 + 4k frames into 1 + k latent frames
        sizes.append((length, *scale["widgets_values"][1:3]))
    assert sizes[0] == sizes[1]  # one batch: every clip the same length and size
    combine, _ = source(wf, nodes, train, "positive")
    assert combine["type"] == "ConditioningCombine"
    captions = [source(wf, nodes, combine, f"conditioning_{k}")[0] for k in (1, 2)]
    clip_loader, = by_type(nodes, "CLIPLoader")
    assert all(c["type"] == "CLIPTextEncode" and source(wf, nodes, c, "clip")[0] is clip_loader for c in captions)
    assert captions[0]["widgets_values"] != captions[1]["widgets_values"]
    (save,) = by_type(nodes, "SaveFeRAAdapter")
    assert source(wf, nodes, save, "fera_adapter") == (train, 1)
    trained, base = sorted(by_type(nodes, "KSampler"), key=lambda n: source(wf, nodes, n, "model")[0]["type"] != "TrainFeRA")
    assert source(wf, nodes, trained, "model") == (train, 0)
    assert source(wf, nodes, base, "model") == source(wf, nodes, train, "model")  # the model Train FeRA adapted
    assert trained["widgets_values"] == base["widgets_values"]
    for name in ("positive", "negative", "latent_image"):
        assert source(wf, nodes, trained, name) == source(wf, nodes, base, name)
    (empty,) = by_type(nodes, "EmptyHunyuanLatentVideo")
    assert empty["widgets_values"][2] % 4 == 1


def test_video_inspect_workflow_traces_the_sampler_that_used_the_adapter():
    wf, nodes = load("inspect_fera_video.json")
    (sampler,) = by_type(nodes, "KSampler")
    fera_model = source(wf, nodes, sampler, "model")
    assert fera_model[0]["type"] == "LoadFeRAModelOnly"
    assert source(wf, nodes, fera_model[0], "model")[0]["type"] == "ModelSamplingSD3"
    (trace,) = by_type(nodes, "FeRARoutingTrace")
    assert source(wf, nodes, trace, "model") == fera_model and source(wf, nodes, trace, "latent") == (sampler, 0)
    (plot,) = by_type(nodes, "FeRARoutingPlot")
    (save_trace,) = by_type(nodes, "SaveFeRATrace")
    assert source(wf, nodes, plot, "trace")[0] is trace and source(wf, nodes, save_trace, "trace")[0] is trace
    (probe,) = by_type(nodes, "FeRALatentBandEnergy")
    # the probe reads the clip where the router does: given the same model (its process_latent_in)
    assert source(wf, nodes, probe, "latent") == (sampler, 0) and source(wf, nodes, probe, "model") == fera_model


@pytest.mark.parametrize("name", ["train_fera_video.json", "inspect_fera_video.json"])
def test_links_agree_with_the_nodes_slots(name):
    """Every link names existing slots of its type on both ends, as the frontend needs to draw it."""
    wf, nodes = load(name)
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        assert link_id in out["links"] and out["type"] == kind, (name, link_id)
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, (name, link_id)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    assert wf["last_node_id"] == max(nodes)
