"""`python -m fera_core bake`: an adapter to one standard LoRA, or to per-expert LoRAs and a schedule.

    bake ADAPTER OUT.safetensors --mix 0.2,0.5,0.3 | --expert M | --latent Z.latent | --energies E
                                 | --trace TRACE.json [--start P --end P]
    bake ADAPTER OUT_PREFIX --schedule TRACE.json   (OUT_PREFIX_expert<m>.safetensors, _schedule.json,
                                                      _workflow.json)
    bake SODA_ADAPTER OUT.safetensors --base UNET --rank R   (a SODA adapter: best rank-R LoRA of its change
                                                             to the base weights, energy kept per layer)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from ..adapter_file import load_adapter
from ..atomic import atomic_write_text
from ..cli import guarded, refuse_existing
from ..router import parse_numbers
from ..soda.adapter import is_soda_path, load_soda
from ..trace import RoutingTrace
from .lora import bake_lora, save_lora
from .mix import ROWS, resolve_mix, trace_rows
from .schedule import expert_loras, schedule, to_json, trace_steps
from .soda import bake_soda, read_base_weights
from .workflow import hook_workflow


def add_parser(sub) -> None:
    p = sub.add_parser("bake", help="adapter at a fixed mix -> one standard LoRA; or a trace -> per-expert LoRAs "
                                    "and a step schedule (JSON and a ComfyUI hook-keyframe workflow)")
    p.add_argument("adapter")
    p.add_argument("out", help="OUT.safetensors (fixed mix) or an output prefix (--schedule)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--mix", help="expert weights, e.g. 0.2,0.5,0.3 (normalised, as Apply FeRA's mix)")
    source.add_argument("--expert", type=int, help="one expert alone")
    source.add_argument("--latent", help="the router's own mix for this latent (.latent or .safetensors; mean over rows)")
    source.add_argument("--energies", help="the router's own mix for these band energies, e.g. 0.6,0.3,0.1")
    source.add_argument("--trace", help="the mean mix of a routing trace (JSON) over --start..--end")
    source.add_argument("--schedule", metavar="TRACE", help="per-expert LoRAs + the trace's per-step strengths")
    p.add_argument("--start", type=float, default=0.0, help="--trace window start (schedule percent)")
    p.add_argument("--end", type=float, default=1.0, help="--trace window end (schedule percent)")
    p.add_argument("--rows", choices=ROWS, default="all", help="trace rows averaged (default all)")
    p.add_argument("--strength", type=float, default=1.0, help="Apply FeRA's strength, folded into the LoRA")
    p.add_argument("--temperature", type=float, help="router temperature for --latent/--energies")
    p.add_argument("--alpha", type=float, help="LoRA alpha of a reference .pt (default 1.0)")
    p.add_argument("--tau", type=float, help="router temperature of a reference .pt (default 0.7)")
    p.add_argument("--base", help="SODA: the base model's diffusers weights (a .safetensors file, or a folder: "
                                  "shards, or a pipeline with unet/ or transformer/)")
    p.add_argument("--rank", type=int, help="SODA: rank of the baked LoRA")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(handler=guarded(run))


def run(args) -> None:
    given = [k for k in ("mix", "expert", "latent", "energies", "trace", "schedule") if getattr(args, k) is not None]
    if is_soda_path(args.adapter):
        if given or not (args.base and args.rank):
            raise ValueError(f"{args.adapter} is a SODA adapter: bake it with --base BASE_WEIGHTS --rank R "
                             f"(not {', '.join('--' + k for k in given) or 'without them'})")
        return _soda(args)
    if not given:
        raise ValueError("a FeRA bake needs one of --mix, --expert, --latent, --energies, --trace, --schedule")
    options = {k: v for k, v in (("alpha", args.alpha), ("tau", args.tau)) if v is not None}
    adapter = load_adapter(args.adapter, **options)
    if args.schedule:
        return _schedule(adapter, args)
    mix, source = resolve_mix(adapter, **_source(args))
    refuse_existing([args.out], args.force)
    files = {k: Path(getattr(args, k)).name for k in ("adapter", "trace", "latent") if getattr(args, k)}
    tensors, meta = bake_lora(adapter, mix, args.strength, dict(source, **files))
    save_lora(tensors, meta, args.out)
    print(f"wrote {args.out}: {len(adapter.layers)} layers, rank {json.loads(meta['fera.baked'])['rank']}, "
          f"mix {[round(w, 6) for w in mix]}")


def _soda(args) -> None:
    adapter = load_soda(args.adapter)
    refuse_existing([args.out], args.force)
    weights = read_base_weights(args.base, adapter.layers)
    tensors, meta, captured = bake_soda(adapter, weights, args.rank, args.strength,
                                        source={"adapter": Path(args.adapter).name})
    save_lora(tensors, meta, args.out)
    for path, fraction in captured.items():
        print(f"  {path}  {fraction:.4f}")
    print(f"wrote {args.out}: {len(captured)} layers, rank {args.rank}; energy of the weight change kept: "
          f"min {min(captured.values()):.4f}, mean {sum(captured.values()) / len(captured):.4f}")


def _read_trace(path: str) -> RoutingTrace:
    try:
        return RoutingTrace.from_json(Path(path).read_text())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def _read_latent(path: str):
    tensors = load_file(path)
    latent = tensors.get("latent_tensor", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if latent is None:
        raise ValueError(f"{path}: expected a 'latent_tensor' or a single tensor, found {len(tensors)} "
                         f"(e.g. {sorted(tensors)[:3]})")
    return latent.float()


def _source(args) -> dict:
    """resolve_mix's arguments for the one source option given."""
    if args.trace:
        return dict(trace=_read_trace(args.trace), window=(args.start, args.end), rows=args.rows)
    if args.mix:
        return dict(mix=parse_numbers(args.mix, "--mix"))
    if args.expert is not None:
        return dict(expert=args.expert)
    if args.energies:
        return dict(energies=parse_numbers(args.energies, "--energies"), temperature=args.temperature)
    return dict(latent=_read_latent(args.latent), temperature=args.temperature)


def _schedule(adapter, args) -> None:
    steps = trace_steps(_read_trace(args.schedule), trace_rows(args.rows))
    prefix = Path(args.out)
    names = [f"{prefix.name}_expert{m}.safetensors" for m in range(adapter.config.num_experts)]
    data = schedule(adapter, steps, names, args.strength, args.rows)
    texts = {f"{prefix.name}_schedule.json": to_json(data)}
    if data["keyframes"]:
        texts[f"{prefix.name}_workflow.json"] = json.dumps(hook_workflow(data), indent=1)
    else:
        print(f"no workflow: {data['keyframes_unavailable']}", file=sys.stderr)
    refuse_existing([prefix.with_name(n) for n in names + list(texts)], args.force)
    for (tensors, meta), name in zip(expert_loras(adapter, {"kind": "schedule", "trace": Path(args.schedule).name}),
                                     names):
        save_lora(tensors, meta, prefix.with_name(name))
    for name, text in texts.items():
        atomic_write_text(prefix.with_name(name), text)
    print(f"wrote {', '.join(names + list(texts))} ({len(steps)} steps) in {prefix.parent}")
