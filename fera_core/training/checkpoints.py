"""Training checkpoints: adapter, optimizer and LR-schedule state, step, losses and trace, each file
written atomically and read without unpickling anything but tensors and plain containers."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..model import FeRAModel

_CHECKPOINT = re.compile(r"^step-(\d+)\.pt$")
# Settings a resumed run must share with the checkpoint (others, like --max-steps, may change).
_RESUME_KEYS = ("pipeline", "data", "batch_size", "resolution", "seed", "rank", "alpha", "num_experts", "num_bands",
                "tau", "indicator", "targets", "match_full_name", "fecl_weight", "diff_tuning", "learning_rate",
                "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "warmup_steps")


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first (temporary files never match)."""
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def load_checkpoint(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


_SODA_KEYS = ("method", "soda_side", "factor_sizes")  # recorded for SODA runs only (FeRA's settings stay as they were)


def settings_of(args) -> dict:
    out = {k: getattr(args, k) for k in _RESUME_KEYS + (_SODA_KEYS if args.method != "fera" else ())}
    out["pipeline"], out["data"] = str(Path(args.pipeline).resolve()), str(Path(args.data).resolve())
    return out


def save_checkpoint(folder: Path, step: int, fera: FeRAModel, optimizer, lr_schedule, losses, trace_rows,
                    settings: dict, keep: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "adapter": {k: v.detach().cpu() for k, v in fera.adapter.state_dict().items()},
             "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(), "losses": losses,
             "trace": json.dumps(trace_rows), "settings": settings, "config": fera.config.to_dict()}
    atomic_write(folder / f"step-{step:08d}.pt", lambda tmp: torch.save(state, tmp))
    for _, old in checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
