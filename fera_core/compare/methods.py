"""The compared methods, one small entry each: build the trainable adapter on the demo model.

An entry takes the frozen base model and returns an `Adapted`: the model the training step and
the sampler call (anything with FeRAModel.predict's signature), the config the step reads (its
FECL weight, bands and indicator), the parameters the optimizer trains, and whether a router
exists to diagnose. Every entry here adapts the same layers (the demo's) with the same number of
low-rank weights: 3 experts x rank 4 = one LoRA of rank 12 per layer. LoRA is the routed experts
with one expert of rank 12 whose routing weight is always 1: y = W x + (alpha / r) B A x, A
Kaiming-uniform and B zero at the start, which is LoRA exactly (Hu et al., 2021).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import FeRAConfig
from ..indicator import PARTITION, REFERENCE
from ..model import FeRAModel

# FeRA as the demo ships it. Attention projections alone cannot draw 2-pixel stripes (the model attends
# at 16 x 16 and 8 x 8): the residual blocks' convolutions and the output convolution get experts too.
SHIPPED = FeRAConfig(rank=4, alpha=4.0, num_experts=3, num_bands=3, indicator=PARTITION, router_tau=0.5,
                     target_modules=["to_q", "to_k", "to_v", "to_out", "conv1", "conv2", "conv_out"],
                     match_full_name=True, base_model="fera-demo")
# The demo's learning rates (python -m fera_core demo): those the comparison's sweep chose.
LEARNING_RATES = {"fera": 5e-3, "lora": 5e-3}
ONE_LORA = dict(num_experts=1, rank=SHIPPED.num_experts * SHIPPED.rank,
                alpha=SHIPPED.alpha * SHIPPED.num_experts)  # alpha / rank stays the experts' 1.0


@dataclass
class Adapted:
    model: FeRAModel
    config: FeRAConfig
    trainable: list[nn.Parameter]
    routed: bool  # a router that chooses per input: the runner records and diagnoses its routing

    def counts(self) -> tuple[int, int]:
        """(low-rank weights, router weights) among the trainable parameters."""
        router = {id(p) for p in self.model.router.parameters()}
        mine = [(p.numel(), id(p) in router) for p in self.trainable]
        return sum(n for n, r in mine if not r), sum(n for n, r in mine if r)


def _fera(base: nn.Module, routed: bool = True, **changes) -> Adapted:
    config = dataclasses.replace(SHIPPED, target_modules=list(SHIPPED.target_modules), **changes)
    model = FeRAModel(base, config)
    return Adapted(model, config, list(model.adapter.parameters() if routed else _experts(model)), routed)


def _experts(model: FeRAModel):
    return (p for experts in model.adapter.layers.values() for p in experts.parameters())


def lora(base: nn.Module) -> Adapted:
    """LoRA of rank 12, plain MSE."""
    return _fera(base, routed=False, fecl_weight=0.0, **ONE_LORA)


def fera(base: nn.Module) -> Adapted:
    """FeRA as the demo ships it: 3 experts of rank 4, router, FECL 0.1, partition indicator."""
    return _fera(base)


def one_expert(base: nn.Module) -> Adapted:
    """FeRA with one expert of rank 12: no routing left (softmax over one), so LoRA trained with FECL."""
    return _fera(base, routed=False, **ONE_LORA)


def uniform_mix(base: nn.Module) -> Adapted:
    """FeRA with the router frozen at a uniform mix: its output layer zero, so softmax gives 1/3 each
    whatever the spectrum. (Three rank-4 experts at 1/3 each are one rank-12 LoRA at a third of the
    scale: what is left is LoRA's update with FECL and a different scale.)"""
    adapted = _fera(base, routed=False)
    for p in adapted.model.router.net[2].parameters():
        p.detach().zero_()
    return adapted


def no_fecl(base: nn.Module) -> Adapted:
    """FeRA trained with plain MSE (FECL weight 0): routing without the consistency loss."""
    return _fera(base, fecl_weight=0.0)


def reference_indicator(base: nn.Module) -> Adapted:
    """FeRA routed by the authors' DoG indicator instead of `partition` (on 32 x 32 images its finest
    band lies above Nyquist; see fera_core.indicator)."""
    return _fera(base, indicator=REFERENCE)


# id (what --methods takes) -> (what tables call it, entry)
METHODS: dict[str, tuple[str, Callable[[nn.Module], Adapted]]] = {
    "lora": ("LoRA", lora), "fera": ("FeRA", fera), "one-expert": ("FeRA, one expert", one_expert),
    "uniform": ("FeRA, uniform mix", uniform_mix), "no-fecl": ("FeRA, no FECL", no_fecl),
    "reference": ("FeRA, reference indicator", reference_indicator),
}
NOT_BUILT = ("SODA-SVD", "SODA-QR")  # the SODA issue's adapters: rows that say so until SODA exists


def check_equal(counts: dict[str, tuple[int, int]]) -> int:
    """Refuse a comparison whose methods train different numbers of low-rank weights; returns the number."""
    weights = {name: c[0] for name, c in counts.items()}
    if len(set(weights.values())) != 1:
        raise ValueError(f"methods must train equal numbers of adapter weights, got {weights}")
    return next(iter(weights.values()))
