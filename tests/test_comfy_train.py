"""Train FeRA in a real ComfyUI (COMFYUI_PATH) on tiny models of every family, built with ComfyUI's classes.

Models are built and their weights loaded under torch.inference_mode(), as ComfyUI's loaders
run, so the trainer meets the inference tensors a real checkpoint gives it.
"""
import os

import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.supported_models as sm  # noqa: E402

from fera_core.training import regression_target  # noqa: E402
from test_comfy_apply import TINY_UNET  # noqa: E402
from test_comfy_families import FAMILIES as TINY_DIT  # noqa: E402

training = pack_module("nodes.training")
train_nodes = pack_module("nodes.train_nodes")
objective_mod = pack_module("nodes.objective")

_SD2 = dict(TINY_UNET, use_linear_in_transformer=True)
_SDXL = dict(TINY_UNET, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
             transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1])
# family -> (supported_models class, unet_config, model type or None, latent channels, context dim, pooled dim)
TINY = {
    "sd15": (sm.SD15, TINY_UNET, None, 4, 32, None),
    "sd2v": (sm.SD20, _SD2, comfy.model_base.ModelType.V_PREDICTION, 4, 32, None),
    "sdxl": (sm.SDXL, _SDXL, None, 4, 32, 1280),
    "sd3": (sm.SD3, TINY_DIT["sd3"][1], None, 16, 32, 32),
    "flux": (sm.Flux, dict(TINY_DIT["flux"][1], guidance_embed=True), None, 16, 32, 32),
}
PREDICTION = {"sd15": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon", "sd3": "flow", "flux": "flow"}


def tiny(family, seed=0):
    """A ModelPatcher of a tiny `family` model, built and loaded under inference mode like a checkpoint."""
    cls, cfg, model_type, *_ = TINY[family]
    with torch.inference_mode():
        mc = cls(dict(cfg))
        mc.set_inference_dtype(torch.float32, None)
        if mc.unet_config.get("num_head_channels", -1) > 0:
            mc.unet_config["num_head_channels"] = 8  # SD2's class sets 64, more than the tiny width
        if model_type is None:
            model = mc.get_model({}, "model.diffusion_model.")
        else:
            model = comfy.model_base.BaseModel(mc, model_type=model_type)
        gen = torch.Generator().manual_seed(seed)
        model.diffusion_model.load_state_dict(
            {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def data(family, n=2, seed=5, per_image=False):
    """(latents, positive): smooth images (so the tiny model can learn them) and random text conditioning."""
    _, _, _, channels, ctx, pooled = TINY[family]
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    lat = torch.stack([torch.sin(xx / (3 + i) + yy / 4 + torch.arange(channels)[:, None, None]) for i in range(n)])

    def cond():
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen)}
        if family == "sdxl":
            extra.update(width=64, height=64)
        if family == "flux":
            extra["guidance"] = 3.5
        return [torch.randn(1, 7, ctx, generator=gen), extra]

    with torch.inference_mode():
        return lat * 2, [cond() for _ in range(n if per_image else 1)]


def settings(**kw):
    base = dict(steps=30, learning_rate=3e-3, batch_size=2, seed=0, dtype=None)
    base.update(kw)
    return training.TrainSettings(**base)


def adapter_for(patcher, preset="attention", seed=0, fecl=0.1):
    return train_nodes.new_adapter(patcher.model, preset, 4, 4.0, 3, 3, 0.7, "partition", fecl, seed)


def run(family, steps=30, **kw):
    patcher = tiny(family)
    lat, pos = data(family)
    with torch.inference_mode():  # as a node runs
        adapter, losses = training.train(patcher, adapter_for(patcher), lat, pos, settings(steps=steps, **kw))
    comfy.model_management.unload_all_models()
    return patcher, adapter, losses


@pytest.mark.parametrize("family", sorted(TINY))
def test_loss_falls(family):
    _, adapter, losses = run(family, steps=40)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (family, first, last)
