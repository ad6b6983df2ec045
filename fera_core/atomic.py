"""Files the project writes are complete or absent: written under a temporary name, then renamed."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def atomic_write(path, write) -> Path:
    """Call write(temporary path) beside `path`, then rename: a reader sees all or nothing."""
    path = Path(path)
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates files 0600; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """`text` as UTF-8, line endings as given (CSV and JSON read the same on every system)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    return atomic_write(path, write)
