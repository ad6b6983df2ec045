"""python -m fera_core demo: the whole method on a fresh machine, in about two minutes on 2 CPU cores.

The project's own tiny diffusion model (fera_core.demo.model; trained on smooth discs and waves)
is taught striped rectangles as a new class, a kind of image that differs from the base data in
coarse structure (hard rectangles, flat backgrounds) and in fine texture (2-pixel stripes), once
with FeRA and once with a LoRA of equal size (fera_core.compare.methods). The demo then samples
the base model and both adapted ones from the same seeds, recording FeRA's routing at every
sampling step, and writes four files: the sample grid, the routing chart (the figure the ComfyUI
plot node draws), the trace (JSON) and the FeRA adapter (.safetensors). Needs torch, safetensors
and matplotlib; no diffusers, no ComfyUI, no downloads.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch

from ..adapter_file import save_adapter
from ..atomic import atomic_write, atomic_write_text
from ..compare.methods import LEARNING_RATES, METHODS
from ..model import FeRAModel
from ..trace import RoutingTrace
from ..training import FLOW, training_step
from .model import ASSET, NEW, base_images, load_base, striped_tiles

# Settings of the full run and of --quick (CI), in optimizer steps, sampling steps and samples.
FULL = {"steps": 200, "batch": 16, "sample_steps": 24, "samples": 8}
QUICK = {"steps": 40, "batch": 8, "sample_steps": 12, "samples": 4}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="adapt the shipped tiny model with FeRA and write samples, routing chart, "
                                    "trace and adapter", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="fera_demo", help="output directory (default ./fera_demo)")
    p.add_argument("--quick", action="store_true", help="a short run (CI): fewer steps and samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=str(ASSET), help="base model weights (default: the shipped ones)")
    p.set_defaults(handler=run)


class FlowObjective:
    """The demo model's objective: rectified flow, x_t = (1 - u) x0 + u noise, the model takes u."""

    prediction = FLOW

    def __init__(self, fera: FeRAModel):
        self.fera = fera

    def coefficients(self, u):
        return 1 - u, u, u

    def predict(self, x_t, sigma, cond, experts):
        return self.fera.predict(x_t, sigma, cond, experts=experts)


def progress(label: str, done: int, total: int, extra: str = "") -> None:
    end = "\n" if done == total else ""
    print(f"\r{label} {done}/{total} {extra}", end=end, file=sys.stderr, flush=True)


def adapt(adapted, batches, steps: int, lr: float, seed: int, label: str = "adapting") -> list[float]:
    """Train an adapter (fera_core.compare.methods.Adapted) with the shared training step (MSE, plus FECL
    by its config) and AdamW on batches(g) -> images, all labelled NEW. One generator draws the batches
    and the step's noise, so two adapters trained with one seed see the same images and noise."""
    fera = adapted.model
    objective = FlowObjective(fera)
    optimizer = torch.optim.AdamW(adapted.trainable, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    fera.adapter.train()
    for step in range(steps):
        x0 = batches(g)
        loss = training_step(objective, x0, torch.full((x0.shape[0],), NEW), adapted.config, g).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress(label, step + 1, steps, f"loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    fera.adapter.eval()
    return losses


@torch.no_grad()
def sample(fera: FeRAModel, n: int, steps: int, seed: int, experts: bool, trace: RoutingTrace | None = None,
           label: str = "sampling", cond: int = NEW):
    """Euler steps of the flow ODE from sigma 1 to 0 for class label `cond`; with experts, routed (and
    traced) every step."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    labels = torch.full((n,), cond)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        sigma = sigmas[i].expand(n)
        v = fera.predict(x, sigma, labels, experts=experts)
        if experts and trace is not None:
            trace.record(fera.current_e_t, fera.current_weights, sigma, step=i)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        progress(label, i + 1, steps)
    return x.clamp(-1, 1)


def save_grid(rows: dict[str, torch.Tensor], path: Path) -> None:
    """Rows of 32 x 32 images with their labels, via matplotlib's object API (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(v) for v in rows.values())
    fig = Figure(figsize=(1.1 * n + 1.6, 1.2 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), n, squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(((images[c].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy(), interpolation="nearest")
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=1.5 / (1.1 * n + 1.6), right=0.99, top=0.97, bottom=0.03, wspace=0.08, hspace=0.12)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


@contextlib.contextmanager
def one_thread():
    """One intra-op thread inside the block: the demo model's ops are too small to gain from more, and on a
    busy machine spinning OpenMP threads made them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(args) -> int:
    with one_thread():
        return _run(args)


def _run(args) -> int:
    from ..plot import save_routing_plot

    settings = QUICK if args.quick else FULL
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    models = {}
    for name in ("fera", "lora"):
        torch.manual_seed(args.seed)
        models[name] = METHODS[name][1](load_base(args.base))
    print(f"base model: {args.base}; FeRA and LoRA on {len(models['fera'].model.fera_layers)} layers, "
          f"trainable parameters: FeRA {sum(models['fera'].counts())} (router {models['fera'].counts()[1]}), "
          f"LoRA {sum(models['lora'].counts())}", file=sys.stderr)
    losses = {name: adapt(adapted, lambda g: striped_tiles(settings["batch"], g), settings["steps"],
                          LEARNING_RATES[name], args.seed, f"adapting with {METHODS[name][0]}")
              for name, adapted in models.items()}
    n, steps = settings["samples"], settings["sample_steps"]
    trace = RoutingTrace(meta={"adapter": "demo_adapter.safetensors", "run": "demo sampling",
                               "settings": {"steps": steps, "samples": n, "seed": args.seed}})
    fera_model = models["fera"].model
    base = sample(fera_model, n, steps, args.seed + 1, experts=False, label="sampling the base model")
    adapted = sample(fera_model, n, steps, args.seed + 1, experts=True, trace=trace, label="sampling with FeRA")
    with_lora = sample(models["lora"].model, n, steps, args.seed + 1, experts=True, label="sampling with LoRA")
    g = torch.Generator().manual_seed(args.seed + 2)
    paths = {"grid": out / "demo_samples.png", "routing chart": out / "demo_routing.png",
             "trace": out / "demo_trace.json", "adapter": out / "demo_adapter.safetensors"}
    save_grid({"base data": base_images(torch.arange(n) % 2, g), "base model": base, "FeRA": adapted,
               "LoRA": with_lora, "adaptation data": striped_tiles(n, g)}, paths["grid"])
    save_routing_plot(trace, paths["routing chart"], title="FeRA demo: expert weights while sampling")
    atomic_write_text(paths["trace"], trace.to_json())
    save_adapter(fera_model.adapter, paths["adapter"])
    print("adaptation loss " + ", ".join(f"{METHODS[name][0]} {sum(v[:10]) / 10:.3f} -> {sum(v[-10:]) / 10:.3f}"
                                         for name, v in losses.items()) + f"; {time.time() - start:.0f} s",
          file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
