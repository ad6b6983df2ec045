"""A baked schedule replayed by ComfyUI's own hook keyframe nodes (COMFYUI_PATH), no FeRA involved.

The workflow the bake writes is executed node by node with ComfyUI's classes from
comfy_extras/nodes_hooks.py (its hook subgraph; the prompts are given), and sampled on a tiny
SD1.5-architecture model. At every step the result must be FeRA with that step's mix.
"""
import json

import pytest
import torch

from comfy_host import PACK_ROOT, pack_module, setup_comfy

setup_comfy()
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402

from fera_core.model import FeRALayer  # noqa: E402
from hook_replay import hooked_conds, percent_of, run_nodes  # noqa: E402
from tiny_sampling import conds, make_adapter, sample_one, tiny_patcher  # noqa: E402

keys = pack_module("nodes.module_paths")
bake_schedule = pack_module("fera_core.bake.schedule")
bake_workflow = pack_module("fera_core.bake.workflow")
bake = pack_module("fera_core.bake")
RoutingTrace = pack_module("fera_core.trace").RoutingTrace


class StepMix:
    """fera_core's FeRA on the ComfyUI modules with the mix of each step forced (plain torch hooks):
    a call is matched to its step by the timestep the diffusion model receives."""

    def __init__(self, model, adapter, timesteps, mixes):
        names = keys.diffusers_to_comfy(model)
        self.layers = [FeRALayer(p, model.get_submodule(names[p][0]), e) for p, e in adapter.layers.items()]
        self.calls = []

        def route(_module, args):
            t = float(args[1].reshape(-1)[0])
            step = min(range(len(timesteps)), key=lambda k: abs(timesteps[k] - t))
            self.calls.append(step)
            for layer in self.layers:
                layer.set_routing_weights(torch.tensor([mixes[step]]))

        self.handle = model.diffusion_model.register_forward_pre_hook(route)

    def remove(self):
        self.handle.remove()
        for layer in self.layers:
            layer.remove()


def write_loras(adapter, folder):
    names = []
    for m, (tensors, meta) in enumerate(bake_schedule.expert_loras(adapter)):
        names.append(f"sched_expert{m}.safetensors")
        bake.save_lora(tensors, meta, folder / names[-1])
    return names


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
def test_hook_workflow_applies_each_steps_mix(models_dir, scheduler):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    sampling = patcher.model.model_sampling
    n = 6
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, n)[:-1].tolist()
    gen = torch.Generator().manual_seed(9)
    mixes = (torch.softmax(torch.randn(n, 3, generator=gen) * 2, dim=1) * 3).tolist()  # strengths up to 3
    steps = [{"step": k, "sigma": s, "percent": percent_of(sampling, s), "strengths": w}
             for k, (s, w) in enumerate(zip(sigmas, mixes))]
    data = bake_schedule.schedule(adapter, steps, write_loras(adapter, models_dir / "loras"))
    workflow = json.loads(json.dumps(bake_workflow.hook_workflow(data)))  # as read back from the file
    pos, neg = conds()
    hooked = sample_one(patcher, *hooked_conds(workflow, pos, neg), n, scheduler)

    timesteps = [float(sampling.timestep(torch.tensor(s))) for s in sigmas]
    forced = StepMix(patcher.model, adapter, timesteps, mixes)
    try:
        want = sample_one(patcher, pos, neg, n, scheduler)
    finally:
        forced.remove()
    assert sorted(set(forced.calls)) == list(range(n))
    base = sample_one(patcher, pos, neg, n, scheduler)
    effect, error = (want - base).abs().max(), (hooked - want).abs().max()
    assert error < 2e-4 < effect / 100, (float(error), float(effect))


