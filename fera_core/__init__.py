"""FeRA (Frequency-Energy Constrained Routing, arXiv 2511.17979) in plain PyTorch.

Never imports ComfyUI: diffusers and plain PyTorch users use this package alone.
"""
from .adapter_file import AdapterFileError, FeRAAdapter, load_adapter, save_adapter
from .config import FeRAConfig
from .experts import RoutedExperts, add_experts, expert_gains
from .fecl import fecl_loss
from .indicator import DEFINITIONS, PARTITION, REFERENCE, band_components, band_energies
from .model import FeRAModel, find_targets
from .router import RoutingControls, SoftFrequencyRouter

__all__ = [
    "AdapterFileError", "FeRAAdapter", "FeRAConfig", "FeRAModel", "RoutedExperts", "RoutingControls",
    "SoftFrequencyRouter", "DEFINITIONS", "PARTITION", "REFERENCE", "add_experts", "band_components",
    "band_energies", "expert_gains", "fecl_loss", "find_targets", "load_adapter", "save_adapter",
]
