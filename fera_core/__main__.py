"""python -m fera_core SUBCOMMAND: info and convert (adapter files), demo, train (a diffusers pipeline),
bake (to standard LoRAs). Each subcommand lives in its own module; this file only registers them."""
from __future__ import annotations

import argparse
import sys

from . import adapter_cli
from .bake import cli as bake_cli
from .demo import run as demo
from .training import cli as train_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fera_core", description="FeRA adapters: inspect, convert, "
                                     "demo, train and bake.")
    sub = parser.add_subparsers(dest="command", required=True)
    adapter_cli.add_parsers(sub)
    for module in (demo, train_cli, bake_cli):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
