"""Tiny models of every trainable family as ComfyUI's loaders give them, training data for them, and Train
FeRA's node settings for short runs: shared by the training host tests (Train FeRA, SODA)."""
import torch

from comfy_host import TINY_CONTEXT, TINY_FAMILIES, setup_comfy, tiny_model

setup_comfy()
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models as sm  # noqa: E402

NODE_ARGS = dict(steps=6, learning_rate=1e-2, rank=4, alpha=4.0, experts=3, bands=3, tau=0.7, indicator="partition",
                 fecl_weight=0.1, layers="attention", batch_size=2, grad_accumulation=1, seed=0,
                 training_dtype="fp32", gradient_checkpointing=False, diff_tuning=False)


def _unet_variant(family, seed):
    """SD2-v and SDXL: comfy_host's tiny SD1.5 UNet configuration with those families' differences."""
    base = tiny_model("sd15").model.model_config.unet_config
    if family == "sd2v":
        mc = sm.SD20(dict(base, use_linear_in_transformer=True))
    else:
        mc = sm.SDXL(dict(base, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
                          transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1]))
    mc.unet_config["num_head_channels"] = 8  # these classes set 64, more than the tiny width
    mc.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(mc, model_type=comfy.model_base.ModelType.V_PREDICTION) \
        if family == "sd2v" else mc.get_model({}, "model.diffusion_model.")
    gen = torch.Generator().manual_seed(seed)
    model.diffusion_model.load_state_dict(
        {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny(family, seed=0):
    """A ModelPatcher of a tiny `family` model, built and loaded under inference mode like a checkpoint."""
    with torch.inference_mode():
        return tiny_model(family, seed) if family in TINY_FAMILIES else _unet_variant(family, seed)


# family -> (latent channels, pooled-output width or None)
TINY = {"sd15": (4, None), "sd2v": (4, None), "sdxl": (4, 1280), "sd3": (16, TINY_CONTEXT), "flux": (16, TINY_CONTEXT)}
PREDICTION = {"sd15": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon", "sd3": "flow", "flux": "flow"}


def data(family, n=2, seed=5, per_image=False):
    """(latents, positive): smooth images (so the tiny model can learn them) and random text conditioning."""
    channels, pooled = TINY[family]
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    lat = torch.stack([torch.sin(xx / (3 + i) + yy / 4 + torch.arange(channels)[:, None, None]) for i in range(n)])

    def cond():
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen)}
        if family == "sdxl":
            extra.update(width=64, height=64)
        if family == "flux":
            extra["guidance"] = 3.5
        return [torch.randn(1, 7, TINY_CONTEXT, generator=gen), extra]

    with torch.inference_mode():
        return lat * 2, [cond() for _ in range(n if per_image else 1)]
