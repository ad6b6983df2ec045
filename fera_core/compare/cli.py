"""python -m fera_core compare: LoRA, FeRA and FeRA's ablations at equal size on the demo model, measured.

Trains every method on the same images with the same training step, steps, noise and number of
adapter weights, picks each one's learning rate on a validation split, trains more seeds, samples
every adapter from the same seeds and scores the samples (fera_core.compare.metrics) against
held-out images of the new class and of the base classes it must not forget. Writes the results
(JSON), the table (markdown), the per-level plot and a grid of samples. Needs torch, safetensors,
numpy and matplotlib; no downloads.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..cli import guarded, refuse_existing
from ..demo.model import ASSET
from .methods import METHODS
from .report import save_levels_plot, save_samples, table
from .runner import FULL, QUICK, compare, with_overrides

FILES = {"results": "compare_results.json", "table": "compare_table.md", "plot": "compare_levels.png",
         "samples": "compare_samples.png"}


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="train LoRA, FeRA and FeRA's ablations at equal size on the demo model and "
                                       "score their samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default="fera_compare", help="output directory (default ./fera_compare)")
    p.add_argument("--quick", action="store_true", help="a short run: fewer steps, seeds and samples, no sweep")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated method ids (default all: {','.join(METHODS)})")
    p.add_argument("--steps", type=int, help="optimizer steps per run (overrides the preset)")
    p.add_argument("--seeds", type=int, help="training seeds per method (overrides the preset)")
    p.add_argument("--samples", type=int, help="images per scored set (overrides the preset)")
    p.add_argument("--sample-steps", type=int, help="Euler steps when sampling (overrides the preset)")
    p.add_argument("--lrs", help="learning rates to sweep, comma-separated (overrides the preset)")
    p.add_argument("--workers", type=int, help="training processes at once (default 2)")
    p.add_argument("--base", default=str(ASSET), help="base model weights (default: the shipped ones)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(handler=run)


@guarded
def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown or args.methods!r}; choose from {', '.join(METHODS)}")
    lrs = None if args.lrs is None else tuple(float(v) for v in args.lrs.split(","))
    settings = with_overrides(QUICK if args.quick else FULL, steps=args.steps, seeds=args.seeds,
                              samples=args.samples, sample_steps=args.sample_steps, lrs=lrs, workers=args.workers)
    if min(settings.steps, settings.seeds, settings.sample_steps) < 1 or settings.samples < 2 or not settings.lrs:
        raise ValueError(f"need at least 1 step, 1 seed, 1 sampling step, 2 samples and one learning rate: "
                         f"{settings}")
    out = Path(args.output)
    paths = {kind: out / name for kind, name in FILES.items()}
    refuse_existing(paths.values(), args.force)
    out.mkdir(parents=True, exist_ok=True)
    results, samples, data = compare(methods, settings, args.base, log=lambda text: print(text, file=sys.stderr))
    atomic_write_text(paths["results"], json.dumps(results, indent=1))
    atomic_write_text(paths["table"], table(results))
    save_levels_plot(results, paths["plot"])
    save_samples(samples, data, results["methods"], paths["samples"])
    print(table(results))
    print(f"{results['seconds']:.0f} s, load average {results['load_average']['start'][0]:.1f} -> "
          f"{results['load_average']['end'][0]:.1f} on {results['cpus']} CPUs", file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
