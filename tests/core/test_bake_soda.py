"""Baking a SODA adapter into a LoRA of chosen rank: the LoRA is the best rank-r approximation of the weight
change (numpy's SVD of the change computed from the paper's formula, soda_formulas), and the captured energy
is the kept singular values squared over all of them."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fera_core.__main__ import main
from fera_core.bake.lora import read_baked_lora
from fera_core.bake.soda import bake_soda
from fera_core.soda import QR, SVD, SODAAdapter, SODAConfig, save_soda
from soda_formulas import expected, orthogonal

Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.1.resnets.0.conv1"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops (conftest)


def adapter_and_weights(variant, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {Q: (24, 16), CONV: (8, 6, 3, 3)}
    adapter = SODAAdapter.for_shapes(SODAConfig(variant=variant, base_model="sd15"), shapes)
    for layer in adapter.layers.values():
        with torch.no_grad():
            layer.spectrum.copy_(torch.from_numpy(rng.standard_normal(layer.spectrum.shape[0])))
        layer.rotation.load([torch.from_numpy(orthogonal(s, seed + s)).float() for s in layer.rotation.sizes])
    weights = {p: torch.from_numpy(rng.standard_normal(s)).float() for p, s in shapes.items()}
    return adapter, weights


def change(adapter, weights, path, strength=1.0):
    w0 = weights[path].double().numpy().reshape(weights[path].shape[0], -1)
    return strength * (expected(w0, adapter.layers[path].double()) - w0)


@pytest.mark.parametrize("variant", [SVD, QR])
@pytest.mark.parametrize("rank", [3, 40])
def test_baked_lora_is_the_best_rank_r_approximation(variant, rank):
    adapter, weights = adapter_and_weights(variant)
    tensors, meta, captured = bake_soda(adapter, weights, rank, strength=0.8, dtype=torch.float32)
    info = json.loads(meta["fera.baked"])
    assert info["rank"] == rank and info["source"]["kind"] == "soda" and info["captured_energy"] == captured
    for path, stem in ((Q, "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
                       (CONV, "lora_unet_down_blocks_1_resnets_0_conv1")):
        dw = change(adapter, weights, path, 0.8)
        u, s, vt = np.linalg.svd(dw, full_matrices=False)
        r = min(rank, len(s))
        best = (u[:, :r] * s[:r]) @ vt[:r]
        up, down = tensors[f"{stem}.lora_up.weight"], tensors[f"{stem}.lora_down.weight"]
        assert up.shape[1] == down.shape[0] == rank
        lora = up.reshape(up.shape[0], rank).double().numpy() @ down.reshape(rank, -1).double().numpy()
        np.testing.assert_allclose(lora, best, atol=1e-4 * np.abs(dw).max())  # float32 merge vs float64
        assert captured[path] == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum(), abs=1e-6)
    assert (captured[Q] == pytest.approx(1.0)) == (rank >= 16)


def test_cli_bakes_a_soda_file_against_base_weights(tmp_path, capsys):
    adapter, weights = adapter_and_weights(SVD, seed=1)
    save_soda(adapter, tmp_path / "soda.safetensors")
    save_file({f"{p}.weight": w for p, w in weights.items()} | {"other.weight": torch.zeros(2)},
              tmp_path / "unet.safetensors")
    out = tmp_path / "baked.safetensors"
    assert main(["bake", str(tmp_path / "soda.safetensors"), str(out), "--base", str(tmp_path / "unet.safetensors"),
                 "--rank", "4"]) == 0
    tensors, info = read_baked_lora(out)
    assert info["rank"] == 4 and len(tensors) == 4 and set(info["captured_energy"]) == {Q, CONV}
    assert "energy of the weight change kept" in capsys.readouterr().out
    assert main(["bake", str(tmp_path / "soda.safetensors"), str(tmp_path / "x.safetensors"), "--mix", "1"]) == 2
    assert "is a SODA adapter: bake it with --base" in capsys.readouterr().err
