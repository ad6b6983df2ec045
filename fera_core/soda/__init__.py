"""SODA (Spectral Orthogonal Decomposition Adaptation, Zhang et al., WACV 2025, arXiv 2405.21050): the
project's second spectrum-aware method, beside FeRA. A frozen weight is written as spectrum times basis;
training adds an increment to the spectrum and rotates the basis by a Kronecker product of small
orthogonal factors. config (what a file records), factorisation (SVD / QR of a weight), layer (the
trainable part and the merged weight), merge (applying a trained layer to host weights), adapter (the
file format), model (attaching to a plain PyTorch model). No ComfyUI import."""
from .adapter import SODAAdapter, load_soda, save_soda
from .config import IN, OUT, QR, SVD, SODAConfig
from .layer import SODALayer
from .merge import LayerMerge
from .model import SODAModel

__all__ = ["IN", "OUT", "QR", "SVD", "LayerMerge", "SODAAdapter", "SODAConfig", "SODALayer", "SODAModel",
           "load_soda", "save_soda"]
