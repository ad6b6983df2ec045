"""python -m fera_core info FILE | convert IN.pt OUT.safetensors"""
from __future__ import annotations

import argparse
import json
import sys

from . import bake_cli
from .adapter_file import AdapterFileError, load_adapter, save_adapter


def _reference_options(args) -> dict:
    return {k: v for k, v in (("alpha", args.alpha), ("tau", args.tau), ("base_model", args.base_model)) if v is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fera_core", description="Inspect and convert FeRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="config, adapted layers and parameter count of an adapter")
    info.add_argument("file")
    convert = sub.add_parser("convert", help="reference .pt -> .safetensors with metadata")
    convert.add_argument("src")
    convert.add_argument("dst")
    for p in (info, convert):
        p.add_argument("--alpha", type=float, help="LoRA alpha of a reference .pt (default 1.0)")
        p.add_argument("--tau", type=float, help="router temperature of a reference .pt (default 0.7)")
        p.add_argument("--base-model", help="model family of a reference .pt (sd15, sdxl, ...)")
    bake_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bake":
        return bake_cli.run(args)
    try:
        if args.command == "info":
            adapter = load_adapter(args.file, **_reference_options(args))
            layers = adapter.layers
            print(json.dumps({
                "file": args.file, "config": adapter.config.to_dict(), "adapted_layers": len(layers),
                "parameters": adapter.num_parameters(),
                "layers": {path: [e.in_features, e.out_features] for path, e in layers.items()},
            }, indent=1))
        else:
            adapter = load_adapter(args.src, **_reference_options(args))
            save_adapter(adapter, args.dst)
            print(f"wrote {args.dst}: {len(adapter.layers)} layers, {adapter.num_parameters()} parameters")
    except AdapterFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
