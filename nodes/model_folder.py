"""Where adapter files live (FeRA and SODA alike): models/fera (a registered model folder), with models/loras
offered too; and names for the files the pack writes that never overwrite one."""
from __future__ import annotations

import os

import folder_paths

from ..fera_core.adapter_file import FeRAAdapter, load_adapter

FOLDER = "fera"
EXTENSIONS = {".safetensors", ".pt", ".pth"}


def register_folder() -> None:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    folder_paths.folder_names_and_paths[FOLDER][1].update(EXTENSIONS)


def adapter_names() -> list[str]:
    """Files of models/fera, then those of models/loras (read as FeRA adapters only if they are)."""
    names = folder_paths.get_filename_list(FOLDER)
    lora_names = [n for n in folder_paths.get_filename_list("loras") if os.path.splitext(n)[1] in EXTENSIONS]
    return names + sorted(set(lora_names) - set(names))


def adapter_path(name: str, kind: str = "FeRA") -> str:
    """The file of an adapter listed by adapter_names."""
    path = folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path("loras", name)
    if path is None:
        searched = folder_paths.get_folder_paths(FOLDER) + folder_paths.get_folder_paths("loras")
        raise FileNotFoundError(f"{kind} adapter '{name}' not found in models/{FOLDER} or models/loras "
                                f"(searched: {', '.join(searched)}).")
    return path


def load_named_adapter(name: str, reference_alpha: float = 1.0, reference_tau: float = 0.7) -> FeRAAdapter:
    path = adapter_path(name)
    if path.endswith(".safetensors"):
        return load_adapter(path, name=name)
    return load_adapter(path, alpha=reference_alpha, tau=reference_tau, name=name)


def free_stem(prefix: str, places: list[tuple[str, list[str]]]) -> str:
    """`prefix_NNNNN` such that no `folder/stem + suffix` of any (folder, suffixes) place exists yet.

    prefix may name subfolders (created), never a path outside the folders.
    """
    for folder, _ in places:
        root = os.path.abspath(folder)
        target = os.path.abspath(os.path.join(folder, prefix))
        if not prefix.strip() or os.path.isabs(prefix) or os.path.commonpath([root, target]) != root or target == root:
            raise ValueError(f"filename_prefix {prefix!r} must be a relative file name inside {folder}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
    counter = 1
    while any(os.path.exists(os.path.join(folder, f"{prefix}_{counter:05}{s}")) for folder, sfx in places for s in sfx):
        counter += 1
    return f"{os.path.normpath(prefix)}_{counter:05}"
