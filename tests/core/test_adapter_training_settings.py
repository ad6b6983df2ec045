"""The optional training-settings metadata of adapter files (format v1 stays readable both ways)."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fera_core import load_adapter, save_adapter


def test_training_settings_round_trip(tmp_path, ref_adapter_path):
    adapter = load_adapter(ref_adapter_path, base_model="sd15")
    assert adapter.training_settings is None
    adapter.training_settings = {"steps": 200, "learning_rate": 1e-4, "layers": "attention", "final_loss": 0.12}
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["fera.training"]) == adapter.training_settings
    assert load_adapter(path).training_settings == adapter.training_settings


def test_files_without_or_with_unknown_or_broken_metadata_still_load(tmp_path, ref_adapter_path):
    adapter = load_adapter(ref_adapter_path, base_model="sd15")
    plain = save_adapter(adapter, tmp_path / "plain.safetensors")
    with safe_open(str(plain), "pt") as f:
        meta = f.metadata()
    assert "fera.training" not in meta and load_adapter(plain).training_settings is None
    for extra in ({"fera.training": "{not json"}, {"fera.training": "[1, 2]"}, {"someone.else": "x"}):
        path = tmp_path / "other.safetensors"
        save_file(load_file(str(plain)), str(path), metadata=dict(meta, **extra))
        loaded = load_adapter(path)
        assert loaded.training_settings is None
        assert all(torch.equal(a, b) for a, b in zip(loaded.file_state_dict().values(),
                                                     adapter.file_state_dict().values()))
