"""FeRAModel: the reference's Python API on a plain PyTorch (e.g. diffusers) model.

A user of the reference repo switches imports and gets the same numbers:
    fera = FeRAModel(unet, FeRAConfig(...)); fera.prepare_forward(z_t); unet(z_t, t, c)
    for layer in fera.fera_layers: layer.set_routing_weights(None)   # base prediction
    fera.compute_fecl_loss(base, pred, target); fera.save_adapters(path); fera.load_adapters(path)
Unlike the reference, the base model's modules are not replaced: each adapted layer gets a
forward hook (removable with .remove()), and rows beyond the latent batch (CFG's stacked
copies) are routed by their own latent.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .adapter_file import FeRAAdapter, load_adapter, save_adapter
from .atomic import atomic_write
from .config import FeRAConfig
from .experts import RoutedExperts
from .fecl import fecl_loss
from .indicator import band_energies

ADAPTABLE = (nn.Linear, nn.Conv2d)
# What a .safetensors records that changes the numbers: loading it into a model configured
# otherwise is refused. (Layers are compared one by one; dropout and fecl_weight only train.)
RECORDED_FIELDS = ("rank", "alpha", "num_experts", "num_bands", "router_tau", "router_hidden", "indicator")


def matches_full_name(path: str, target_modules) -> bool:
    """The full-name rule: the dotted path is a target or ends with "." + target."""
    return any(path == t or path.endswith("." + t) for t in target_modules)


def find_targets(module: nn.Module, target_modules, match_full_name: bool = False) -> dict[str, nn.Module]:
    """Layers to adapt, by module path.

    Reference rule (match_full_name=False): an nn.Linear whose *child* name contains a
    target as a substring; "to_out.0" therefore never matches. Full-name rule: a Linear or
    Conv2d whose dotted path is a target or ends with "." + target.
    """
    if match_full_name:
        return {path: mod for path, mod in module.named_modules()
                if isinstance(mod, ADAPTABLE) and matches_full_name(path, target_modules)}
    found = {}

    def visit(mod, prefix):
        for name, child in mod.named_children():
            if isinstance(child, nn.Linear) and any(t in name for t in target_modules):
                found[prefix + name] = child
            else:
                visit(child, prefix + name + ".")

    visit(module, "")
    return found


def new_experts(layer: nn.Module, config: FeRAConfig, out_features: int | None = None) -> RoutedExperts:
    """Freshly initialised experts for a Linear or Conv2d; out_features: for experts that write only a
    slice of the layer's outputs (one projection of a fused q/k/v layer)."""
    if isinstance(layer, nn.Conv2d):
        return RoutedExperts(layer.in_channels, out_features or layer.out_channels, config.num_experts, config.rank,
                             config.alpha, tuple(layer.kernel_size))
    return RoutedExperts(layer.in_features, out_features or layer.out_features, config.num_experts, config.rank,
                         config.alpha)


def check_fits(path: str, experts: RoutedExperts, layer: nn.Module, out_slice: tuple[int, int] | None = None) -> None:
    """Refuse experts that do not fit the layer (or the slice of its outputs) they would update."""
    if not isinstance(layer, ADAPTABLE):
        raise ValueError(f"experts for {path} need a Linear or Conv2d layer, but the model's {path} is a "
                         f"{type(layer).__name__}")
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise ValueError(f"experts for {path}: grouped or non-zero-padded convolutions are not supported")
        have = (layer.in_channels, layer.out_channels, tuple(layer.kernel_size))
    else:
        have = (layer.in_features, layer.out_features, ())
    if out_slice is not None:
        have = (have[0], out_slice[1], have[2])
    want = (experts.in_features, experts.out_features, tuple(experts.down.shape[2:]))
    if have != want:
        def shape(in_f, out_f, kernel):
            return f"in {in_f}, out {out_f}" + (f", kernel {kernel}" if kernel else "")
        raise ValueError(f"experts for {path} have {shape(*want)} but the layer has {shape(*have)}")


class FeRALayer:
    """One adapted layer: its experts, the routing set by prepare_forward, and the hook applying them."""

    def __init__(self, path: str, layer: nn.Module, experts: RoutedExperts, dropout: float = 0.0):
        self.path, self.layer, self.experts, self.dropout = path, layer, experts, dropout
        self.routing_weights: torch.Tensor | None = None
        layer.requires_grad_(False)
        self._handle = layer.register_forward_hook(self._hook)

    def set_routing_weights(self, weights: torch.Tensor | None) -> None:
        self.routing_weights = weights

    def _hook(self, layer, args, out):
        if self.routing_weights is None:
            return None
        dropout = self.dropout if self.experts.training else 0.0
        return self.experts.add_to(out, args[0], self.routing_weights, layer=layer, dropout=dropout)

    def remove(self) -> None:
        self._handle.remove()


