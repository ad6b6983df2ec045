"""SODAModel: a SODA adapter on a plain PyTorch (e.g. diffusers) model, for training and sampling.

Each target layer's weight becomes W'(W0) through torch.nn.utils.parametrize (the layer computes its
weight from the frozen original at every call, so gradients reach the spectrum increments and the
rotation factors, never W0), built by rebuilt.adapted_weight, which keeps no intermediates for backward. Each weight is factorised once, when attached; the factors are kept
beside the layer in the weight's own dtype. .remove() restores the original weight objects.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..model import ADAPTABLE, find_targets
from .adapter import SODAAdapter, load_soda, save_soda
from .config import SODAConfig
from .factorisation import spectral_basis
from .rebuilt import adapted_weight, whole


class _Merged(nn.Module):
    """The parametrization W0 -> W'(W0) of one layer; the SODA layer is referenced, not registered (it
    belongs to the adapter, not to the base model)."""

    def __init__(self, weight: torch.Tensor, owner: "SODAModel", path: str):
        super().__init__()
        layer = owner.adapter.layers[path]
        self.owner, self.path = [owner], path  # a list: keeps nn.Module from registering the owner
        for i, b in enumerate(spectral_basis(weight, layer.variant, layer.side)):
            self.register_buffer(f"basis{i}", b.to(weight.dtype), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        owner = self.owner[0]
        if not owner.enabled:
            return weight
        basis = tuple(b for name, b in self.named_buffers() if name.startswith("basis"))
        return adapted_weight(weight, whole(owner.adapter.layers[self.path], basis))


class SODAModel(nn.Module):
    """A frozen base model whose target layers' weights are SODA-adapted."""

    def __init__(self, base_model: nn.Module, config: SODAConfig | None = None, adapter: SODAAdapter | None = None):
        super().__init__()
        self.base_model = base_model
        if adapter is None:
            config = (config or SODAConfig()).validate()
            targets = find_targets(base_model, config.target_modules, config.match_full_name)
            adapter = SODAAdapter.for_shapes(config, {p: tuple(m.weight.shape) for p, m in targets.items()})
        targets = {}
        for path, layer in adapter.layers.items():
            try:
                module = base_model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"adapter layer {path} does not exist in the model") from None
            if not isinstance(module, ADAPTABLE) or tuple(module.weight.shape) != layer.shape:
                raise ValueError(f"adapter layer {path} is for a weight of shape {layer.shape}, the model's "
                                 f"{path} is a {type(module).__name__} with "
                                 f"{tuple(getattr(module, 'weight', torch.empty(0)).shape)}")
            targets[path] = module
        self.adapter, self.config, self.enabled = adapter, adapter.config, True
        self.layers = targets
        for path, module in targets.items():
            module.requires_grad_(False)
            parametrize.register_parametrization(module, "weight", _Merged(module.weight, self, path), unsafe=True)

    @classmethod
    def from_file(cls, base_model: nn.Module, path, /) -> "SODAModel":
        return cls(base_model, adapter=load_soda(path))

    @contextlib.contextmanager
    def disabled(self):
        """The frozen model's weights inside the block."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def predict(self, x_t: torch.Tensor, *args, experts: bool = True, call=None, **kwargs):
        """The model's output for x_t, adapted (or with experts=False the frozen model's): FeRAModel.predict's
        signature, so the trainers call either method the same way."""
        call = call or (lambda model, *a, **kw: model(*a, **kw))
        if experts:
            return call(self.base_model, x_t, *args, **kwargs)
        with self.disabled():
            return call(self.base_model, x_t, *args, **kwargs)

    def save_adapters(self, path) -> Path:
        return save_soda(self.adapter, path)

    def remove(self) -> nn.Module:
        """Detach every parametrization; returns the base model with its original weights."""
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        return self.base_model
