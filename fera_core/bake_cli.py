"""`python -m fera_core bake`: an adapter to one standard LoRA, or to per-expert LoRAs and a schedule.

    bake ADAPTER OUT.safetensors --mix 0.2,0.5,0.3 | --expert M | --latent Z.latent | --energies E
                                 | --trace TRACE.json [--start P --end P]
    bake ADAPTER OUT_PREFIX --schedule TRACE.json   (OUT_PREFIX_expert<m>.safetensors, _schedule.json,
                                                      _workflow.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapter_file import AdapterFileError, atomic_write, load_adapter
from .bake import bake_lora, router_mix, save_lora
from .bake_schedule import expert_loras, schedule, to_json, trace_steps
from .bake_workflow import hook_workflow
from .router import RoutingControls
from .trace import RoutingTrace

ROWS = ("all", "cond", "uncond")


def add_parser(sub) -> None:
    p = sub.add_parser("bake", help="adapter at a fixed mix -> one standard LoRA; or a trace -> per-expert LoRAs "
                                    "and a step schedule (JSON and a ComfyUI hook-keyframe workflow)")
    p.add_argument("adapter")
    p.add_argument("out", help="OUT.safetensors (fixed mix) or an output prefix (--schedule)")
    source = p.add_mutually_exclusive_group(required=True)
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
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(handler=run)


def run(args) -> int:
    try:
        options = {k: v for k, v in (("alpha", args.alpha), ("tau", args.tau)) if v is not None}
        adapter = load_adapter(args.adapter, **options)
        rows = None if args.rows == "all" else args.rows
        if args.schedule:
            return _schedule(adapter, args, rows)
        mix, source = _mix(adapter, args, rows)
        _refuse_existing([Path(args.out)], args.force)
        tensors, meta = bake_lora(adapter, mix, args.strength, dict(source, adapter=Path(args.adapter).name))
        save_lora(tensors, meta, args.out)
        print(f"wrote {args.out}: {len(adapter.layers)} layers, rank {json.loads(meta['fera.baked'])['rank']}, "
              f"mix {[round(w, 6) for w in mix]}")
    except (AdapterFileError, ValueError, OSError, SafetensorError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)}: already exists; pass --force to overwrite")


def _numbers(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def _read_trace(path: str) -> RoutingTrace:
    try:
        return RoutingTrace.from_json(Path(path).read_text())
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None


def _mix(adapter, args, rows) -> tuple[list[float], dict]:
    tau = args.temperature
    if args.trace:
        mix = _read_trace(args.trace).mean_weights(args.start, args.end, rows)
        return mix, {"kind": "trace", "trace": Path(args.trace).name, "window": [args.start, args.end], "rows": args.rows}
    if args.mix:
        return router_mix(adapter, controls=RoutingControls(mix=_numbers(args.mix))), {"kind": "mix"}
    if args.expert is not None:
        return router_mix(adapter, controls=RoutingControls.forced(args.expert, adapter.config.num_experts)), \
            {"kind": "expert", "expert": args.expert}
    controls = RoutingControls(tau=tau)
    if args.energies:
        energies = _numbers(args.energies)
        return router_mix(adapter, energies=energies, controls=controls), {"kind": "router", "energies": energies}
    tensors = load_file(args.latent)
    latent = tensors.get("latent_tensor", next(iter(tensors.values())) if len(tensors) == 1 else None)
    if latent is None:
        raise ValueError(f"{args.latent}: expected a 'latent_tensor' or a single tensor, found {len(tensors)} "
                         f"(e.g. {sorted(tensors)[:3]})")
    return router_mix(adapter, latent=latent.float(), controls=controls), {"kind": "router", "latent": Path(args.latent).name}


def _schedule(adapter, args, rows) -> int:
    steps = trace_steps(_read_trace(args.schedule), rows)
    prefix = Path(args.out)
    names = [f"{prefix.name}_expert{m}.safetensors" for m in range(adapter.config.num_experts)]
    data = schedule(adapter, steps, names, args.strength, args.rows)
    outputs = names + [f"{prefix.name}_schedule.json", f"{prefix.name}_workflow.json"]
    _refuse_existing([prefix.with_name(n) for n in outputs], args.force)
    for (tensors, meta), name in zip(expert_loras(adapter, {"kind": "schedule", "trace": Path(args.schedule).name}),
                                     names):
        save_lora(tensors, meta, prefix.with_name(name))
    written = names + [f"{prefix.name}_schedule.json"]
    atomic_write(prefix.with_name(written[-1]), lambda tmp: Path(tmp).write_text(to_json(data)))
    if data["keyframes"]:
        written.append(f"{prefix.name}_workflow.json")
        workflow = json.dumps(hook_workflow(data), indent=1)
        atomic_write(prefix.with_name(written[-1]), lambda tmp: Path(tmp).write_text(workflow))
    else:
        print(f"no workflow: {data['keyframes_unavailable']}", file=sys.stderr)
    print(f"wrote {', '.join(written)} ({len(steps)} steps) in {prefix.parent}")
    return 0
