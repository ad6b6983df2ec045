"""Fixtures of the fera_core tests (no ComfyUI): the reference fixture files (tests/fixtures) and the tiny UNet.

Helpers beside this file (plain modules, never test modules): band_references.py re-implements the
indicator's band decompositions; diffusers_pipeline.py builds tiny diffusers pipelines and image folders.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def ref_adapter_path() -> Path:
    return FIXTURES / "tiny_reference_adapter.pt"


@pytest.fixture(scope="session")
def reference_io() -> dict:
    return load_file(FIXTURES / "tiny_reference_io.safetensors")


@pytest.fixture(scope="session")
def _tiny_unet_parts():
    return json.loads((FIXTURES / "tiny_unet_config.json").read_text()), load_file(FIXTURES / "tiny_unet.safetensors")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on a shared, oversubscribed CPU, spinning OpenMP threads made small
    models and matrices ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def tiny_unet(_tiny_unet_parts, one_thread):
    """A fresh copy of the reference's tiny diffusers UNet (eval mode) for each test, on one thread
    (one_thread: this small UNet gains little from more)."""
    from diffusers import UNet2DConditionModel

    config, weights = _tiny_unet_parts
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(weights)
    return unet.eval()
