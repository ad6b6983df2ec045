"""SODA nodes: load, apply, train, save and bake SODA adapters. Node IDs are public: never rename.

Train SODA is a sibling of Train FeRA rather than a method choice on it: seven of Train FeRA's inputs
(rank, alpha, experts, bands, tau, indicator, fecl_weight) mean nothing to SODA, SODA's own (variant,
rotated side, factor sizes) nothing to FeRA, and its output is a different kind of adapter with its own
socket type, so the save, apply and bake nodes of each method only ever receive their own.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io, ui

import folder_paths

from ..fera_core.bake.lora import save_lora
from ..fera_core.bake.soda import bake_soda
from ..fera_core.families import compatible, display_name
from ..fera_core.soda.adapter import SODAAdapter, load_soda, save_soda
from ..fera_core.soda.config import METHODS, SIDES, SODAConfig, parse_factor_sizes
from .model_folder import FOLDER, adapter_path, free_stem
from .module_paths import diffusers_to_comfy, model_family
from .soda_patch import apply_soda, attach_live
from .sockets import CATEGORY, SODAAdapterType, adapter_name_input, strength_input
from .train_loop import TrainSettings, train
from .train_nodes import DTYPES, PRESETS, joined_conditioning, joined_latents, preset_layers, progress_reporter

_STRENGTH = "0: the base model exactly; 1: the trained model; between: the blend W + strength (W' - W)."


def new_soda_adapter(model, preset: str, method: str, side: str, factor_sizes: str) -> SODAAdapter:
    config = SODAConfig(variant=METHODS[method], side=side, factor_sizes=parse_factor_sizes(factor_sizes),
                        target_modules=list(PRESETS[preset]), base_model=model_family(model).id).validate()
    shapes = {p: (rows or layer.out_features, layer.in_features) for p, (layer, rows) in preset_layers(model, preset).items()}
    return SODAAdapter.for_shapes(config, shapes)


def summary(adapter: SODAAdapter, preset: str, losses: list[float]) -> str:
    cfg = adapter.config
    text = (f"{cfg.method} '{preset}': {len(adapter.layers)} layers, {adapter.num_parameters():,} parameters "
            f"(rotated side {cfg.side}, {cfg.base_model}); orthogonality error {adapter.orthogonality_error():.1e}")
    if losses:
        text += f"; loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
    return text


class LoadSODAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadSODAAdapter",
            display_name="Load SODA Adapter",
            category=CATEGORY,
            description="Reads a SODA adapter (spectrum increments and orthogonal rotation factors), checking every "
                        "tensor and that each factor is orthogonal.",
            inputs=[adapter_name_input()],
            outputs=[SODAAdapterType.Output(display_name="soda_adapter", tooltip="The loaded SODA adapter.")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_soda(adapter_path(adapter_name, "SODA"), name=adapter_name))


class ApplySODA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplySODA",
            display_name="Apply SODA",
            category=CATEGORY,
            description="Patches the model's weights with the SODA adapter through ComfyUI's own weight patches, "
                        "like a LoRA: computed once when the model loads, no cost per sampling step.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to adapt (left unchanged; a patched copy is returned)."),
                SODAAdapterType.Input("soda_adapter", tooltip="From Load SODA Adapter or Train SODA."),
                strength_input(_STRENGTH),
            ],
            outputs=[io.Model.Output(tooltip="The model with the SODA weight patches.")],
        )

    @classmethod
    def execute(cls, model, soda_adapter, strength: float) -> io.NodeOutput:
        return io.NodeOutput(apply_soda(model, soda_adapter, strength))


class TrainSODA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TrainSODA",
            display_name="Train SODA",
            category=CATEGORY,
            description="Trains a SODA adapter (spectrum increments and Kronecker-factored orthogonal rotations of the "
                        "chosen layers' weights) on a batch of encoded images, in the model's own prediction space, "
                        "with the plain diffusion loss.",
            inputs=[
                io.Model.Input("model", tooltip="The model to adapt (left unchanged)."),
                io.Latent.Input("latents", tooltip="The training images, VAE-encoded (a batch)."),
                io.Conditioning.Input("positive", tooltip="One conditioning for all images, or one per image."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-3, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (must be > 0)."),
                io.Combo.Input("method", options=list(METHODS), default="soda-svd",
                               tooltip="soda-svd: tune the singular values, rotate the singular vectors; soda-qr: tune "
                                       "the triangular factor's diagonal of an LQ/QR factorisation (cheaper to train)."),
                io.Combo.Input("side", options=list(SIDES), default="in",
                               tooltip="Which basis the rotation turns: 'in' (the input features: V, or LQ's Q) or "
                                       "'out' (the output features: U, or QR's Q)."),
                io.String.Input("factor_sizes", default="", optional=True,
                                tooltip="Kronecker factor sizes by dimension, e.g. '320=16x20, 640=20x32'. Empty: two "
                                        "factors as close to square as the dimension allows."),
                io.Combo.Input("layers", options=list(PRESETS), default="attention",
                               tooltip="Which layers are adapted; the text output gives the layer and parameter "
                                       "counts for this model."),
                io.Int.Input("batch_size", default=1, min=1, max=1024, tooltip="Images per step."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Batches whose gradients are summed before each optimizer step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the image order, noise levels and noise."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the model while training; the adapter stays fp32."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, about one more forward."),
                io.Boolean.Input("diff_tuning", default=False,
                                 tooltip="Diff-Tuning: noise levels weighted towards high noise; the optional "
                                         "retention images are trained towards low noise (weight 0.1)."),
                SODAAdapterType.Input("soda_adapter", optional=True,
                                      tooltip="An adapter to continue training (its method, side and layers are kept)."),
                io.Latent.Input("retention_latents", optional=True,
                                tooltip="Diff-Tuning memory bank: images generated by this model."),
                io.Conditioning.Input("retention_positive", optional=True,
                                      tooltip="Conditioning of the retention images (default: the shared one)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                SODAAdapterType.Output(display_name="soda_adapter", tooltip="The trained adapter (save it with "
                                                                            "Save SODA Adapter)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for the Loss Graph node."),
                io.String.Output(display_name="summary", tooltip="Layers, parameters, orthogonality and loss."),
            ],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # as Train FeRA: dataset loaders give one LATENT per list item
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, method, side, layers, batch_size,
                grad_accumulation, seed, training_dtype, gradient_checkpointing, diff_tuning, factor_sizes="",
                soda_adapter=None, retention_latents=None, retention_positive=None) -> io.NodeOutput:
        (model, steps, learning_rate, method, side, factor_sizes, layers, batch_size, grad_accumulation, seed,
         training_dtype, gradient_checkpointing, diff_tuning, soda_adapter) = (
            v[0] if isinstance(v, list) else v for v in (
                model, steps, learning_rate, method, side, factor_sizes, layers, batch_size, grad_accumulation, seed,
                training_dtype, gradient_checkpointing, diff_tuning, soda_adapter))
        images, positive = joined_latents(latents, "latents"), joined_conditioning(positive)
        retention = None if retention_latents is None else joined_latents(retention_latents, "retention_latents")
        retention_positive = None if retention_positive is None else joined_conditioning(retention_positive)
        settings = TrainSettings(steps, learning_rate, batch_size, grad_accumulation, seed, DTYPES[training_dtype],
                                 gradient_checkpointing, diff_tuning).check()
        if soda_adapter is None:
            adapter = new_soda_adapter(model.model, layers, method, side, factor_sizes)
        else:
            family = model_family(model.model)
            if not compatible(soda_adapter.config.base_model, family):
                raise ValueError(f"the SODA adapter to continue was trained for "
                                 f"{display_name(soda_adapter.config.base_model)}, this model is {family.name}")
            adapter = soda_adapter
        adapter, losses = train(model, adapter, images, positive, settings, retention, retention_positive,
                                progress_reporter(getattr(cls.hidden, "unique_id", None), steps), attach=attach_live)
        adapter = adapter.to("cpu")
        previous = None if soda_adapter is None else soda_adapter.training_settings
        adapter.training_settings = dict(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation,
            seed=seed, training_dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
            diff_tuning=diff_tuning, retention_images=0 if retention is None else int(retention.shape[0]),
            images=int(images.shape[0]), layers=layers, final_loss=losses[-1],
            orthogonality_error=adapter.orthogonality_error(), **({"continued_from": previous} if previous else {}))
        text = summary(adapter, layers, losses)
        return io.NodeOutput(apply_soda(model, adapter, 1.0), adapter, {"loss": losses}, text, ui=ui.PreviewText(text))


class SaveSODAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveSODAAdapter",
            display_name="Save SODA Adapter",
            category=CATEGORY,
            description="Writes a SODA adapter into models/fera: only its spectrum increments and rotation factors, "
                        "under diffusers module names, with its method, side, factor sizes and base model. Never "
                        "overwrites a file.",
            inputs=[
                SODAAdapterType.Input("soda_adapter", tooltip="From Train SODA (or Load SODA Adapter)."),
                io.String.Input("filename_prefix", default="SODA_trained",
                                tooltip="File name prefix inside models/fera (subfolders allowed)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, soda_adapter, filename_prefix: str) -> io.NodeOutput:
        root = folder_paths.get_folder_paths(FOLDER)[0]
        target = os.path.join(root, free_stem(filename_prefix, [(root, ["_.safetensors"])]) + "_.safetensors")
        save_soda(soda_adapter, target)
        return io.NodeOutput(ui=ui.PreviewText(f"saved models/{FOLDER}/{os.path.relpath(target, root)}"))


def frozen_weights(patcher, adapter: SODAAdapter) -> dict[str, torch.Tensor]:
    """{adapter layer path: the model's unpatched weight (or its rows)}, as ComfyUI keeps it (float32)."""
    names = diffusers_to_comfy(patcher.model)
    stored = patcher.get_key_patches("diffusion_model.")
    out = {}
    for path in adapter.layers:
        if path not in names:
            raise ValueError(f"the SODA adapter's layer {path} is not in this {model_family(patcher.model).name} model")
        comfy_path, rows = names[path]
        weight, convert = stored[f"{comfy_path}.weight"][0]
        weight = convert(weight.to(torch.float32, copy=True), inplace=True)
        out[path] = weight if rows is None else weight[rows[0]:rows[0] + rows[1]]
    return out


class BakeSODAToLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BakeSODAToLoRA",
            display_name="Bake SODA to LoRA",
            category=CATEGORY,
            description="Writes the best LoRA of the chosen rank for the adapter's weight change on this model into "
                        "models/loras, and reports per layer the fraction of the change's energy it keeps.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the adapter was trained on (its weights are read)."),
                SODAAdapterType.Input("soda_adapter", tooltip="The SODA adapter to bake."),
                io.Int.Input("rank", default=32, min=1, max=4096, tooltip="Rank of the LoRA."),
                strength_input(_STRENGTH + " Folded into the LoRA (load it at strength 1 to match)."),
                io.String.Input("filename_prefix", default="soda_baked",
                                tooltip="Name of the file in models/loras; a counter is appended, nothing is overwritten."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The written file, as LoRA loaders list it."),
                     io.String.Output(display_name="report", tooltip="Energy kept per layer.")],
        )

    @classmethod
    def execute(cls, model, soda_adapter, rank: int, strength: float, filename_prefix: str) -> io.NodeOutput:
        family = model_family(model.model)
        if not compatible(soda_adapter.config.base_model, family):
            raise ValueError(f"the SODA adapter was trained for {display_name(soda_adapter.config.base_model)}, "
                             f"this model is {family.name}")
        tensors, meta, captured = bake_soda(soda_adapter, frozen_weights(model, soda_adapter), rank, strength,
                                            source={"adapter": soda_adapter.name})
        folder = folder_paths.get_folder_paths("loras")[0]
        name = free_stem(filename_prefix, [(folder, [".safetensors"])]) + ".safetensors"
        save_lora(tensors, meta, os.path.join(folder, name))
        values = list(captured.values())
        report = "\n".join([f"{name}: rank {rank}, energy kept min {min(values):.4f}, mean "
                            f"{sum(values) / len(values):.4f}"] + [f"{p}: {v:.4f}" for p, v in captured.items()])
        return io.NodeOutput(name, report, ui={"text": [report]})


NODES = [LoadSODAAdapter, ApplySODA, TrainSODA, SaveSODAAdapter, BakeSODAToLoRA]
