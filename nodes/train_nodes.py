"""Train FeRA and Save FeRA Adapter nodes. Node IDs are public: never rename."""
from __future__ import annotations

import copy
import dataclasses
import os
import re

import comfy.utils
import torch
from comfy_api.latest import io, ui
from torch import nn

import folder_paths

from ..fera_core.adapter_file import FeRAAdapter, save_adapter
from ..fera_core.config import FeRAConfig
from ..fera_core.families import compatible, display_name
from ..fera_core.indicator import DEFINITIONS, PARTITION
from ..fera_core.model import new_experts
from .model_folder import FOLDER, free_stem
from .module_paths import block_linears, model_family, name_layers
from .routing import apply_fera
from .sockets import CATEGORY, FeRAAdapterType
from .train_loop import TrainSettings, train



def _words(path: str) -> set[str]:
    """The words of a module path's parts: 'blocks.0.self_attn.q' -> {'blocks', '0', 'self', 'attn', 'q'}."""
    return set(re.split(r"[._]", path.lower()))


def _attention(path: str) -> bool:
    """A projection of an attention module, by ComfyUI's own names (attn, attn1, self_attn, img_attn,
    attention, ...): q/k/v (fused or not), output, and added-context projections."""
    return any(w.startswith("attn") or w == "attention" for w in _words(path))


def _feed_forward(path: str) -> bool:
    """A layer of a feed-forward module (ff, ffn, mlp, img_mlp, feed_forward, ...)."""
    return any(w in ("ff", "ffn", "feed") or w.startswith("mlp") for w in _words(path))


# Which Linear layers of the model's repeated blocks (module_paths.block_linears) get experts.
PRESETS = {"attention": _attention,
           "attention + feed-forward": lambda path: _attention(path) or _feed_forward(path),
           "all linear layers of the blocks": lambda path: True}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def preset_layers(model, preset: str) -> tuple[str, dict[str, tuple[nn.Module, int | None]]]:
    """(key namespace, {adapter layer path: (the model's Linear, output slice size or None)}) of the
    preset's layers, found by structure and ComfyUI's module names (no table per family)."""
    layers = {path: layer for path, layer in block_linears(model).items() if PRESETS[preset](path)}
    if not layers:
        raise ValueError(f"the '{preset}' preset finds no layers in this {model_family(model).name} model")
    return name_layers(model, layers)


def new_adapter(model, preset: str, rank: int, alpha: float, experts: int, bands: int, tau: float,
                indicator: str, fecl_weight: float, seed: int) -> FeRAAdapter:
    """A fresh adapter on the preset's layers; the resolved layer paths are its target_modules."""
    namespace, found = preset_layers(model, preset)
    config = FeRAConfig(rank=rank, alpha=alpha, num_bands=bands, num_experts=experts, router_tau=tau,
                        target_modules=list(found), fecl_weight=fecl_weight, indicator=indicator,
                        match_full_name=True, base_model=model_family(model).id).validate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = {p: new_experts(layer, config, rows) for p, (layer, rows) in found.items()}
        return FeRAAdapter(config, layers, key_namespace=namespace)


def continued_adapter(model, adapter: FeRAAdapter, fecl_weight: float) -> FeRAAdapter:
    family = model_family(model)
    if not compatible(adapter.config.base_model, family):
        raise ValueError(f"the FeRA adapter to continue was trained for {display_name(adapter.config.base_model)}, "
                         f"this model is {family.name}")
    adapter = copy.copy(adapter)  # the caller's adapter keeps its config; train() copies the weights
    adapter.config = dataclasses.replace(adapter.config, fecl_weight=fecl_weight)
    return adapter


def summary(adapter: FeRAAdapter, preset: str, losses: list[float]) -> str:
    cfg = adapter.config
    text = (f"FeRA '{preset}': {len(adapter.layers)} layers, {adapter.num_parameters():,} parameters "
            f"({cfg.num_experts} experts x rank {cfg.rank}, {cfg.num_bands} bands, {cfg.base_model})")
    if losses:
        text += f"; loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps"
    return text


