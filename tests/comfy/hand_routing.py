"""Expectations computed by hand for the host tests of Apply FeRA's routing: fera_core's plain FeRALayer
hooks on the same ComfyUI layers, with expert weights from a formula the test writes (route(energies,
sigmas) per call), and the tolerance two such runs of the tiny model agree within."""
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
from fera_core import band_energies  # noqa: E402
from fera_core.model import FeRALayer  # noqa: E402
from tiny_sampling import sample  # noqa: E402

keys = pack_module("nodes.module_paths")

# Float32 on the same weights: the two routes differ only in where sums are rounded. Outputs reach ~300
# here (a random model's denoised latent), so 2e-4 absolute is ~7e-7 relative; measured up to 3e-5.
TOL = 2e-4
EFFECT = 20 * TOL  # what a setting must change at least, so that ignoring it cannot pass


class HandRouted:
    """fera_core's FeRALayer hooks on the ComfyUI layers; expert weights = route(energies, sigma) per call."""

    def __init__(self, model, adapter, route):
        names = keys.diffusers_to_comfy(model)
        self.layers = [FeRALayer(p, model.get_submodule(names[p][0]), e) for p, e in adapter.layers.items()]
        cfg = adapter.config

        def pre_hook(_module, args, kwargs):
            energies = band_energies(args[0], cfg.num_bands, cfg.indicator)
            sigmas = kwargs["transformer_options"]["sigmas"]  # one per latent; cond and uncond rows share it
            weights = route(energies, sigmas.repeat(len(energies) // len(sigmas)))
            for layer in self.layers:
                layer.set_routing_weights(weights)

        self.handle = model.diffusion_model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def sample(self, patcher, **kw):
        try:
            return sample(patcher, **kw)
        finally:
            self.handle.remove()
            for layer in self.layers:
                layer.remove()


def softmax_router(adapter, tau=None):
    router = adapter.router
    return lambda e, _sigma: torch.softmax(router.net(e) / (tau or router.tau), dim=-1)