class FeRAModel(nn.Module):
    """A frozen base model with FeRA experts on its target layers and one router."""

    def __init__(self, base_model: nn.Module, config: FeRAConfig | None = None, adapter: FeRAAdapter | None = None):
        super().__init__()
        config = (adapter.config if adapter is not None else config or FeRAConfig()).validate()
        self.config = config
        self.base_model = base_model
        if adapter is None:
            targets = find_targets(base_model, config.target_modules, config.match_full_name)
            adapter = FeRAAdapter(config, {path: new_experts(layer, config) for path, layer in targets.items()})
        else:
            targets = {}
            for path in adapter.layers:
                try:
                    targets[path] = base_model.get_submodule(path)
                except AttributeError:
                    raise ValueError(f"adapter layer {path} does not exist in the model") from None
        for path, experts in adapter.layers.items():
            check_fits(path, experts, targets[path])
        self.adapter = adapter
        self.fera_layers = [FeRALayer(path, targets[path], experts, config.dropout)
                            for path, experts in adapter.layers.items()]
        self.current_e_t: torch.Tensor | None = None  # band energies and expert weights of the last routed call
        self.current_weights: torch.Tensor | None = None

    @classmethod
    def from_file(cls, base_model: nn.Module, path, /, **reference_options) -> "FeRAModel":
        """Attach the adapter in `path` to exactly the layers it names.

        base_model and path are positional-only, so the reference option base_model="sd15"
        can be passed by keyword without colliding with the model argument.
        """
        return cls(base_model, adapter=load_adapter(path, **reference_options))

    @property
    def router(self):
        return self.adapter.router

    def prepare_forward(self, z_t: torch.Tensor, controls=None) -> torch.Tensor:
        """Route by z_t's band energies; returns the (B, M) expert weights every layer will use."""
        self.current_e_t = band_energies(z_t, self.config.num_bands, self.config.indicator)
        self.current_weights = self.router(self.current_e_t, controls)
        self.set_routing_weights(self.current_weights)
        return self.current_weights

    def predict(self, x_t: torch.Tensor, *args, experts: bool = True, call=None, **kwargs):
        """The base model's output for x_t, its experts routed by x_t's band energies, or with
        experts=False the frozen model's (FECL's base prediction, the base model's samples).

        call(model, x_t, *args, **kwargs) replaces model(x_t, *args, **kwargs) for models called otherwise.
        """
        call = call or (lambda model, *a, **kw: model(*a, **kw))
        if not experts:
            with self.disabled():
                return call(self.base_model, x_t, *args, **kwargs)
        self.prepare_forward(x_t)
        return call(self.base_model, x_t, *args, **kwargs)

    def set_routing_weights(self, weights: torch.Tensor | None) -> None:
        for layer in self.fera_layers:
            layer.set_routing_weights(weights)

    @contextlib.contextmanager
    def disabled(self):
        """Routing off inside the block (the frozen model's prediction), restored after."""
        saved = [layer.routing_weights for layer in self.fera_layers]
        self.set_routing_weights(None)
        try:
            yield
        finally:
            for layer, weights in zip(self.fera_layers, saved):
                layer.set_routing_weights(weights)

    def compute_fecl_loss(self, z_base, z_fera, z_target) -> torch.Tensor:
        return fecl_loss(z_base, z_fera, z_target, self.config.num_bands, self.config.indicator,
                         self.config.fecl_weight)

    def save_adapters(self, path) -> Path:
        """.safetensors with metadata; a .pt path gets the reference's tensor-only pickle."""
        path = Path(path)
        if path.suffix == ".safetensors":
            return save_adapter(self.adapter, path)
        return atomic_write(path, lambda tmp: torch.save(self.adapter.file_state_dict(), tmp))

    @torch.no_grad()
    def load_adapters(self, path, **reference_options) -> None:
        """Load weights into the existing experts and router (optimizer references stay valid).

        As in the reference, the model's config stays the source of what a file does not record:
        a reference .pt keeps this model's alpha and tau unless reference_options give others
        (which then become the model's). A .safetensors records its config; one whose recorded
        values differ from this model's is refused, naming each field, rather than silently
        changing the model or ignoring the file.
        """
        reference = Path(path).suffix != ".safetensors"
        if reference:
            reference_options = {"alpha": self.config.alpha, "tau": self.config.router_tau, **reference_options}
        loaded = load_adapter(path, **reference_options)
        if not reference:
            differ = [f"{name} {getattr(loaded.config, name)!r} (model: {getattr(self.config, name)!r})"
                      for name in RECORDED_FIELDS if getattr(loaded.config, name) != getattr(self.config, name)]
            if differ:
                raise ValueError(f"{path}: the file's config differs from this model's: {', '.join(differ)}; "
                                 "build the model with the file's values (or FeRAModel.from_file)")
        mine, theirs = set(self.adapter.layers), set(loaded.layers)
        if mine != theirs:
            raise ValueError(f"{path}: adapter layers do not match this model's: {len(theirs - mine)} unexpected "
                             f"(e.g. {sorted(theirs - mine)[:3]}), {len(mine - theirs)} missing "
                             f"(e.g. {sorted(mine - theirs)[:3]})")
        own = self.adapter.layers
        for path_, experts in loaded.layers.items():
            if experts.down.shape != own[path_].down.shape or experts.up.shape != own[path_].up.shape:
                raise ValueError(f"{path}: {path_} shapes differ from this model's experts")
        mine_router = {k: v.shape for k, v in self.router.state_dict().items()}
        if mine_router != {k: v.shape for k, v in loaded.router.state_dict().items()}:
            raise ValueError(f"{path}: router shapes differ from this model's ({mine_router})")
        for path_, experts in loaded.layers.items():
            own[path_].load_split(experts.split())
            own[path_].scale = experts.scale
        self.router.load_state_dict(loaded.router.state_dict())
        self.router.tau = loaded.router.tau
        self.config.alpha, self.config.router_tau = loaded.config.alpha, loaded.config.router_tau
        if "base_model" in reference_options:
            self.config.base_model = loaded.config.base_model

    def remove(self) -> nn.Module:
        """Detach every hook; returns the untouched base model."""
        for layer in self.fera_layers:
            layer.remove()
        return self.base_model
