"""How SODA keeps its rotation factors orthogonal: PyTorch's orthogonal parametrization against geoopt's
Riemannian Adam on the Stiefel manifold, on the demo task (CPU, one thread).

    python benchmarks/bench_soda_orthogonal.py [--steps 120] [--rounds 4] [--lr 2e-3] [--variant svd]

geoopt is not a dependency of the pack: install it to run this (pip install geoopt). Both runs adapt the
demo's shipped tiny flow-matching UNet (fera_core.demo) to its striped rectangles with SODA on the demo's
FeRA targets (attention projections, residual convolutions, output convolution), from the same seed, with
the same batches and noise, the shared training step and the same learning rate:
  A: torch.nn.utils.parametrizations.orthogonal (matrix exponential of a skew matrix times a base) on each
     factor, every parameter updated by torch.optim.Adam (the pack's default);
  B: each factor a geoopt.ManifoldParameter on geoopt.Stiefel(), all parameters updated by
     geoopt.optim.RiemannianAdam (Euclidean Adam for the spectrum increments).
Reported: the mean loss over blocks of steps (the same draws for both), a fixed-draw evaluation loss after
training, CPU seconds per step (one thread: the process's CPU time, robust to the neighbours of a shared
machine; median of each run's steps; rounds alternate the order AB, BA), and the largest max |R^T R - I|
over every factor after training.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fera_core.demo.model import load_base, striped_tiles  # noqa: E402
from fera_core.demo.run import CONFIG  # noqa: E402
from fera_core.soda import SODAConfig, SODAModel  # noqa: E402
from fera_core.training import FLOW, training_step  # noqa: E402


class Objective:
    prediction = FLOW

    def __init__(self, soda):
        self.soda = soda

    def coefficients(self, u):
        return 1 - u, u, u

    def predict(self, x_t, sigma, cond, experts):
        return self.soda.predict(x_t, sigma, experts=experts)


def to_geoopt(soda):
    import geoopt
    from torch.nn.utils import parametrize
    for layer in soda.adapter.layers.values():
        for f in layer.rotation.factors:
            parametrize.remove_parametrizations(f, "weight", leave_parametrized=True)
            f.weight = geoopt.ManifoldParameter(f.weight.detach().clone(), manifold=geoopt.Stiefel())


def run(kind, args):
    torch.manual_seed(0)
    soda = SODAModel(load_base(), SODAConfig(variant=args.variant, target_modules=CONFIG["target_modules"]))
    if kind == "geoopt":
        import geoopt
        to_geoopt(soda)
        optimizer = geoopt.optim.RiemannianAdam(soda.adapter.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.Adam(soda.adapter.parameters(), lr=args.lr)
    objective, g = Objective(soda), torch.Generator().manual_seed(1)
    losses, times = [], []
    for _ in range(args.steps):
        t = time.process_time()
        loss = training_step(objective, striped_tiles(args.batch, g), None, soda.config, g).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - t)
        losses.append(loss.item())
    with torch.no_grad():
        ev = torch.Generator().manual_seed(99)
        evaluation = sum(training_step(objective, striped_tiles(16, ev), None, soda.config, ev).loss.item()
                         for _ in range(4)) / 4
    return {"losses": losses, "step_s": statistics.median(times[2:]), "eval": evaluation,
            "orthogonality": soda.adapter.orthogonality_error(), "params": soda.adapter.num_parameters()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--variant", choices=("svd", "qr"), default="svd")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {"torch": [], "geoopt": []}
    for r in range(args.rounds):
        for kind in (("torch", "geoopt") if r % 2 == 0 else ("geoopt", "torch")):
            out[kind].append(run(kind, args))
    import geoopt
    print(f"SODA-{args.variant} on the demo task: {args.steps} steps x batch {args.batch}, lr {args.lr}, "
          f"{args.rounds} rounds, torch {torch.__version__}, geoopt {geoopt.__version__}, "
          f"{out['torch'][0]['params']} trained values")
    block = max(1, args.steps // 6)
    for kind, runs in out.items():
        curve = [statistics.mean(runs[0]["losses"][i:i + block]) for i in range(0, args.steps, block)]
        print(f"{kind:7} loss per {block}-step block: " + " ".join(f"{v:.4f}" for v in curve))
    for kind, runs in out.items():
        step = [r["step_s"] for r in runs]
        print(f"{kind:7} s/step median {statistics.median(step):.4f} (rounds: {', '.join(f'{s:.4f}' for s in step)}); "
              f"eval loss {runs[0]['eval']:.4f}; max |R^T R - I| {max(r['orthogonality'] for r in runs):.2e}")
    ratio = statistics.median(g["step_s"] / t["step_s"] for t, g in zip(out["torch"], out["geoopt"]))
    same = all(r["losses"] == out["torch"][0]["losses"] for r in out["torch"])
    print(f"geoopt / torch time per step, paired median: {ratio:.3f}; runs deterministic: {same}")


if __name__ == "__main__":
    main()
