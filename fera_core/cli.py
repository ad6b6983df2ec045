"""What every `python -m fera_core` subcommand shares: one error path and one overwrite rule."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from safetensors import SafetensorError


def guarded(handler):
    """A subcommand handler that turns a refusal (ValueError, OSError: the messages name the file and
    why) into `error: ...` on stderr and exit status 2, instead of a traceback."""
    @functools.wraps(handler)
    def run(args) -> int:
        try:
            return handler(args) or 0
        except (ValueError, OSError, SafetensorError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return run


def refuse_existing(paths, force: bool) -> None:
    """Outputs are never overwritten unless --force says so."""
    existing = [str(p) for p in map(Path, paths) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)}: already exists; pass --force to overwrite")

