"""The pack's V3 extension: registers the model folder and the nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import adapter_nodes, bake_nodes, dataset_nodes, inspect_nodes, schedule_nodes, soda_nodes, train_nodes
from .model_folder import register_folder


class FeRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return (list(adapter_nodes.NODES) + list(schedule_nodes.NODES) + list(inspect_nodes.NODES)
                + list(dataset_nodes.NODES) + list(train_nodes.NODES) + list(bake_nodes.NODES) + list(soda_nodes.NODES))


async def comfy_entrypoint() -> FeRAExtension:
    register_folder()
    return FeRAExtension()
