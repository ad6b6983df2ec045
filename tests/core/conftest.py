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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests: on a shared, oversubscribed CPU spinning OpenMP threads made
    small tensors' ops ~10x slower (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_unet(_tiny_unet_parts):
    """A fresh copy of the reference's tiny diffusers UNet (eval mode) for each test.

    The test runs with one intra-op thread: this small UNet gains little from more, and on a
    shared, oversubscribed CPU spinning OpenMP threads made its forward/backward ~10x slower.
    """
    from diffusers import UNet2DConditionModel

    config, weights = _tiny_unet_parts
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield unet.eval()
    finally:
        torch.set_num_threads(threads)
