"""Sampling-time cost of routing traces in a real ComfyUI host (CPU, 2 threads).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_trace.py [--rounds N] [--steps S] [--size L]
        [--threads T]

Not a test: prints a compact table. The full-size SD1.5 UNet and adapter of bench_sampling.py
(random weights, batch 1 with CFG, euler) with FeRA applied twice: tracing
off (A: what every workflow without a trace node runs) and tracing on (B: a TracedRun per sample,
records per call, step counting through the sampler callback, packing and the output fingerprint
at the end; no live events, there is no websocket client). A and B alternate in one process after a
warm-up of each, in the order AB, BA, AB, ... (an even --rounds cancels any cost of running second).
Reported: medians, med/med and the median of the paired ratios B/A per sample and per model call,
the position effect (second sample of a pair against the first), and the time spent inside the
tracing code itself (timed around each of its entry points), as a share of a sample. Target:
B/A <= 1.01.

Defaults: a 32x32 latent, 1 step per sample, 40 pairs (about 4-5 minutes on 2 CPU cores). Tracing
costs per model call and per run, never per pixel, so a small latent and one-step runs give it its
largest share of a sample (the ratio bounds larger images and longer runs), and they let one run
hold enough pairs to resolve 1% against this kind of machine's 3-5% noise per model call
(--size 64 --steps 3 takes ~40 s per sample; 4 pairs there cannot tell 1.01 from 1.02).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import Case, pack_module, routing, sd15_adapter, sd15_patcher, torch  # noqa: E402

tracing = pack_module("nodes.tracing")
TARGET = 1.01


def instrument(seconds: list[float]):
    """Time every entry point of the tracing code (run start, per-call record, step callback, end)."""
    cls = tracing.TracedRun

    def timed(fn):
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[0] += time.perf_counter() - t0
        return inner

    cls.__init__, cls.record, cls.end = timed(cls.__init__), timed(cls.record), timed(cls.end)
    callback = cls.callback
    cls.callback = lambda self, original: timed(callback(self, original))


def main(argv):
    option = lambda name, default: int(argv[argv.index(name) + 1]) if name in argv else default  # noqa: E731
    rounds, steps, size = option("--rounds", 40), option("--steps", 1), option("--size", 32)
    torch.set_num_threads(option("--threads", torch.get_num_threads()))
    sp, adapter = sd15_patcher(), sd15_adapter()
    case = Case("sd15", sp, adapter, torch.zeros(1, 4, size, size), 768, steps=steps)
    case.plain = routing.apply_fera(sp, adapter, 1.0, tracing=False)  # A: tracing off
    case.fera = routing.apply_fera(sp, adapter, 1.0, tracing=True)  # B: tracing on
    inside = [0.0]
    instrument(inside)
    for patcher in (case.plain, case.fera):  # warm-up
        case.sample(patcher)
    (fera,) = routing.routings_of(case.fera)
    run = fera.log.runs[-1]
    rows = run.trace.rows()
    assert len(rows) == steps * 2 and {r["step"] for r in rows} == set(range(steps)), rows
    inside[0] = 0.0
    print(f"[warm-up done: {len(rows)} traced rows; {rounds} rounds follow]", flush=True)
    timings = case.run(rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; full-size SD1.5, 1x4x{size}x{size} latent with "
          f"CFG, euler {steps} steps, {len(adapter.layers)} adapted layers; {rounds} rounds of A (tracing off) and B "
          "(tracing on), interleaved")
    print(f"{'timed':<11} {'n':>3} {'off med s':>10} {'on med s':>9} {'med/med':>8} {'med(B/A)':>9}  verdict")
    for unit, (a, b) in timings.items():
        ma, mb = statistics.median(a), statistics.median(b)
        ratios = [y / x for x, y in zip(a, b)]
        paired = statistics.median(ratios)
        verdict = "ok" if paired <= TARGET else f"OVER {TARGET:.2f}x"
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (paired,) * 3
        print(f"{'sample' if unit == 'sample' else 'model call':<11} {len(a):>3} {ma:>10.3f} {mb:>9.3f} "
              f"{mb / ma:>7.4f}x {paired:>8.4f}x  {verdict} (quartiles of B/A {q1:.3f}-{q3:.3f})")
    a, b = timings["sample"]
    position = statistics.median(y / x if r % 2 == 0 else x / y for r, (x, y) in enumerate(zip(a, b)))
    print(f"position effect: the second sample of a pair took {position:.4f}x the first (median over rounds, "
          "whichever ran second; alternation cancels it)")
    per_sample = inside[0] / rounds
    sample = statistics.median(timings["sample"][1])
    print(f"inside the tracing code: {per_sample * 1e3:.2f} ms per traced sample = {per_sample / sample:.2e} of a "
          f"sample ({per_sample / sample * 100:.4f}%); the sample-level ratio is machine noise around that")
    print(f"one run's trace: {len(rows)} rows, {len(run.trace.calls)} calls, packed on the device into "
          f"{len(rows) * (adapter.config.num_bands + adapter.config.num_experts + 1) * 4} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
