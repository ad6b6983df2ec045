"""Training cost of Train FeRA against ComfyUI's own LoRA trainer, in one process (CPU, 2 threads).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_train.py [--steps N] [--rounds R] [--size S] [--channels C]
        [--dtype bf16|fp32] [--no-checkpointing]

Not a test: prints a compact table. Both trainers run on the same SD1.5-architecture model
built from ComfyUI's own classes (two levels, random float32 weights; model_channels 320 by
default, SD1.5's own width, where arithmetic dominates a step as the targets' floor assumes;
--channels 64 gives a toy on which per-op overhead does), the same latents (2 images, S x S,
default 32; batch size 1, TrainLoraNode's default: with more, its guider applies every image's
conditioning to every row) and conditioning, the same layers (to_q, to_k, to_v, to_out.0 of
every attention) and the same total rank: FeRA 3 experts x rank 4 against LoRA rank 12. The
baseline is TrainLoraNode's method: ComfyUI's LoRA train adapter (comfy.weight_adapter, added
with add_weight_wrapper) driven by comfy_extras.nodes_train.TrainSampler under Guider_Basic;
TrainLoraNode itself adapts every weight and bias of the model, so its layer set is narrowed to
FeRA's here (the node offers no choice). Both run at their nodes' shared defaults, bf16 autocast
and gradient checkpointing on (TrainLoraNode also computes the model and keeps its LoRA in
bf16, as its defaults do); --dtype fp32 --no-checkpointing measures the other end, where FECL's
share is largest (with frozen weights, backward costs about one forward, so a no-grad forward
adds ~1/2 of a step there, and ~1/3 of one when checkpointing recomputes the forward).

Measured per run: seconds per optimizer step (median over the steps after 2 warm-up steps) and
the peak resident memory added by training (VmHWM reset through /proc/self/clear_refs, after
gc and malloc_trim, minus the resident size before training). Rounds run A, B, C in rotating
order (ABC, BCA, CAB); reported are medians, the ratio of medians, the median of the ratios
within a round (paired, robust to the machine's drift between rounds) and the ratios of the
fastest steps (interference from the rest of the machine only ever slows a step down). Many
short rounds: single rounds on these machines range over +-20%. Targets: time <= 1.35x (FeRA's
no-grad forward of the frozen model for FECL makes ~1.33x the floor), memory <= 1.10x. FECL's
own cost is reported apart: the time of the frozen forward and of the loss terms inside FeRA's
steps, and a third run C, FeRA with fecl_weight 0 (training_step then skips the frozen forward,
and fera_loss the FECL terms).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIME_TARGET, MEMORY_TARGET = 1.35, 1.10


def _check_host() -> None:
    raw = os.environ.get("COMFYUI_PATH")
    if not raw or not (Path(raw).expanduser() / "comfy" / "model_base.py").is_file():
        sys.exit("bench_train.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI")


_check_host()

import torch  # noqa: E402

torch.set_num_threads(2)
sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfy")]
from comfy_host import pack_module, setup_comfy, tiny_model  # noqa: E402

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
from comfy.weight_adapter import adapter_maps  # noqa: E402
from comfy_extras import nodes_train  # noqa: E402
from comfy_extras.nodes_custom_sampler import Guider_Basic  # noqa: E402

training = pack_module("nodes.train_loop")
train_nodes = pack_module("nodes.train_nodes")
objective_mod = pack_module("nodes.objective")
core_training = pack_module("fera_core.training")
keys = pack_module("nodes.module_paths")

EXPERTS, RANK = 3, 4
_LIBC = ctypes.CDLL("libc.so.6")


def model(channels):
    """The tests' tiny SD1.5 (two levels) at `channels` width; its text width follows."""
    mc = comfy.supported_models.SD15(dict(tiny_model("sd15").model.model_config.unet_config, model_channels=channels,
                                          context_dim=channels))
    mc.set_inference_dtype(torch.float32, None)
    m = mc.get_model({}, "model.diffusion_model.")
    gen = torch.Generator().manual_seed(0)
    m.diffusion_model.load_state_dict(
        {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in m.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(m, load_device=cpu, offload_device=cpu)


def data(size, channels):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, size, size, generator=gen), [[torch.randn(1, 77, channels, generator=gen), {}]]


def _rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


class Meter:
    """Per-step times and the peak memory added while training."""

    def __enter__(self):
        gc.collect()
        _LIBC.malloc_trim(0)
        self.base = _rss_kb("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.ticks = [time.perf_counter()]
        return self

    def tick(self, *_):
        self.ticks.append(time.perf_counter())

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            return
        self.peak_mb = (_rss_kb("VmHWM:") - self.base) / 1024
        self.steps = [b - a for a, b in zip(self.ticks, self.ticks[1:])][2:]
        self.step_s = statistics.median(self.steps)


@contextmanager
def comfy_checkpointing(diffusion_model, enabled):
    """TrainLoraNode's own gradient checkpointing (comfy_extras.nodes_train.patch), for the session."""
    blocks = nodes_train.find_all_highest_child_module_with_forward(diffusion_model) if enabled else []
    for block in blocks:
        nodes_train.patch(block)
    try:
        yield
    finally:
        for block in blocks:
            nodes_train.unpatch(block)


def run_lora(patcher, lat, pos, steps, checkpointing, dtype, rank=EXPERTS * RANK):
    paths = [p for p, _ in keys.diffusers_to_comfy(patcher.model).values()
             if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    mp = patcher.clone()
    params = []
    for path in paths:
        adapter = adapter_maps["LoRA"].create_train(mp.model.get_submodule(path).weight, rank=rank,
                                                    alpha=1.0).to(dtype)  # its lora_dtype
        mp.add_weight_wrapper(f"{path}.weight", adapter)
        params += list(adapter.parameters())
    mp.model.requires_grad_(False)
    mp.set_model_compute_dtype(dtype)  # as TrainLoraNode does with its training_dtype
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    with Meter() as meter, comfy_checkpointing(mp.model.diffusion_model, checkpointing):
        sampler = nodes_train.TrainSampler(torch.nn.MSELoss(), optimizer, loss_callback=meter.tick, batch_size=1,
                                           grad_acc=1, total_steps=steps, seed=0, training_dtype=dtype)
        guider = Guider_Basic(mp)
        guider.set_conds(pos * lat.shape[0])  # TrainLoraNode's expansion to one conditioning per image
        guider.sample(torch.zeros_like(lat), lat, sampler, torch.arange(lat.shape[0]), seed=0, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return meter, sum(p.numel() for p in params)


class FeclClock:
    """Time spent in FeRA's steps on the frozen forward and on the loss terms (FECL's own cost)."""

    def __init__(self):
        self.frozen = self.loss = 0.0

    def __enter__(self):
        self._predict, self._loss = objective_mod.ComfyObjective.predict, core_training.fera_loss
        clock = self

        def predict(obj, *args, experts, **kw):
            t = time.perf_counter()
            out = clock._predict(obj, *args, experts=experts, **kw)
            if not experts:
                clock.frozen += time.perf_counter() - t
            return out

        def loss(*args, **kw):
            t = time.perf_counter()
            out = clock._loss(*args, **kw)
            clock.loss += time.perf_counter() - t
            return out
        objective_mod.ComfyObjective.predict, core_training.fera_loss = predict, loss
        return self

    def __exit__(self, *exc):
        objective_mod.ComfyObjective.predict, core_training.fera_loss = self._predict, self._loss


def run_fera(patcher, lat, pos, steps, checkpointing, dtype, fecl_weight=0.1):
    adapter = train_nodes.new_adapter(patcher.model, "attention", RANK, 4.0, EXPERTS, 3, 0.7, "partition",
                                      fecl_weight, 0)
    settings = training.TrainSettings(steps=steps, learning_rate=1e-4, batch_size=1, seed=0,
                                      dtype=None if dtype == torch.float32 else dtype,
                                      gradient_checkpointing=checkpointing)
    with Meter() as meter, FeclClock() as clock:
        training.train(patcher, adapter, lat, pos, settings, progress=meter.tick)
    comfy.model_management.unload_all_models()
    clock.total = meter.ticks[-1] - meter.ticks[0]
    return meter, adapter.num_parameters(), clock


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15, help="a multiple of 3: each trainer as often in each position")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--channels", type=int, default=320, help="model_channels (320: SD1.5's own; 64: overhead-bound toy)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="training dtype (both nodes: bf16)")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="both without gradient checkpointing (both nodes: on)")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    patcher = model(args.channels)
    lat, pos = data(args.size, args.channels)
    common = (patcher, lat, pos, args.steps, args.checkpointing, dtype)
    trainers = {"A": lambda: run_lora(*common), "B": lambda: run_fera(*common), "C": lambda: run_fera(*common, 0.0)}
    out = {key: [] for key in trainers}
    for r in range(args.rounds):  # ABC, BCA, CAB, ...: no trainer always runs first on a drifting machine
        for key in "ABC"[r % 3:] + "ABC"[:r % 3]:
            out[key].append(trainers[key]())
    (lora, n_lora), (fera, n_fera, clocks), (plain, _, _) = (zip(*out[key]) for key in "ABC")
    n_lora, n_fera = n_lora[0], n_fera[0]
    med = lambda runs, attr: statistics.median(getattr(r, attr) for r in runs)
    t_a, t_b, m_a, m_b = med(lora, "step_s"), med(fera, "step_s"), med(lora, "peak_mb"), med(fera, "peak_mb")
    print(f"SD1.5-architecture model (model_channels {args.channels}), batch 1 x 4 x {args.size} x {args.size}, "
          f"{args.steps} steps x {args.rounds} rounds, {args.dtype}, checkpointing {'on' if args.checkpointing else 'off'}, "
          f"torch {torch.__version__}")
    print(f"{'':24}{'s/step':>10}{'peak MB':>10}{'params':>10}")
    print(f"{'A: LoRA rank 12':24}{t_a:10.3f}{m_a:10.1f}{n_lora:10d}")
    print(f"{'B: FeRA 3 x rank 4':24}{t_b:10.3f}{m_b:10.1f}{n_fera:10d}")
    t_c, m_c = med(plain, "step_s"), med(plain, "peak_mb")
    print(f"{'C: B without FECL':24}{t_c:10.3f}{m_c:10.1f}{n_fera:10d}")
    print(f"time B/A {t_b / t_a:.3f} (target <= {TIME_TARGET}), "
          f"paired median {statistics.median(b.step_s / a.step_s for a, b in zip(lora, fera)):.3f}; "
          f"memory B/A {m_b / m_a:.3f} (target <= {MEMORY_TARGET})")
    fastest = {key: min(s for r in runs for s in r.steps) for key, runs in zip("ABC", (lora, fera, plain))}
    print(f"fastest step (interference only slows a step down): A {fastest['A']:.3f}, B {fastest['B']:.3f}, "
          f"C {fastest['C']:.3f} s; B/A {fastest['B'] / fastest['A']:.3f}, B/C {fastest['B'] / fastest['C']:.3f}, "
          f"C/A {fastest['C'] / fastest['A']:.3f}")
    print("per round s/step A, B, C: " + "; ".join(f"{a.step_s:.3f}, {b.step_s:.3f}, {c.step_s:.3f}"
                                                 for a, b, c in zip(lora, fera, plain)))
    frozen = statistics.median(c.frozen / c.total for c in clocks)
    loss = statistics.median(c.loss / c.total for c in clocks)
    print(f"FECL's own cost inside FeRA's steps: frozen forward {frozen:.1%}, loss terms (MSE + FECL) {loss:.1%}; "
          f"B/C {t_b / t_c:.3f} time, {m_b / m_c:.3f} memory; C/A {t_c / t_a:.3f} time")


if __name__ == "__main__":
    main()
