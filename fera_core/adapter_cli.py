"""`python -m fera_core info FILE [--layers] [--json]` and `convert IN.pt OUT.safetensors [--force]`:
what an adapter file (FeRA or SODA) holds, and a reference .pt rewritten in the project's safetensors format."""
from __future__ import annotations

import json
from pathlib import Path

from .adapter_file import COMFY, FORMAT_VERSION, FeRAAdapter, load_adapter, save_adapter
from .cli import guarded, refuse_existing
from .soda.adapter import FORMAT_VERSION as SODA_FORMAT_VERSION
from .soda.adapter import SODAAdapter, is_soda_path, load_soda


def add_parsers(sub) -> None:
    info = sub.add_parser("info", help="summary of an adapter: format, base model, experts, rank, router")
    info.add_argument("file")
    info.add_argument("--layers", action="store_true", help="also list every adapted layer with its sizes")
    info.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    info.set_defaults(handler=guarded(run_info))
    convert = sub.add_parser("convert", help="reference .pt -> .safetensors with metadata")
    convert.add_argument("src")
    convert.add_argument("dst")
    convert.add_argument("--force", action="store_true", help="overwrite dst if it exists")
    convert.set_defaults(handler=guarded(run_convert))
    for p in (info, convert):
        p.add_argument("--alpha", type=float, help="LoRA alpha of a reference .pt (default 1.0)")
        p.add_argument("--tau", type=float, help="router temperature of a reference .pt (default 0.7)")
        p.add_argument("--base-model", help="model family of a reference .pt (sd15, sdxl, ...)")


def _reference_options(args) -> dict:
    return {k: v for k, v in (("alpha", args.alpha), ("tau", args.tau), ("base_model", args.base_model)) if v is not None}


def _layer_entry(experts) -> dict:
    kernel = list(experts.down.shape[2:])
    return {"in": experts.in_features, "out": experts.out_features, **({"kernel": kernel} if kernel else {})}


def summary(path: Path, adapter: FeRAAdapter, with_layers: bool) -> dict:
    """What `info --json` prints: the file's format, its config and sizes (and layers on request)."""
    layers = adapter.layers
    info = {"file": str(path),
            "format": f"fera-safetensors-v{FORMAT_VERSION}" if path.suffix == ".safetensors" else "reference-pt",
            "config": adapter.config.to_dict(), "scale": adapter.config.scale, "key_namespace": adapter.key_namespace,
            "adapted_layers": len(layers), "parameters": adapter.num_parameters()}
    if with_layers:
        info["layers"] = {p: _layer_entry(e) for p, e in layers.items()}
    return info


def render(info: dict, given: dict) -> str:
    """The human summary of `info`, one field a line; per-layer lines when info has them."""
    c = info["config"]
    reference = info["format"] == "reference-pt"

    def note(key, flag):  # a .pt records neither alpha nor tau: say where the value came from
        if not reference:
            return ""
        return f" (given with {flag})" if key in given else f" (not in a .pt: reference default, change with {flag})"

    kinds = [("conv" if "kernel" in e else "linear") for e in info.get("layers", {}).values()]
    lines = [
        info["file"],
        ("  format          reference .pt (tensors only, read without unpickling)" if reference
         else f"  format          FeRA .safetensors, format version {FORMAT_VERSION}"),
        f"  base model      {c['base_model']}",
        f"  adapted layers  {info['adapted_layers']}" + (" (ComfyUI module names)" if info["key_namespace"] == COMFY else ""),
        f"  experts         {c['num_experts']} per layer, rank {c['rank']}",
        f"  alpha / scale   {c['alpha']} / {info['scale']}{note('alpha', '--alpha')}",
        f"  parameters      {info['parameters']:,}",
        f"  indicator       {c['indicator']}, {c['num_bands']} bands",
        f"  router          tau {c['router_tau']}{note('tau', '--tau')}, hidden {c['router_hidden']}",
        f"  target modules  {', '.join(c['target_modules'])} ("
        + ("full module paths" if c["match_full_name"] else "child-name substrings, as the reference") + ")",
    ]
    if "layers" in info:
        lines.append(f"  layers ({kinds.count('linear')} linear, {kinds.count('conv')} conv): in -> out")
        lines += [f"    {p}  {e['in']} -> {e['out']}" + (f"  kernel {tuple(e['kernel'])}" if "kernel" in e else "")
                  for p, e in info["layers"].items()]
    else:
        lines.append("(per-layer listing: --layers; machine-readable: --json)")
    return "\n".join(lines)


def soda_summary(path: Path, adapter: SODAAdapter, with_layers: bool) -> dict:
    """What `info --json` prints for a SODA file."""
    info = {"file": str(path), "format": f"soda-safetensors-v{SODA_FORMAT_VERSION}", "config": adapter.config.to_dict(),
            "adapted_layers": len(adapter.layers), "parameters": adapter.num_parameters(),
            "orthogonality_error": adapter.orthogonality_error()}
    if with_layers:
        info["layers"] = {p: {"shape": list(layer.shape), "spectrum": layer.spectrum.shape[0],
                              "factors": layer.rotation.sizes} for p, layer in adapter.layers.items()}
    return info


def render_soda(info: dict) -> str:
    c = info["config"]
    lines = [info["file"], f"  format          SODA .safetensors, format version {SODA_FORMAT_VERSION}",
             f"  method          soda-{c['variant']}, rotated side {c['side']}",
             f"  base model      {c['base_model']}", f"  adapted layers  {info['adapted_layers']}",
             f"  parameters      {info['parameters']:,}",
             f"  orthogonality   max |R^T R - I| {info['orthogonality_error']:.1e}",
             f"  target modules  {', '.join(c['target_modules'])}"]
    if "layers" in info:
        lines += [f"    {p}  {tuple(e['shape'])}  spectrum {e['spectrum']}, factors {'x'.join(map(str, e['factors']))}"
                  for p, e in info["layers"].items()]
    else:
        lines.append("(per-layer listing: --layers; machine-readable: --json)")
    return "\n".join(lines)


def run_info(args) -> None:
    given = _reference_options(args)
    path = Path(args.file)
    if is_soda_path(path):
        facts = soda_summary(path, load_soda(path), args.layers)
        print(json.dumps(facts, indent=1) if args.json else render_soda(facts))
        return
    facts = summary(path, load_adapter(path, **given), args.layers)
    print(json.dumps(facts, indent=1) if args.json else render(facts, given))


def run_convert(args) -> None:
    refuse_existing([args.dst], args.force)
    adapter = load_adapter(args.src, **_reference_options(args))
    save_adapter(adapter, args.dst)
    print(f"wrote {args.dst}: {len(adapter.layers)} layers, {adapter.num_parameters()} parameters")
