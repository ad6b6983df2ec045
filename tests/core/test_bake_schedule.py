"""Baking to a schedule: per-expert LoRAs, keyframe placement, the JSON schedule and the hook workflow."""
import json

import pytest
import torch

from fera_core import load_adapter
from fera_core.bake.lora import KOHYA, lora_keys
from fera_core.bake.schedule import FORMAT, expert_loras, keyframes, schedule
from fera_core.bake.workflow import hook_workflow

STEPS = [{"step": k, "sigma": s, "percent": p, "strengths": w} for k, (s, p, w) in enumerate([
    (14.6, 0.0, [0.7, 0.2, 0.1]), (5.0, 0.3, [0.5, 0.3, 0.2]), (1.2, 0.6, [0.2, 0.3, 0.5]), (0.1, 0.95, [0.1, 0.1, 0.8])])]


@pytest.fixture
def adapter(ref_adapter_path):
    return load_adapter(ref_adapter_path, alpha=8.0)


def test_expert_loras_are_each_expert_alone(adapter):
    loras = expert_loras(adapter, {"kind": "schedule"})
    assert len(loras) == 3
    path, experts = next(iter(adapter.layers.items()))
    down_key, up_key = lora_keys(path, KOHYA)
    for m, (tensors, meta) in enumerate(loras):
        down, up = experts.split()[m]
        torch.testing.assert_close(tensors[up_key] @ tensors[down_key], experts.scale * up @ down)
        info = json.loads(meta["fera.baked"])
        assert info["rank"] == 4 and info["experts"] == [m] and info["source"] == {"kind": "schedule", "expert": m}


def test_keyframes_start_midway_between_steps():
    frames = keyframes(STEPS)
    assert [f["start_percent"] for f in frames] == pytest.approx([0.0, 0.15, 0.45, 0.775])
    assert [f["strengths"] for f in frames] == [s["strengths"] for s in STEPS]


@pytest.mark.parametrize("change,problem", [
    (dict(percent=None), "no schedule percents"),
    (dict(percent=0.3), "must rise strictly"),
])
def test_keyframes_need_rising_percents(change, problem):
    steps = [dict(s) for s in STEPS]
    steps[2].update(change)
    with pytest.raises(ValueError, match=problem):
        keyframes(steps)


def test_schedule_json(adapter):
    names = [f"s_expert{m}.safetensors" for m in range(3)]
    data = schedule(adapter, STEPS, names, 0.8, "cond")
    assert data["format"] == FORMAT and data["loras"] == names and data["strength"] == 0.8 and data["rows"] == "cond"
    assert data["steps"] == STEPS and data["keyframes"] == keyframes(STEPS)
    assert json.loads(json.dumps(data)) == data
    no_percent = schedule(adapter, [dict(s, percent=None) for s in STEPS], names)
    assert no_percent["keyframes"] is None and "no schedule percents" in no_percent["keyframes_unavailable"]
    with pytest.raises(ValueError, match="one LoRA name per expert"):
        schedule(adapter, STEPS, names[:2])


def test_hook_workflow_graph(adapter):
    data = schedule(adapter, STEPS, [f"s_expert{m}.safetensors" for m in range(3)], 0.8)
    wf = hook_workflow(data, checkpoint="sd15.safetensors", sampler="dpmpp_2m", scheduler="karras")
    nodes = {n["id"]: n for n in wf["nodes"]}
    kinds = [n["type"] for n in wf["nodes"]]
    assert kinds.count("CreateHookLoraModelOnly") == 3 and kinds.count("CreateHookKeyframe") == 12
    assert kinds.count("SetHookKeyframes") == 3 and kinds.count("CombineHooks2") == 2
    hooks = [n for n in wf["nodes"] if n["type"] == "CreateHookLoraModelOnly"]
    assert [n["widgets_values"] for n in hooks] == [[f"s_expert{m}.safetensors", 0.8] for m in range(3)]
    frames = sorted((n for n in wf["nodes"] if n["type"] == "CreateHookKeyframe"), key=lambda n: n["title"])
    assert frames[0]["title"] == "expert 0 step 0" and frames[0]["widgets_values"] == [0.7, 0.0]
    assert frames[7]["title"] == "expert 1 step 3" and frames[7]["widgets_values"] == [0.1, pytest.approx(0.775)]
    sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"] == [0, "fixed", 4, 7.0, "dpmpp_2m", "karras", 1.0]
    # every link is consistent on both ends, and every socket input is connected except the optional ones
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == nodes[dst]["inputs"][dst_slot]["type"] == kind
    loose = {(n["type"], i["name"]) for n in wf["nodes"] for i in n["inputs"] if i["link"] is None}
    assert loose == {("CreateHookLoraModelOnly", "prev_hooks"), ("CreateHookKeyframe", "prev_hook_kf"),
                     ("PairConditioningSetProperties", "mask"), ("PairConditioningSetProperties", "timesteps")}
    assert wf["last_node_id"] == len(wf["nodes"]) and wf["last_link_id"] == len(wf["links"])
    with pytest.raises(ValueError, match="no hook keyframes"):
        hook_workflow(dict(data, keyframes=None, keyframes_unavailable="x"))
