"""Tests that need a real ComfyUI: every module here is marked `comfy` and, unless COMFYUI_PATH names a
ComfyUI checkout, skipped before it is imported (the reason shows in `pytest -ra`). Their shared fixtures.

Helpers beside this file (plain modules, never test modules): comfy_host.py puts ComfyUI on sys.path and
builds tiny and full-size models of its classes; tiny_sampling.py samples on the tiny ones; hook_replay.py
runs a baked schedule's workflow with ComfyUI's hook nodes; comfy_server.py runs a real server and
drives its frontend in headless Chromium. Nothing here imports ComfyUI when this file is loaded.
"""
import pytest

from comfy_host import comfyui_root, pack_module
from comfy_server import add_sd15_checkpoint, running_server


class HostModule(pytest.Module):
    """A test module that imports ComfyUI: skipped, with the reason, when there is none to import."""

    def collect(self):
        comfyui_root()  # skips without a checkout
        return super().collect()


def pytest_pycollect_makemodule(module_path, parent):
    module = HostModule.from_parent(parent, path=module_path)
    module.add_marker(pytest.mark.comfy)
    return module


@pytest.fixture(scope="module")
def patcher():
    """tiny_sampling's SD1.5 model, one per test module."""
    from tiny_sampling import tiny_patcher  # imports ComfyUI: only once a test needs it
    return tiny_patcher()


@pytest.fixture(scope="module")
def adapter(patcher):
    from tiny_sampling import make_adapter
    return make_adapter(patcher.model)


@pytest.fixture()
def models_dir(tmp_path, monkeypatch):
    """A throwaway models/ tree with fera/ and loras/ folders registered as ComfyUI would."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    saved = {k: (list(v[0]), set(v[1])) for k, v in folder_paths.folder_names_and_paths.items()}
    folder_paths.folder_names_and_paths.pop("fera", None)
    folder_paths.folder_names_and_paths["loras"] = ([str(tmp_path / "loras")], set(folder_paths.supported_pt_extensions))
    (tmp_path / "fera").mkdir()
    (tmp_path / "loras").mkdir()
    folder_paths.filename_list_cache.clear()
    pack_module("nodes.model_folder").register_folder()
    yield tmp_path
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ComfyUI server with the pack installed, one per test module."""
    with running_server(tmp_path_factory.mktemp("comfy-base"), comfyui_root()) as srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def sd15_checkpoint(server) -> str:
    """The name of a random full-size SD1.5 checkpoint in the server's models/checkpoints."""
    return add_sd15_checkpoint(server)