def traced_run(patcher, adapter, strength, positive, negative, steps, scheduler):
    """(output, RoutingTrace) of a FeRA run, steps and schedule percents recorded."""
    sampling = patcher.model.model_sampling
    trace = RoutingTrace(schedule=comfy.samplers.calculate_sigmas(sampling, scheduler, steps),
                         percent_of=lambda sigma: percent_of(sampling, sigma))
    out = sample_one(pack_module("nodes.routing").apply_fera(patcher, adapter, strength, trace=trace),
                     positive, negative, steps, scheduler)
    return out, trace.frozen()


def test_traced_run_baked_by_the_node_replays_fera(models_dir, tmp_path, monkeypatch):
    """FeRA run (batch 1: cond and uncond rows share the latent, so each step has one mix) -> trace ->
    Bake FeRA to LoRA Schedule -> its workflow file through ComfyUI's hook nodes == the FeRA run."""
    bake_nodes = pack_module("nodes.bake_nodes")
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    pos, neg = conds()
    fera, trace = traced_run(patcher, adapter, 1.5, pos, neg, 6, "karras")
    names, text = bake_nodes.BakeFeRAToLoRASchedule.execute(adapter, trace, "runs/fera", 1.5).args
    assert names.split("\n") == [f"runs/fera_00001_expert{m}.safetensors" for m in range(3)]
    data = json.loads(text)
    assert [s["strengths"] for s in data["steps"]] == [w for _, _, w in trace.step_weights()]
    assert len({tuple(s["strengths"]) for s in data["steps"]}) == 6  # the mix moves every step
    saved = tmp_path / "output" / "runs"
    assert json.loads((saved / "fera_00001_schedule.json").read_text()) == data
    workflow = json.loads((saved / "fera_00001_workflow.json").read_text())
    hooked = sample_one(patcher, *hooked_conds(workflow, pos, neg), 6, "karras")
    effect, error = (fera - sample_one(patcher, pos, neg, 6, "karras")).abs().max(), (hooked - fera).abs().max()
    assert error < 2e-4 < effect / 100, (float(error), float(effect))

    # the same trace as one fixed mix over a window of the schedule
    name = bake_nodes.BakeFeRAToLoRA.execute(adapter, "trace window", "win", 1.0, trace=trace, start_percent=0.2,
                                             end_percent=0.8, rows="cond").args[0]
    _, info = bake.read_baked_lora(models_dir / "loras" / name)
    assert info["mix"] == trace.mean_weights(0.2, 0.8, "cond")
    assert info["source"] == {"kind": "trace", "window": [0.2, 0.8], "rows": "cond"}


def test_bake_workflow_file_bakes_a_traced_run(models_dir, tmp_path, monkeypatch):
    """workflows/bake_fera.json's two bake nodes, with its widget values, on a traced run's trace."""
    bake_nodes = pack_module("nodes.bake_nodes")
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "output"))
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    pos, neg = conds()
    _, trace = traced_run(patcher, adapter, 1.0, pos, neg, 4, "normal")
    workflow = json.loads((PACK_ROOT / "workflows" / "bake_fera.json").read_text())
    classes = {cls.GET_SCHEMA().node_id: cls for cls in bake_nodes.NODES}
    outs = run_nodes(workflow, classes, {"LoadFeRAAdapter": (adapter,), "FeRARoutingTrace": (trace,)})
    by_type = {n["type"]: outs[n["id"]] for n in workflow["nodes"] if n["id"] in outs}
    (name,) = by_type["BakeFeRAToLoRA"]
    _, info = bake.read_baked_lora(models_dir / "loras" / name)
    assert info["mix"] == trace.mean_weights() and info["source"]["kind"] == "trace"
    names, text = by_type["BakeFeRAToLoRASchedule"]
    assert [s["strengths"] for s in json.loads(text)["steps"]] == [w for _, _, w in trace.step_weights()]
    assert all((models_dir / "loras" / n).is_file() for n in names.split("\n"))
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["fera_schedule_00001_schedule.json",
                                                                       "fera_schedule_00001_workflow.json"]
