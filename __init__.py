"""ComfyUI entry point of the FeRA node pack.

Importing this package outside ComfyUI imports nothing of ComfyUI (fera_core stands alone);
inside ComfyUI it exposes the V3 extension entry point and the web directory.
"""
import importlib.util

WEB_DIRECTORY = "./web"

# __package__ is empty when a tool (pytest collecting the repository) imports this file as a
# plain module; only a package import, as ComfyUI does, can resolve the relative import.
if __package__ and importlib.util.find_spec("comfy_api") is not None:
    from .nodes.extension import comfy_entrypoint  # noqa: F401
