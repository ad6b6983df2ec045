"""python -m fera_core SUBCOMMAND: info and convert (adapter files), demo, compare (LoRA and FeRA measured
on the demo model), train (a diffusers pipeline), bake (to standard LoRAs). Each subcommand lives in its own
module; this file only registers them."""
from __future__ import annotations

import argparse
import sys

from . import adapter_cli
from .bake import cli as bake_cli
from .compare import cli as compare_cli
from .demo import run as demo
from .training import cli as train_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fera_core", description="FeRA adapters: inspect, convert, "
                                     "demo, compare, train and bake.")
    sub = parser.add_subparsers(dest="command", required=True)
    adapter_cli.add_parsers(sub)
    for module in (demo, compare_cli, train_cli, bake_cli):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
