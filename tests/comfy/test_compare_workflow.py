"""workflows/compare_lora_fera.json: the same images trained with ComfyUI's own Train LoRA and with Train FeRA
at equal size and steps, both sampled from one seed side by side, with FeRA's routing plot.

The workflow is saved as ComfyUI 0.33 saves it. Train LoRA and Load LoRA Model changed their interface
after 0.3.64 (comfy_server.CHANGED_CORE_NODES); on that host the run test matches them by name, as a user
there re-sets and reconnects them.
"""
import json
import struct

import pytest
import torch

from comfy_host import PACK_ROOT, build_model, pack_module
from comfy_server import CHANGED_CORE_NODES, saved_widget_names, ui_to_api_by_name

WORKFLOW = PACK_ROOT / "workflows" / "compare_lora_fera.json"


def _nodes(wf):
    by_type = {}
    for node in wf["nodes"]:
        by_type.setdefault(node["type"], []).append(node)
    return by_type


def _settings(node) -> dict:
    return dict(zip(saved_widget_names(node), node["widgets_values"], strict=True))


def _feeds(wf, node, name):
    """(type, output slot) of what feeds `node`'s input `name`."""
    slot = next(s for s in node["inputs"] if s["name"] == name)
    link = next(link for link in wf["links"] if link[0] == slot["link"])
    return next(n for n in wf["nodes"] if n["id"] == link[1]), link[2]


def test_both_trainers_get_the_same_images_steps_and_seed_and_sample_from_one_seed():
    wf = json.loads(WORKFLOW.read_text())
    nodes = _nodes(wf)
    (lora,), (fera,) = nodes["TrainLoraNode"], nodes["TrainFeRA"]
    for name in ("model", "latents", "positive"):
        (src_l, slot_l), (src_f, slot_f) = _feeds(wf, lora, name), _feeds(wf, fera, name)
        assert (src_l["id"], slot_l) == (src_f["id"], slot_f), name
    assert _feeds(wf, lora, "latents")[0]["type"] == "VAEEncode"
    assert _feeds(wf, lora, "positive")[0]["type"] == "LoadFeRATrainingImages"
    lo, fe = _settings(lora), _settings(fera)
    for key in ("steps", "seed", "batch_size"):
        assert lo[key] == fe[key], key
    assert (lo["grad_accumulation_steps"], fe["grad_accumulation"]) == (1, 1)
    assert lo["control_after_generate"] == fe["control_after_generate"] == "fixed"
    assert lo["training_dtype"] == fe["training_dtype"]
    samplers = nodes["KSampler"]
    assert len(samplers) == 2 and samplers[0]["widgets_values"] == samplers[1]["widgets_values"]
    models = {_feeds(wf, s, "model")[0]["type"] for s in samplers}
    assert models == {"LoraModelLoader", "TrainFeRA"}
    assert {_feeds(wf, s, name)[0]["id"] for s in samplers for name in ("positive", "negative", "latent_image")} \
        == {_feeds(wf, samplers[0], name)[0]["id"] for name in ("positive", "negative", "latent_image")}
    (trace,), (plot,) = nodes["FeRARoutingTrace"], nodes["FeRARoutingPlot"]
    assert _feeds(wf, trace, "model")[0]["id"] == fera["id"]
    assert _feeds(wf, trace, "latent")[0]["id"] == next(s["id"] for s in samplers
                                                         if _feeds(wf, s, "model")[0]["id"] == fera["id"])
    assert _feeds(wf, plot, "trace")[0]["id"] == trace["id"]


def _train_lora_count(model, rank: int) -> int:
    """What Train LoRA trains, by its rule: a rank-r LoRA (out x r + r x in*kh*kw) on every weight of two or
    more dimensions in the model, and the whole of every 1-D weight and every bias."""
    total = 0
    for module in model.modules():
        if not hasattr(module, "weight_function"):
            continue
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is not None:
            total += rank * (weight.shape[0] + weight.shape[1:].numel()) if weight.ndim >= 2 else weight.numel()
        if bias is not None:
            total += bias.numel()
    return total


def test_both_train_the_same_number_of_weights_on_sd15_within_one_percent():
    """At the workflow's settings on full-size SD1.5 (built on the meta device): Train LoRA's rank 8 on every
    layer, biases and norms vs Train FeRA's 3 experts x rank 8 on attention + feed-forward, plus its router."""
    wf = json.loads(WORKFLOW.read_text())
    nodes = _nodes(wf)
    lo, fe = _settings(nodes["TrainLoraNode"][0]), _settings(nodes["TrainFeRA"][0])
    model = build_model("sd15")
    lora = _train_lora_count(model, lo["rank"])
    import comfy.model_patcher
    import comfy_extras.nodes_train as host_training
    if hasattr(host_training, "_setup_lora_adapters"):  # 0.33 builds them in a function: count what it makes
        patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
        with torch.device("meta"):  # the adapters' own layers too: shapes, no memory
            made, _ = host_training._setup_lora_adapters(patcher, {}, lo["algorithm"], torch.float32, lo["rank"])
        assert sum(p.numel() for p in made.values() if p.ndim) == lora  # besides each layer's alpha scalar
    adapter = pack_module("nodes.train_nodes").new_adapter(model, fe["layers"], fe["rank"], fe["alpha"], fe["experts"], fe["bands"],
                                      fe["tau"], fe["indicator"], fe["fecl_weight"], fe["seed"])
    fera = adapter.num_parameters()
    assert (lora, fera) == (8_909_572, 8_976_835)  # the numbers the README gives
    assert abs(fera - lora) / lora < 0.01


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_compare_workflow_runs_and_saves_both_samples_both_loss_graphs_and_the_routing_plot(
        server, object_info, sd15_checkpoint):
    from PIL import Image
    folder = server.base / "input" / "fera_training"
    folder.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"c{i}.png")
    prompt = ui_to_api_by_name(json.loads(WORKFLOW.read_text()), object_info)  # = ui_to_api on 0.33
    by_type = {}
    for node_id, node in prompt.items():
        by_type.setdefault(node["class_type"], []).append(node_id)
    prompt[by_type["CheckpointLoaderSimple"][0]]["inputs"]["ckpt_name"] = sd15_checkpoint
    prompt[by_type["LoadFeRATrainingImages"][0]]["inputs"].update(width=64, height=64)
    prompt[by_type["EmptyLatentImage"][0]]["inputs"].update(width=64, height=64)
    for node_id in by_type["KSampler"]:
        prompt[node_id]["inputs"]["steps"] = 2
    prompt[by_type["TrainLoraNode"][0]]["inputs"].update(steps=2, training_dtype="fp32", lora_dtype="fp32")
    prompt[by_type["TrainFeRA"][0]]["inputs"].update(steps=2, training_dtype="fp32")
    entry = server.run_prompt(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    saved = {}
    for node_id in by_type["SaveImage"] + by_type["LossGraphNode"]:
        for image in entry["outputs"][node_id]["images"]:
            path = server.base / image["type"] / image["subfolder"] / image["filename"]
            saved[prompt[node_id]["inputs"]["filename_prefix"]] = _png_size(path)
    assert saved["compare/LoRA"] == saved["compare/FeRA"] == (64, 64)  # side by side, same size
    assert saved["compare/routing"] == (800, 600)
    assert {"compare/loss_lora", "compare/loss_fera"} <= set(saved)
    assert {prompt[i]["class_type"] for i in prompt} >= CHANGED_CORE_NODES
