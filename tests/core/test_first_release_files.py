"""Files of the first release still load: adapters, traces and baked LoRAs written by that code
(tests/fixtures/v0.1, made at commit d8f7b94) read with today's fera_core, values unchanged."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fera_core import load_adapter
from fera_core.bake import read_baked_lora
from fera_core.trace import RoutingTrace

V01 = Path(__file__).resolve().parents[1] / "fixtures" / "v0.1"


def test_adapter_of_the_first_release_loads_with_its_settings():
    path = V01 / "adapter_v0.1.safetensors"
    adapter = load_adapter(path)
    assert adapter.config.base_model == "sd15" and adapter.config.num_experts == 2 and adapter.config.alpha == 2.0
    with safe_open(str(path), "pt") as f:
        assert adapter.training_settings == json.loads(f.metadata()["fera.training"])
    assert adapter.training_settings["steps"] == 3 and adapter.training is True  # the module flag is its own
    raw = load_file(str(path))
    mine = adapter.file_state_dict()
    assert sorted(mine) == sorted(raw) and all(torch.equal(mine[k], raw[k]) for k in raw)
    assert adapter.name == path.name


def test_trace_of_the_first_release_loads_as_json_and_csv():
    from_json = RoutingTrace.from_json((V01 / "trace_v0.1.json").read_text())
    from_csv = RoutingTrace.from_csv((V01 / "trace_v0.1.csv").read_text())
    for trace in (from_json, from_csv):
        steps = trace.step_weights()
        assert [s for s, _, _ in steps] == [0, 1]
        torch.testing.assert_close(torch.tensor(steps[0][2]), torch.tensor([0.55, 0.45]))  # mean of its two rows
    assert from_json.meta["adapter"] == "adapter_v0.1.safetensors"


def test_baked_lora_of_the_first_release_reads_back():
    tensors, info = read_baked_lora(V01 / "baked_v0.1.safetensors")
    assert info["mix"] == [0.25, 0.75] and info["rank"] == 4 and len(tensors) == 4
