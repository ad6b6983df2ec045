"""The pack's V3 nodes in a real ComfyUI (COMFYUI_PATH): entry point, schemas, loading, bad inputs."""
import asyncio
import shutil

import pytest

from comfy_host import PACK_ROOT, pack_module, setup_comfy

setup_comfy()
from tiny_sampling import make_adapter, tiny_patcher  # noqa: E402

extension = pack_module("nodes.extension")
nodes = pack_module("nodes.adapter_nodes")
routing = pack_module("nodes.routing")
core = pack_module("fera_core")  # the pack's own copy: its exception classes are the ones raised

TINY_PT = PACK_ROOT / "tests" / "fixtures" / "tiny_reference_adapter.pt"
NODE_IDS = {"LoadFeRAAdapter", "ApplyFeRA", "LoadFeRAModelOnly",
            "FeRARoutingTrace", "FeRARoutingPlot", "SaveFeRATrace", "FeRALatentBandEnergy",
            "LoadFeRATrainingImages", "TrainFeRA", "SaveFeRAAdapter", "BakeFeRAToLoRA",
            "BakeFeRAToLoRASchedule", "FeRASchedule",
            "LoadSODAAdapter", "ApplySODA", "TrainSODA", "SaveSODAAdapter", "BakeSODAToLoRA"}


@pytest.fixture(scope="module")
def entry():
    ext = asyncio.run(extension.comfy_entrypoint())
    return asyncio.run(ext.get_node_list())


def test_entrypoint_lists_the_nodes_with_tooltips(entry):
    schemas = [n.GET_SCHEMA() for n in entry]
    assert {s.node_id for s in schemas} == NODE_IDS
    for s in schemas:
        assert s.category == "FeRA" and s.description
        for item in list(s.inputs) + list(s.outputs):
            assert item.tooltip, f"{s.node_id}: {item.id} has no tooltip"
        assert (PACK_ROOT / "web" / "docs" / f"{s.node_id}.md").is_file(), f"no help page for {s.node_id}"


def test_loader_lists_fera_and_lora_folders_and_reads_both_formats(models_dir):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    core.save_adapter(adapter, models_dir / "fera" / "mine.safetensors")
    shutil.copy(TINY_PT, models_dir / "loras" / "reference.pt")
    (models_dir / "loras" / "notes.txt").write_text("not an adapter")
    names = nodes.LoadFeRAAdapter.GET_SCHEMA().inputs[0].options
    assert names == ["mine.safetensors", "reference.pt"]
    mine = nodes.LoadFeRAAdapter.execute("mine.safetensors").args[0]
    assert mine.layers.keys() == adapter.layers.keys()
    ref = nodes.LoadFeRAAdapter.execute("reference.pt", 2.0, 0.5).args[0]
    assert ref.config.alpha == 2.0 and ref.config.router_tau == 0.5 and len(ref.layers) == 24


def test_apply_and_model_only_nodes_patch_a_clone(models_dir):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    core.save_adapter(adapter, models_dir / "fera" / "mine.safetensors")
    out = nodes.ApplyFeRA.execute(patcher, adapter, 1.0, 0.5, -1, "", "1, 1, 2", 0.0, 0.8).args[0]
    assert out is not patcher and not patcher.object_patches
    assert len(out.object_patches) == len(adapter.layers)
    only = nodes.LoadFeRAModelOnly.execute(patcher, "mine.safetensors", 0.7).args[0]
    assert len(only.object_patches) == len(adapter.layers)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mix="0.5, nope"), "mix: '0.5, nope' is not a comma-separated list"),
    (dict(mix="1, 1"), "mix needs one value per expert (3)"),
    (dict(mix="-1, 1, 1"), "mix must be non-negative"),
    (dict(gains="1, 2"), "gains needs one value per expert (3)"),
    (dict(force_expert=5), "forced expert 5 is out of range 0..2"),
    (dict(force_expert=0, mix="1, 0, 0"), "set either force_expert or mix, not both"),
    (dict(gains="1, x"), "gains: '1, x' is not a comma-separated list of numbers"),
    (dict(start_percent=0.9, end_percent=0.1), "start_percent <= end_percent"),
    (dict(start_percent=0.5, end_percent=1.5), "need 0 <= start_percent <= end_percent <= 1, got 0.5, 1.5"),
])
def test_apply_refuses_bad_controls_without_patching(kwargs, message):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    args = dict(temperature=0.0, force_expert=-1, mix="", gains="", start_percent=0.0, end_percent=1.0) | kwargs
    with pytest.raises(ValueError) as err:
        nodes.ApplyFeRA.execute(patcher, adapter, 1.0, **args)
    assert message in str(err.value)
    assert not patcher.object_patches and not patcher.wrappers


def test_a_zero_width_window_is_accepted():
    """start == end is a window, as in ComfyUI's ControlNet (empty unless a step's sigma is exactly on it)."""
    patcher = tiny_patcher()
    patched = nodes.ApplyFeRA.execute(patcher, make_adapter(patcher.model), 1.0, temperature=0.0, force_expert=-1,
                                      mix="", gains="", start_percent=0.5, end_percent=0.5).args[0]
    assert routing.routings_of(patched)[0].start_percent == routing.routings_of(patched)[0].end_percent == 0.5


def test_apply_names_traces_after_the_adapter_file():
    """Traces and plots name the adapter by the file it was loaded from, else by its base model."""
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    controls = dict(temperature=0.0, force_expert=-1, mix="", gains="", start_percent=0.0, end_percent=1.0)
    unnamed = nodes.ApplyFeRA.execute(patcher, adapter, 1.0, **controls).args[0]
    adapter.name = "mine.safetensors"
    named = nodes.ApplyFeRA.execute(patcher, adapter, 1.0, **controls).args[0]
    adapter.config.base_model = ""
    assert routing.routings_of(named)[0].meta()["adapter"] == "mine.safetensors"
    assert routing.routings_of(unnamed)[0].meta()["adapter"] == "FeRA adapter (unknown base)"


def test_loader_errors_name_the_file(models_dir):
    (models_dir / "loras" / "plain_lora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(core.AdapterFileError, match="plain_lora.safetensors"):
        nodes.LoadFeRAAdapter.execute("plain_lora.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        nodes.LoadFeRAAdapter.execute("missing.safetensors")


def test_adapter_for_another_model_is_refused_by_the_node():
    sd15 = PACK_ROOT.parent / "shared" / "fixtures" / "reference" / "sd15_reference_adapter.pt"
    if not sd15.is_file():
        pytest.skip(f"{sd15} is absent")
    patcher = tiny_patcher()
    with pytest.raises(routing.AdapterMismatchError, match="0 of 96 layers match"):
        nodes.ApplyFeRA.execute(patcher, core.load_adapter(sd15), 1.0)
    assert not patcher.object_patches
