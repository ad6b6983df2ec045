"""Sampling-time cost of a FeRA adapter in a real ComfyUI host (CPU, 2 threads).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_sampling.py [--quick] [--profile] [--budget S]

Not a test: prints a compact table. Each case samples with comfy.sample.sample (euler,
CFG on) with the plain ModelPatcher (A) and with the clone that nodes.routing.apply_fera
returns (B), alternating A, B, A, B, ... in one process, after one warm-up of each (the
FeRA warm-up is traced, to check the rows each model call sees). Timed: whole samples,
and every model call (BaseModel.apply_model, inside which FeRA's wrapper and layer hooks
run). Reported: medians of A and B, the ratio of the medians, the median of the paired
ratios B/A (runs back to back, so machine noise affects both alike), and min/min.
Target: B/A <= 1.10.

1. tiny: the SD1.5-architecture model of tests/comfy/tiny_sampling.py (model_channels 32,
   random weights), 2x4x8x8 latent, 3 steps, an adapter on to_q/to_k/to_v/to_out.0 of
   every attention (56 layers, 3 experts, rank 4), 'partition' indicator.
2. sd15: a full-size SD1.5 UNet built from ComfyUI's own classes (tests/comfy/comfy_host.build_model,
   the config ComfyUI detects from the released checkpoint), random float32 weights
   (std 0.02, norm weights 1, biases 0), batch 1 with CFG (the network sees 2 rows), 64x64
   latent (a 512x512 image), 3 steps. Adapter: /work/shared/fixtures/reference/
   sd15_reference_adapter.pt (96 layers: to_q/to_k/to_v of every attention, 3 experts,
   rank 4, 'reference' indicator) with fresh random expert up weights.

Runtime: about 9 minutes (--budget, default 540 s, sets the number of full-size rounds, at
least 3). On 2 CPU cores one full-size model call (2 rows at 64x64, ComfyUI's default CPU
attention) takes about 16 s, a 3-step sample about 47 s; the model needs ~4 GB of RAM.
--quick: fewer rounds (about 6 minutes). --profile: afterwards, where FeRA's time goes per
model call (band energies, router, expert gains, layer hooks; ATen op counts for tiny).
Run on an otherwise idle machine: other processes competing for the 2 cores stall the
OpenMP threads and can make single runs 10x slower; the paired ratio absorbs some of it.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD15_ADAPTER = Path("/work/shared/fixtures/reference/sd15_reference_adapter.pt")
TARGET = 1.10
BUDGET = 540.0              # seconds for the whole run; sets the number of full-size rounds
TINY_ROUNDS, TINY_ROUNDS_QUICK = 60, 15
SD15_ROUNDS_MIN, SD15_ROUNDS_MAX = 3, 10


def _check_host() -> None:
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        sys.exit("bench_sampling.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI")
    root = Path(raw).expanduser()
    if not (root / "comfy" / "model_base.py").is_file():
        sys.exit(f"COMFYUI_PATH={raw} is not a ComfyUI checkout (no comfy/model_base.py)")
    if not SD15_ADAPTER.is_file():
        sys.exit(f"missing the full-size adapter fixture {SD15_ADAPTER}")


_check_host()

import torch  # noqa: E402

torch.set_num_threads(2)

sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfy")]
from comfy_host import build_model, pack_module, setup_comfy  # noqa: E402

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402

routing = pack_module("nodes.routing")
keys = pack_module("nodes.module_paths")
fc = pack_module("fera_core")
trace_mod = pack_module("fera_core.trace")

CPU = torch.device("cpu")

# ---------------------------------------------------------------- models and adapters
# The tiny model and adapter of the host tests.
from tiny_sampling import make_adapter as tiny_adapter, tiny_patcher  # noqa: E402


def sd15_patcher(seed=0):
    """Full-size SD1.5 (ComfyUI's detection picks the class), built on meta, random float32 weights."""
    model = build_model("sd15", dtype=torch.float32)
    unet = model.diffusion_model.to_empty(device=CPU)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in unet.named_buffers():
            raise RuntimeError(f"unexpected buffer {name} in the UNet; initialise it explicitly")
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def sd15_adapter(seed=21):
    adapter = fc.load_adapter(SD15_ADAPTER, base_model="sd15")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in adapter.layers.values():
            e.up.normal_(0.0, 0.02, generator=gen)
    return adapter


# ---------------------------------------------------------------- sampling and timing
class Case:
    """One model, one adapter, one sampling setup; times whole samples and every model call."""

    def __init__(self, name, patcher, adapter, latent, context_dim, steps, cfg=5.0, seed=3):
        gen = torch.Generator().manual_seed(seed)
        self.name, self.steps, self.cfg = name, steps, cfg
        self.plain, self.adapter = patcher, adapter
        self.fera = routing.apply_fera(patcher, adapter, 1.0)
        self.latent = latent
        self.noise = torch.randn(latent.shape, generator=gen)
        self.pos = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
        self.neg = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
        # Wall time of every BaseModel.apply_model call (the samplers' model call; FeRA's APPLY_MODEL
        # wrapper and its layer hooks run inside it). An instance attribute on the shared BaseModel,
        # so plain and FeRA runs are timed by the same shim; the clone shares the model object.
        self.call_times: list[float] = []
        model = patcher.model
        bound = type(model).apply_model.__get__(model)

        def timed_apply_model(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return bound(*args, **kwargs)
            finally:
                self.call_times.append(time.perf_counter() - t0)
        model.apply_model = timed_apply_model

    def sample(self, patcher):
        """(seconds, [seconds per model call], output) of one comfy.sample.sample; models unloaded after."""
        self.call_times = []
        t0 = time.perf_counter()
        out = comfy.sample.sample(patcher, self.noise, self.steps, self.cfg, "euler", "normal", self.pos,
                                  self.neg, self.latent, denoise=1.0, seed=7, disable_pbar=True)
        dt = time.perf_counter() - t0
        comfy.model_management.unload_all_models()
        return dt, self.call_times, out

    def warm_up(self):
        """One plain run and one traced FeRA run: warm-up of each, and a check of what was measured."""
        ta, _, plain = self.sample(self.plain)
        trace = trace_mod.RoutingTrace()
        tb, _, got = self.sample(routing.apply_fera(self.plain, self.adapter, 1.0, trace=trace))
        rows = trace.rows()
        calls = len({r["call"] for r in rows})
        assert torch.isfinite(got).all() and torch.isfinite(plain).all(), "non-finite samples"
        assert {str(r["cond"]) for r in rows} == {"cond", "uncond"}, "CFG did not batch cond and uncond"
        return ta + tb, dict(calls=calls, rows_per_call=len(rows) // max(calls, 1),
                             effect=(got - plain).abs().max().item())

    def run(self, rounds):
        """Interleaved A (plain), B (FeRA) samples: {'sample': (a, b), 'call': (a, b)} lists of seconds.

        Rounds alternate AB, BA, ...: whatever the second sample of a pair gains or loses from the first
        (caches, memory, the clock of a shared machine) falls on A and B equally often.
        """
        out = {"sample": ([], []), "call": ([], [])}
        for r in range(rounds):
            for patcher, i in ((self.plain, 0), (self.fera, 1))[::1 if r % 2 == 0 else -1]:
                dt, calls, _ = self.sample(patcher)
                out["sample"][i].append(dt)
                out["call"][i].extend(calls)
        return out


def report(results):
    head = (f"{'case':<5} {'timed':<11} {'n':>3} {'plain med s':>11} {'FeRA med s':>10} {'med/med':>8} "
            f"{'med(B/A)':>8} {'min/min':>8}  verdict")
    print(head)
    print("-" * len(head))
    for name, info, timings in results:
        for unit, (a, b) in timings.items():
            ma, mb = statistics.median(a), statistics.median(b)
            paired = statistics.median(y / x for x, y in zip(a, b))
            verdict = "ok" if paired <= TARGET else f"OVER {TARGET:.2f}x"
            label = "sample" if unit == "sample" else "model call"
            print(f"{name:<5} {label:<11} {len(a):>3} {ma:>11.4f} {mb:>10.4f} {mb / ma:>7.3f}x "
                  f"{paired:>7.3f}x {min(b) / min(a):>7.3f}x  {verdict}")
    for name, info, _ in results:
        print(f"{name}: {info['calls']} model calls per sample, {info['rows_per_call']} rows per call "
              f"(cond + uncond), max |FeRA - plain| of the sampled latent {info['effect']:.3g}; {info['desc']}")
    print(f"med(B/A): median over rounds of FeRA/plain, each pair run back to back (model calls paired by "
          f"position); target <= {TARGET:.2f}x")


# ---------------------------------------------------------------- profiling (--profile)
def profile_fera(case, samples, count_ops=False):
    """Where FeRA's time goes: perf_counter accumulators around its pieces, `samples` FeRA samples
    interleaved with plain ones; optionally ATen op counts per model call (torch.profiler)."""
    fe = routing.FeRARouting
    orig_hook, orig_be, orig_eg = fe.hook, routing.band_energies, routing.expert_gains
    router_cls = type(case.adapter.router)
    acc = {"band_energies": 0.0, "router": 0.0, "expert_gains": 0.0, "layer hooks": 0.0}
    clock = time.perf_counter

    def timed(key, fn):
        def inner(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += clock() - t0
        return inner

    def hook(self, entries):
        return timed("layer hooks", orig_hook(self, entries))

    routing.band_energies, routing.expert_gains = timed("band_energies", orig_be), timed("expert_gains", orig_eg)
    fe.hook = hook
    router_cls.__call__ = timed("router", torch.nn.Module.__call__)
    plain_calls, fera_calls, ops = [], [], {}
    try:
        patched = routing.apply_fera(case.plain, case.adapter, 1.0)  # hooks made now are instrumented
        case.sample(patched)  # warm-up of the instrumented clone
        for k in acc:
            acc[k] = 0.0
        for _ in range(samples):
            plain_calls += case.sample(case.plain)[1]
            fera_calls += case.sample(patched)[1]
        if count_ops:
            from torch.profiler import ProfilerActivity, profile
            for name, p in (("plain", case.plain), ("FeRA", patched)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    case.sample(p)
                ops[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")) / case.steps
    finally:
        routing.band_energies, routing.expert_gains, fe.hook = orig_be, orig_eg, orig_hook
        del router_cls.__call__  # back to nn.Module.__call__

    n = len(fera_calls)
    ma, mb = statistics.median(plain_calls), statistics.median(fera_calls)
    per = {k: v / n for k, v in acc.items()}
    print(f"\nprofile {case.name}: {samples} samples each, interleaved; per model call: plain {ma * 1e3:.2f} ms, "
          f"FeRA {mb * 1e3:.2f} ms (median), difference {(mb - ma) * 1e3:+.2f} ms")
    for k, v in per.items():
        print(f"  {k:<14} {v * 1e3:9.3f} ms  ({v / ma * 100:5.2f}% of a plain call)")
    rest = (mb - ma) - sum(per.values())
    print(f"  {'rest':<14} {rest * 1e3:9.3f} ms  (difference minus the above: hook dispatch, wrapper, noise)")
    if ops:
        print(f"  ATen ops per model call (nested included): plain {ops['plain']:.0f}, FeRA {ops['FeRA']:.0f} "
              f"(+{ops['FeRA'] - ops['plain']:.0f})")


# ---------------------------------------------------------------- main
def main(argv):
    quick, do_profile = "--quick" in argv, "--profile" in argv
    budget = float(argv[argv.index("--budget") + 1]) if "--budget" in argv else BUDGET
    begin = time.perf_counter()
    import comfy.ldm.modules.attention as attention
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ComfyUI at {os.environ['COMFYUI_PATH']}, "
          f"attention {attention.optimized_attention.__name__}", flush=True)
    results = []

    tp = tiny_patcher()
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    latent = torch.stack([torch.sin(xx / 4 + yy / 5).expand(4, 8, 8) * 3,
                          ((xx + yy) % 2 * 2 - 1).expand(4, 8, 8) * 3])
    ta = tiny_adapter(tp.model)
    tiny = Case("tiny", tp, ta, latent, 32, steps=3)
    _, info = tiny.warm_up()
    info["desc"] = (f"2x4x8x8 latent, {len(ta.layers)} adapted layers, {ta.config.num_experts} experts, "
                    f"rank {ta.config.rank}, indicator {ta.config.indicator}")
    results.append(("tiny", info, tiny.run(TINY_ROUNDS_QUICK if quick else TINY_ROUNDS)))
    print(f"[tiny done at {time.perf_counter() - begin:.0f} s]", flush=True)

    sp = sd15_patcher()
    adapter = sd15_adapter()
    sd15 = Case("sd15", sp, adapter, torch.zeros(1, 4, 64, 64), 768, steps=3)
    print(f"[sd15 model and adapter ready at {time.perf_counter() - begin:.0f} s]", flush=True)
    warm, info = sd15.warm_up()
    info["desc"] = (f"1x4x64x64 latent, {len(adapter.layers)} adapted layers, {adapter.config.num_experts} "
                    f"experts, rank {adapter.config.rank}, indicator {adapter.config.indicator}")
    left = budget - (time.perf_counter() - begin) - (2 * warm if do_profile else 0)
    lo, hi = (2, 3) if quick else (SD15_ROUNDS_MIN, SD15_ROUNDS_MAX)
    rounds = max(lo, min(hi, int(left / warm)))
    print(f"[sd15 warm-up (one plain + one FeRA sample) took {warm:.0f} s; {rounds} rounds to stay near "
          f"the {budget:.0f} s budget]", flush=True)
    results.append(("sd15", info, sd15.run(rounds)))
    print(f"[sd15 done at {time.perf_counter() - begin:.0f} s]\n", flush=True)

    report(results)
    if do_profile:
        profile_fera(tiny, 20, count_ops=True)
        profile_fera(sd15, 1)


if __name__ == "__main__":
    main(sys.argv[1:])
