"""What Apply SODA costs when ComfyUI loads a full-size model: the factorisation and merge of every adapted
weight (CPU, one thread; random weights of the real shapes).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_soda_factorisation.py [--families sd15 sdxl] [--reps 3]

The shapes are those of ComfyUI's own full-size SD1.5 and SDXL UNets (built on the meta device, nothing
allocated), adapted layers as Train SODA's 'attention' preset: to_q, to_k, to_v, to_out.0 of every
attention. For each distinct weight shape, a random weight (std 0.02, float32 as ComfyUI hands weights to
patches) goes through the SODA patch's first call (LayerMerge.difference: factorisation, spectrum
increment, rotation; what happens once per model load) and a second call (cache hit: the merge alone; what
ComfyUI's low-VRAM modes pay per forward). Times are medians over --reps and are multiplied by the number
of layers of that shape. The cache's memory is the adapted weights' size in the model's dtype. Times are
the process's CPU time on one thread: on a machine shared with other work, wall-clock time measures the
neighbours; CPU time is what the factorisation itself costs (on an idle machine, about its wall time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if not os.environ.get("COMFYUI_PATH"):
    sys.exit("bench_soda_factorisation.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI")

import torch  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfy")]
from comfy_host import build_model, pack_module  # noqa: E402

from fera_core.soda import SODAConfig  # noqa: E402
from fera_core.soda.adapter import new_layer  # noqa: E402
from fera_core.soda.merge import LayerMerge  # noqa: E402

keys = pack_module("nodes.module_paths")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def shapes(family) -> Counter:
    model = build_model(family)
    found = Counter()
    for path, (comfy_path, rows) in keys.diffusers_to_comfy(model).items():
        if path.endswith(ATTENTION) and "attn" in path:
            found[tuple(model.get_submodule(comfy_path).weight.shape)] += 1
    return found


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU seconds; medians of {args.reps}")
    for family in args.families:
        counts = shapes(family)
        n_layers, n_values = sum(counts.values()), sum(c * s[0] * s[1] for s, c in counts.items())
        print(f"{family}: {n_layers} adapted weights, {n_values / 1e6:.1f} M values "
              f"(cache: {n_values * 2 / 2**20:.0f} MiB in fp16); shapes {dict(counts)}")
        for variant in ("svd", "qr"):
            first = again = 0.0
            per_shape = []
            for shape, count in counts.items():
                layer = new_layer(SODAConfig(variant=variant), shape)
                with torch.no_grad():
                    layer.spectrum.normal_(0, 0.1)
                weight = torch.randn(shape) * 0.02

                def cold():
                    LayerMerge(layer, torch.float16).difference(weight)
                merge = LayerMerge(layer, torch.float16)
                merge.difference(weight)
                t_first, t_again = timed(cold, args.reps), timed(lambda: merge.difference(weight), args.reps)
                first, again = first + count * t_first, again + count * t_again
                per_shape.append(f"{shape[0]}x{shape[1]}: {t_first * 1e3:.0f} / {t_again * 1e3:.1f} ms")
            print(f"  soda-{variant}: model load {first:.1f} s, again from the cache {again:.2f} s "
                  f"(per weight, first / cached: {'; '.join(per_shape)})")


if __name__ == "__main__":
    main()
