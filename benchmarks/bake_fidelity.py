"""What baking a FeRA adapter loses, measured in a real ComfyUI host (CPU).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bake_fidelity.py [--seeds N] [--steps S]

Not a test: prints a table. Model: the tiny SD1.5-architecture UNet of tests/comfy/tiny_sampling.py
(ComfyUI's own classes, random weights) with its test adapter (56 layers, 3 experts, rank 4,
'partition' indicator, random router) at strength 2. Each run: euler, 'normal' schedule, CFG 5,
img2img at denoise 0.8 of a 2-row batch whose rows differ in spectrum (smooth / checkerboard),
so FeRA routes the two rows (and every step) differently.

Forms, all sampled with the same seeds as FeRA:
- schedule (own trace): per-expert LoRAs + the per-step mean mix of this very run, replayed by
  ComfyUI's hook keyframe nodes (the baked workflow). Loses only the per-row routing.
- schedule (seed 0's trace): the schedule baked once, reused for other seeds. Also loses routing
  that reacts to the latent being sampled.
- fixed mix (seed 0's trace mean): one LoRA at the whole-run mean mix of seed 0.
- base: no adapter.
Reported per form: mean over seeds of max|FeRA - form| / max|FeRA - base| and the same with mean
absolute differences (1 = as far from FeRA as the base model; 0 = FeRA exactly).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if not os.environ.get("COMFYUI_PATH"):
    sys.exit("bake_fidelity.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI")

import torch  # noqa: E402

sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfy")]
from comfy_host import pack_module, setup_comfy  # noqa: E402

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from hook_replay import hooked_conds, percent_of  # noqa: E402
from tiny_sampling import conds, latents, make_adapter, tiny_patcher  # noqa: E402

routing = pack_module("nodes.routing")
bake = pack_module("fera_core.bake")
bake_schedule = pack_module("fera_core.bake.schedule")
bake_workflow = pack_module("fera_core.bake.workflow")
RoutingTrace = pack_module("fera_core.trace").RoutingTrace
STRENGTH, CFG, DENOISE = 2.0, 5.0, 0.8


def sample(patcher, seed, steps, positive=None, negative=None):
    pos, neg = conds()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    out = comfy.sample.sample(patcher, noise, steps, CFG, "euler", "normal", positive or pos, negative or neg,
                              latents(), denoise=DENOISE, seed=seed, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


def traced_fera(patcher, adapter, seed, steps):
    sampling = patcher.model.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", round(steps / DENOISE))[-(steps + 1):]
    trace = RoutingTrace(schedule=sigmas, percent_of=lambda sigma: percent_of(sampling, sigma))
    out = sample(routing.apply_fera(patcher, adapter, 1.0, trace=trace), seed, steps)
    return out, trace


def hooked(patcher, trace, adapter, loras: Path, seed, steps):
    names = []
    for m, (tensors, meta) in enumerate(bake_schedule.expert_loras(adapter)):
        names.append(f"bench_expert{m}.safetensors")
        bake.save_lora(tensors, meta, loras / names[-1])
    data = bake_schedule.schedule(adapter, bake_schedule.trace_steps(trace), names)
    return sample(patcher, seed, steps, *hooked_conds(bake_workflow.hook_workflow(data), *conds()))


def fixed(patcher, mix, adapter, loras: Path, seed, steps):
    path = bake.save_lora(*bake.bake_lora(adapter, mix), loras / "bench_fixed.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return sample(comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)[0], seed, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    with torch.no_grad():
        for e in adapter.layers.values():
            e.up.mul_(STRENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp)
        folder_paths.folder_names_and_paths["loras"] = ([tmp], {".safetensors"})
        folder_paths.filename_list_cache.clear()
        _, trace0 = traced_fera(patcher, adapter, 0, args.steps)
        mean0 = trace0.mean_weights()
        ratios = {k: [] for k in ("schedule (own trace)", "schedule (seed 0's trace)", "fixed mix (seed 0's mean)",
                                  "base")}
        for seed in range(1, args.seeds + 1):
            fera, trace = traced_fera(patcher, adapter, seed, args.steps)
            forms = {"schedule (own trace)": hooked(patcher, trace, adapter, loras, seed, args.steps),
                     "schedule (seed 0's trace)": hooked(patcher, trace0, adapter, loras, seed, args.steps),
                     "fixed mix (seed 0's mean)": fixed(patcher, mean0, adapter, loras, seed, args.steps),
                     "base": sample(patcher, seed, args.steps)}
            base = (fera - forms["base"]).abs()
            for name, out in forms.items():
                diff = (fera - out).abs()
                ratios[name].append(((diff.max() / base.max()).item(), (diff.mean() / base.mean()).item()))
    print(f"tiny SD1.5 (ComfyUI classes), {args.steps} euler steps, CFG {CFG}, denoise {DENOISE}, "
          f"2 rows, seeds 1..{args.seeds}; seed 0 mean mix {[round(w, 3) for w in mean0]}")
    print(f"{'form':28s} {'max|FeRA-x|/max|FeRA-base|':>28s} {'mean|FeRA-x|/mean|FeRA-base|':>30s}")
    for name, values in ratios.items():
        print(f"{name:28s} {statistics.mean(v[0] for v in values):28.3f} {statistics.mean(v[1] for v in values):30.3f}")
    print(json.dumps({k: [[round(a, 4), round(b, 4)] for a, b in v] for k, v in ratios.items()}))


if __name__ == "__main__":
    main()
