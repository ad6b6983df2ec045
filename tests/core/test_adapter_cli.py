"""python -m fera_core info | convert."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fera_core import load_adapter
from fera_core.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def test_convert_records_supplied_alpha_tau_and_base_model(tmp_path, ref_adapter_path, capsys):
    dst = tmp_path / "converted.safetensors"
    code = main(["convert", str(ref_adapter_path), str(dst), "--alpha", "8", "--tau", "0.5", "--base-model", "sd15"])
    assert code == 0
    ref = torch.load(ref_adapter_path, weights_only=True)
    assert capsys.readouterr().out.strip() == f"wrote {dst}: 24 layers, {sum(v.numel() for v in ref.values())} parameters"

    adapter = load_adapter(dst)  # no options needed: the file records them
    c = adapter.config
    assert (c.alpha, c.router_tau, c.base_model, c.indicator, c.rank) == (8.0, 0.5, "sd15", "reference", 4)
    assert adapter.router.tau == 0.5 and all(e.scale == 2.0 for e in adapter.layers.values())
    sd = adapter.file_state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_convert_defaults_are_the_reference_defaults(tmp_path, ref_adapter_path):
    dst = tmp_path / "converted.safetensors"
    assert main(["convert", str(ref_adapter_path), str(dst)]) == 0
    c = load_adapter(dst).config
    assert (c.alpha, c.router_tau, c.base_model) == (1.0, 0.7, "unknown")


def test_convert_of_bad_file_fails_without_output(tmp_path, capsys):
    src = tmp_path / "bad.pt"
    torch.save({"router.net.0.weight": torch.zeros(64, 3, dtype=torch.int64)}, src)
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src}: ") and "dtype torch.int64" in err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_info_prints_a_summary_by_default(ref_adapter_path, capsys):
    assert main(["info", str(ref_adapter_path), "--alpha", "2"]) == 0
    out = capsys.readouterr().out
    ref = torch.load(ref_adapter_path, weights_only=True)
    params = sum(v.numel() for v in ref.values())
    assert out.splitlines() == [
        str(ref_adapter_path),
        "  format          reference .pt (tensors only, read without unpickling)",
        "  base model      unknown",
        "  adapted layers  24",
        "  experts         3 per layer, rank 4",
        "  alpha / scale   2.0 / 0.5 (given with --alpha)",
        f"  parameters      {params:,}",
        "  indicator       reference, 3 bands",
        "  router          tau 0.7 (not in a .pt: reference default, change with --tau), hidden 64",
        "  target modules  to_k, to_q, to_v (child-name substrings, as the reference)",
        "(per-layer listing: --layers; machine-readable: --json)",
    ]


def test_info_summary_of_safetensors_states_its_recorded_values(tmp_path, ref_adapter_path, capsys):
    dst = tmp_path / "a.safetensors"
    assert main(["convert", str(ref_adapter_path), str(dst), "--alpha", "8", "--tau", "0.5", "--base-model", "sd15"]) == 0
    capsys.readouterr()
    assert main(["info", str(dst)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "  format          FeRA .safetensors, format version 1"
    assert lines[2] == "  base model      sd15"
    assert lines[5] == "  alpha / scale   8.0 / 2.0"  # recorded: no note
    assert lines[8] == "  router          tau 0.5, hidden 64"


def test_info_layers_lists_every_layer(ref_adapter_path, capsys):
    assert main(["info", str(ref_adapter_path), "--layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  layers (24 linear, 0 conv): in -> out")
    listing = lines[start + 1:]
    assert len(listing) == 24 and start == 10
    # attn2.to_k reads the 32-wide text embedding; the mid block's to_q works at 64 channels
    assert "    down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k  32 -> 32" in listing
    assert "    mid_block.attentions.0.transformer_blocks.0.attn1.to_q  64 -> 64" in listing


def test_info_json_is_machine_readable_and_layers_on_request(ref_adapter_path, capsys):
    assert main(["info", str(ref_adapter_path), "--json", "--alpha", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    ref = torch.load(ref_adapter_path, weights_only=True)
    assert info["file"] == str(ref_adapter_path) and info["format"] == "reference-pt"
    assert info["adapted_layers"] == 24 and "layers" not in info
    assert info["parameters"] == sum(v.numel() for v in ref.values())
    assert info["config"]["alpha"] == 2.0 and info["scale"] == 0.5 and info["config"]["num_experts"] == 3

    assert main(["info", str(ref_adapter_path), "--json", "--layers"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert len(layers) == 24
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == {"in": 32, "out": 32}
    assert layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"] == {"in": 64, "out": 64}


def test_convert_refuses_to_overwrite_without_force(tmp_path, ref_adapter_path, capsys):
    dst = tmp_path / "a.safetensors"
    dst.write_bytes(b"precious")
    assert main(["convert", str(ref_adapter_path), str(dst)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {dst}: already exists; pass --force to overwrite"
    assert dst.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]

    assert main(["convert", str(ref_adapter_path), str(dst), "--force"]) == 0
    assert load_adapter(dst).num_parameters() == sum(v.numel() for v in torch.load(ref_adapter_path, weights_only=True).values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_info_on_safetensors_rejects_reference_options(tmp_path, ref_adapter_path, capsys):
    dst = tmp_path / "a.safetensors"
    assert main(["convert", str(ref_adapter_path), str(dst)]) == 0
    capsys.readouterr()
    assert main(["info", str(dst), "--tau", "0.3"]) == 2
    assert "can only be supplied for reference .pt files" in capsys.readouterr().err


def test_info_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["info", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such file"


def test_python_dash_m_entry_point(tmp_path):
    """`python -m fera_core` runs main() and exits with its status (one subprocess: the error path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    missing = tmp_path / "x.pt"
    run = subprocess.run([sys.executable, "-m", "fera_core", "info", str(missing)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip() == f"error: {missing}: no such file", run.stderr
