"""FeRA's cost on a real-size video model in a real ComfyUI host (CPU), ComfyUI 0.33.0 (has Wan).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_video.py [--blocks N] [--rounds N]

Not a test: prints the ratios. Two measurements:

1. Sampling overhead. A Wan 2.1 1.3B block stack at its real width (dim 1536, ffn 8960, 12 heads;
   --blocks of its 30, default 2) built from ComfyUI's own WAN21_T2V class with random float32
   weights, called through BaseModel.apply_model (where FeRA's wrapper and hooks run) on the latent
   of a short clip: 5 frames of 480x832 -> (1, 16, 2, 60, 104), 3120 tokens. A (plain model) and B
   (Apply FeRA's clone: an adapter on every attention and feed-forward Linear of the blocks, 3
   experts of rank 4, 'partition' indicator) alternate A, B, A, B in one process after a warm-up of
   each. Reported: the median of the paired ratios B/A. Target: < 1.05.
2. The band-energy indicator on a (1, 16, 21, 60, 104) latent (81 frames of 480x832) against one
   model call at that size. A full 1.3B call at 32760 tokens takes many minutes on this CPU, so the
   call is bounded from below by 30 x one matmul every block does (x @ ffn.0: 32760 x 1536 x 8960);
   the indicator's share of that bound is an upper bound of its share of a call. Target: < 1%.

Run on ComfyUI 0.33.0 here (2 shared cores, other workers busy), --rounds 3: indicator 103 ms, one
call >= 555 s, share <= 0.02%; 2 blocks, 20 adapted layers: A 23.9 s, B 24.0 s per call, paired B/A
median 1.003 (rounds 1.102, 1.003, 0.964: the machine's noise, not FeRA's cost, spreads them).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "comfy")]

import torch  # noqa: E402

from comfy_host import pack_module, patcher_of, setup_comfy  # noqa: E402

WAN_1_3B = dict(image_model="wan2.1", model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, text_dim=4096,
                freq_dim=256, in_dim=16, out_dim=16, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
                cross_attn_norm=True, eps=1e-6)


def model_call(patcher, x, sigma, context):
    """One call as a sampler makes it: BaseModel.apply_model runs the APPLY_MODEL wrappers of the options."""
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, c_crossattn=context,
                                         transformer_options=patcher.model_options.get("transformer_options", {}))


def sampling_overhead(blocks: int, rounds: int) -> None:
    setup_comfy()
    import comfy.supported_models
    train_nodes, routing = pack_module("nodes.train_nodes"), pack_module("nodes.routing")
    patcher = patcher_of(comfy.supported_models.WAN21_T2V(dict(WAN_1_3B, num_layers=blocks)))
    adapter = train_nodes.new_adapter(patcher.model, "attention + feed-forward", 4, 4.0, 3, 3, 0.7, "partition", 0.1, 0)
    with torch.no_grad():
        for e in adapter.layers.values():
            e.up.normal_(0, 0.01)
    fera = routing.apply_fera(patcher, adapter, 1.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 60, 104, generator=gen)
    context = torch.randn(1, 512, 4096, generator=gen)
    sigma = torch.tensor([0.5])
    times = {"A": [], "B": []}
    for r in range(rounds + 1):
        for name, p in (("A", patcher), ("B", fera)):
            p.patch_model()
            start = time.perf_counter()
            model_call(p, x, sigma, context)
            elapsed = time.perf_counter() - start
            p.unpatch_model()
            if r:
                times[name].append(elapsed)
    pairs = [b / a for a, b in zip(times["A"], times["B"])]
    print(f"Wan 2.1 1.3B width, {blocks} blocks, (1,16,2,60,104) = 3120 tokens, {len(adapter.layers)} adapted layers")
    print(f"  A median {statistics.median(times['A']):.2f} s, B median {statistics.median(times['B']):.2f} s, "
          f"paired B/A median {statistics.median(pairs):.3f} (all: {', '.join(f'{p:.3f}' for p in pairs)})")


def indicator_share() -> None:
    from fera_core.indicator import band_energies
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 21, 60, 104, generator=gen)
    band_energies(latent, 3, "partition")  # warm-up: builds the cached DCT matrices
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        band_energies(latent, 3, "partition")
        runs.append(time.perf_counter() - start)
    tokens = 21 * 30 * 52
    x, w = torch.randn(tokens, 1536), torch.randn(8960, 1536)
    start = time.perf_counter()
    torch.nn.functional.linear(x, w)
    matmul = time.perf_counter() - start
    bound = 30 * matmul
    print(f"indicator on (1,16,21,60,104): {min(runs) * 1e3:.1f} ms; one call >= 30 x ffn.0 matmul = {bound:.1f} s; "
          f"share <= {min(runs) / bound:.4%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    indicator_share()
    sampling_overhead(args.blocks, args.rounds)


if __name__ == "__main__":
    main()
