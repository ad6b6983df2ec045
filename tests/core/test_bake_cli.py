"""python -m fera_core bake: each mix source, the metadata it records, and clean failures."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fera_core import RoutingControls, band_energies, load_adapter
from fera_core.__main__ import main
from fera_core.bake.lora import lora_keys, read_baked_lora

LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def baked_update(path, adapter):
    """down/up of LAYER in the baked file and the FeRA update it must equal: sum_m w_m * scale * up_m down_m."""
    tensors, info = read_baked_lora(path)
    down, up = (tensors[k] for k in lora_keys(LAYER, info["key_style"]))
    return up @ down, info


def fera_update(adapter, mix, strength=1.0):
    experts = adapter.layers[LAYER]
    return sum(w * experts.scale * strength * u @ d for w, (d, u) in zip(mix, experts.split()))


@pytest.mark.parametrize("args,mix_of", [
    (["--mix", "1,1,2"], lambda a, z: [0.25, 0.25, 0.5]),
    (["--expert", "1"], lambda a, z: [0.0, 1.0, 0.0]),
    (["--energies", "0.6,0.3,0.1"], lambda a, z: a.router(torch.tensor([[0.6, 0.3, 0.1]]))[0].tolist()),
    (["--latent", "LATENT", "--temperature", "0.3"],
     lambda a, z: a.router(band_energies(z, 3), RoutingControls(tau=0.3)).mean(0).tolist()),
])
def test_bake_sources(tmp_path, ref_adapter_path, capsys, args, mix_of):
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    save_file({"latent_tensor": z}, str(tmp_path / "z.latent"))  # ComfyUI's Save Latent format
    args = [str(tmp_path / "z.latent") if a == "LATENT" else a for a in args]
    out = tmp_path / "baked.safetensors"
    assert main(["bake", str(ref_adapter_path), str(out), "--alpha", "8", "--strength", "0.5", *args]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: 24 layers, rank ")
    adapter = load_adapter(ref_adapter_path, alpha=8.0)
    mix = mix_of(adapter, z)
    got, info = baked_update(out, adapter)
    torch.testing.assert_close(got, fera_update(adapter, mix, 0.5), rtol=1e-5, atol=1e-7)
    assert info["mix"] == pytest.approx(mix, abs=1e-6) and info["strength"] == 0.5
    assert info["source"]["adapter"] == ref_adapter_path.name and info["adapter_config"]["alpha"] == 8.0


@pytest.mark.parametrize("args,problem", [
    (["--expert", "3"], "forced expert 3 is out of range 0..2"),
    (["--mix", "1,x,2"], "'1,x,2' is not a comma-separated list of numbers"),
    (["--mix", "1,2"], "mix needs one value per expert (3), got 2"),
    (["--energies", "nan,0,1"], "band energies must be finite"),
    (["--expert", "0", "--strength", "inf"], "must be finite"),
])
def test_bad_requests_fail_without_output(tmp_path, ref_adapter_path, capsys, args, problem):
    out = tmp_path / "baked.safetensors"
    assert main(["bake", str(ref_adapter_path), str(out), *args]) == 2
    assert problem in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_latent_file(tmp_path, ref_adapter_path, capsys):
    save_file({"a": torch.zeros(1, 4, 8, 8), "b": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    (tmp_path / "junk.latent").write_bytes(b"\x00" * 5)
    for name, problem in (("two.safetensors", "expected a 'latent_tensor' or a single tensor, found 2"),
                          ("junk.latent", "error: ")):
        assert main(["bake", str(ref_adapter_path), str(tmp_path / "o.safetensors"), "--latent",
                     str(tmp_path / name)]) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_metadata_names_the_source(tmp_path, ref_adapter_path):
    out = tmp_path / "b.safetensors"
    assert main(["bake", str(ref_adapter_path), str(out), "--energies", "0.5,0.3,0.2"]) == 0
    _, info = read_baked_lora(out)
    assert info["source"] == {"kind": "router", "energies": [0.5, 0.3, 0.2], "adapter": ref_adapter_path.name}
    assert json.dumps(info)  # plain JSON


def test_existing_output_is_kept_unless_forced(tmp_path, ref_adapter_path, capsys):
    out = tmp_path / "b.safetensors"
    out.write_bytes(b"mine")
    assert main(["bake", str(ref_adapter_path), str(out), "--expert", "0"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["bake", str(ref_adapter_path), str(out), "--expert", "0", "--force"]) == 0
    assert read_baked_lora(out)[1]["experts"] == [0]