def progress_reporter(node_id, steps: int):
    """ProgressBar plus a 'fera.train' event carrying the live loss (one host sync per step)."""
    bar = comfy.utils.ProgressBar(steps, node_id=node_id)

    def update(step: int, total: int, loss: float):
        bar.update_absolute(step, total)
        try:
            from server import PromptServer
            PromptServer.instance.send_sync("fera.train", {"node": node_id, "step": step, "total": total, "loss": loss})
        except (ImportError, AttributeError):
            pass  # no server (scripts, tests)
    return update


class TrainFeRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TrainFeRA",
            display_name="Train FeRA",
            category=CATEGORY,
            description="Trains a FeRA adapter (router + experts) on a batch of encoded images, in the model's own "
                        "prediction space (epsilon, v or flow), with MSE plus the frequency-energy consistency loss.",
            inputs=[
                io.Model.Input("model", tooltip="The model to adapt (left unchanged)."),
                io.Latent.Input("latents", tooltip="The training images, VAE-encoded (a batch)."),
                io.Conditioning.Input("positive", tooltip="One conditioning for all images, or one per image."),
                io.Int.Input("steps", default=200, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate (must be > 0)."),
                io.Int.Input("rank", default=4, min=1, max=256, tooltip="Rank of each expert."),
                io.Float.Input("alpha", default=4.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; the experts' update is scaled by alpha / rank."),
                io.Int.Input("experts", default=3, min=1, max=16, tooltip="Experts per adapted layer."),
                io.Int.Input("bands", default=3, min=1, max=8, tooltip="Frequency bands the router reads."),
                io.Float.Input("tau", default=0.7, min=0.01, max=100.0, step=0.01, tooltip="Router softmax temperature."),
                io.Combo.Input("indicator", options=list(DEFINITIONS), default=PARTITION,
                               tooltip="Frequency-energy indicator: 'partition' (DCT bands that partition the "
                                       "latent) or 'reference' (the authors' difference of Gaussians)."),
                io.Float.Input("fecl_weight", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="Weight of the frequency-energy consistency loss (0: plain MSE)."),
                io.Combo.Input("layers", options=list(PRESETS), default="attention",
                               tooltip="Which layers get experts; the node's text output gives the layer and "
                                       "parameter counts for this model."),
                io.Int.Input("batch_size", default=1, min=1, max=1024, tooltip="Images per step."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024,
                             tooltip="Batches whose gradients are summed before each optimizer step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the expert initialisation, image order, noise levels and noise."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute dtype of the model while training (as in Train LoRA); the adapter stays fp32."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in backward: much less memory, about one more forward."),
                io.Boolean.Input("diff_tuning", default=False,
                                 tooltip="Diff-Tuning: sample noise levels weighted towards high noise, and train the "
                                         "optional retention images towards low noise (weight 0.1)."),
                FeRAAdapterType.Input("fera_adapter", optional=True,
                                      tooltip="An adapter to continue training (its rank, experts, bands and layers "
                                              "are kept)."),
                io.Latent.Input("retention_latents", optional=True,
                                tooltip="Diff-Tuning memory bank: images generated by this model, kept close to it "
                                        "at low noise (about a fifth of each batch)."),
                io.Conditioning.Input("retention_positive", optional=True,
                                      tooltip="Conditioning of the retention images (default: the one shared "
                                              "conditioning)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained adapter applied."),
                FeRAAdapterType.Output(display_name="fera_adapter", tooltip="The trained adapter (save it with "
                                                                            "Save FeRA Adapter)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for the Loss Graph node."),
                io.String.Output(display_name="summary", tooltip="Layers, parameters and loss of this training."),
            ],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # dataset loaders of newer ComfyUI give one image (so one LATENT) per list item
        )

    @classmethod
    def execute(cls, model, latents, positive, steps, learning_rate, rank, alpha, experts, bands, tau, indicator,
                fecl_weight, layers, batch_size, grad_accumulation, seed, training_dtype, gradient_checkpointing,
                diff_tuning, fera_adapter=None, retention_latents=None, retention_positive=None) -> io.NodeOutput:
        # Every input arrives as a list (is_input_list): settings take their first value, images and
        # conditionings are joined.
        (model, steps, learning_rate, rank, alpha, experts, bands, tau, indicator, fecl_weight, layers, batch_size,
         grad_accumulation, seed, training_dtype, gradient_checkpointing, diff_tuning, fera_adapter) = (
            v[0] if isinstance(v, list) else v for v in (
                model, steps, learning_rate, rank, alpha, experts, bands, tau, indicator, fecl_weight, layers,
                batch_size, grad_accumulation, seed, training_dtype, gradient_checkpointing, diff_tuning, fera_adapter))
        images, positive = joined_latents(latents, "latents"), joined_conditioning(positive)
        retention = None if retention_latents is None else joined_latents(retention_latents, "retention_latents")
        retention_positive = None if retention_positive is None else joined_conditioning(retention_positive)
        settings = TrainSettings(steps, learning_rate, batch_size, grad_accumulation, seed, DTYPES[training_dtype],
                                 gradient_checkpointing, diff_tuning).check()
        if fera_adapter is None:
            adapter = new_adapter(model.model, layers, rank, alpha, experts, bands, tau, indicator, fecl_weight, seed)
        else:
            adapter = continued_adapter(model.model, fera_adapter, fecl_weight)
        adapter, losses = train(model, adapter, images, positive, settings, retention, retention_positive,
                                progress_reporter(getattr(cls.hidden, "unique_id", None), steps))
        adapter = adapter.to("cpu")
        previous = None if fera_adapter is None else fera_adapter.training_settings
        adapter.training_settings = dict(
            steps=steps, learning_rate=learning_rate, batch_size=batch_size, grad_accumulation=grad_accumulation,
            seed=seed, training_dtype=training_dtype, gradient_checkpointing=gradient_checkpointing,
            diff_tuning=diff_tuning, retention_images=0 if retention is None else int(retention.shape[0]),
            images=int(images.shape[0]), layers=layers, final_loss=losses[-1],
            **({"continued_from": previous} if previous else {}))
        text = summary(adapter, layers, losses)
        return io.NodeOutput(apply_fera(model, adapter, 1.0), adapter, {"loss": losses}, text,
                             ui=ui.PreviewText(text))


def joined_latents(latents, name: str) -> torch.Tensor:
    """One batch from a LATENT or a list of LATENTs (all images the same size)."""
    parts = [item["samples"] for item in (latents if isinstance(latents, list) else [latents])]
    shapes = {tuple(p.shape[1:]) for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{name}: the images have different sizes {sorted(shapes)}; resize them to one size")
    return torch.cat(parts)


def joined_conditioning(positive) -> list:
    """One list of conditioning entries from a CONDITIONING or a list of them."""
    if positive and isinstance(positive[0], list) and positive[0] and isinstance(positive[0][0], list):
        return [entry for cond in positive for entry in cond]
    return positive


class SaveFeRAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveFeRAAdapter",
            display_name="Save FeRA Adapter",
            category=CATEGORY,
            description="Writes a FeRA adapter into models/fera under diffusers module names, with its configuration "
                        "and training settings. Never overwrites a file; the loaders list the new file at once.",
            inputs=[
                FeRAAdapterType.Input("fera_adapter", tooltip="From Train FeRA (or Load FeRA Adapter)."),
                io.String.Input("filename_prefix", default="FeRA_trained",
                                tooltip="File name prefix inside models/fera (subfolders allowed)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, fera_adapter, filename_prefix: str) -> io.NodeOutput:
        root = folder_paths.get_folder_paths(FOLDER)[0]
        target = os.path.join(root, free_stem(filename_prefix, [(root, ["_.safetensors"])]) + "_.safetensors")
        save_adapter(fera_adapter, target)
        name = os.path.relpath(target, root)
        return io.NodeOutput(ui=ui.PreviewText(f"saved models/{FOLDER}/{name}"))


NODES = [TrainFeRA, SaveFeRAAdapter]
