"""FeRA on tiny SD1.5, SD3 and Flux models of ComfyUI's own classes (COMFYUI_PATH).

An independent check of the layer mapping, including the fused q/k/v slices of SD3 and
Flux: with the router forced onto expert m, Apply FeRA must equal ComfyUI's own LoRA loader
given expert m's weights as a plain LoRA keyed by diffusers module names (ComfyUI maps them,
and slices fused layers, itself).
"""
import pytest
import torch

from comfy_host import TINY_FAMILIES, build_model, pack_module, setup_comfy, tiny_model

setup_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402

from fera_core import RoutingControls  # noqa: E402
from fera_core.trace import RoutingTrace  # noqa: E402
from tiny_sampling import adapter_for, run  # noqa: E402

keys = pack_module("nodes.module_paths")
routing = pack_module("nodes.routing")
apply_fera = routing.apply_fera


def expert_as_lora(model, adapter, m, strength):
    """Expert m of every layer as a plain LoRA keyed by the diffusers module name, in a format ComfyUI's
    loader maps itself (diffusers' transformer.* for SD3/Flux, kohya's lora_unet_* for UNets): the
    LoRA side never goes through nodes/module_paths.py, so a wrong or swapped target there shows up."""
    known = comfy.lora.model_lora_keys_unet(model, {})
    lora = {}
    for path, experts in adapter.layers.items():
        key = next((k for k in (f"transformer.{path}", "lora_unet_" + path.replace(".", "_")) if k in known), None)
        assert key is not None, f"ComfyUI's LoRA loader has no key for {path}"
        down, up = experts.split()[m]
        lora[f"{key}.lora_down.weight"] = down.detach().clone()
        lora[f"{key}.lora_up.weight"] = up.detach() * experts.scale * strength
    return lora


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_forced_expert_equals_comfyui_lora_of_that_expert(family):
    patcher = tiny_model(family)
    adapter = adapter_for(patcher.model)
    assert len(adapter.layers) >= 8
    plain = run(patcher)
    for m, strength in ((0, 1.0), (2, 0.5)):
        fera = run(apply_fera(patcher, adapter, strength, RoutingControls.forced(m, 3)))
        lora, _ = comfy.sd.load_lora_for_models(patcher, None, expert_as_lora(patcher.model, adapter, m, strength), 1.0, 0)
        want = run(lora)
        # measured: the LoRA moves the sample by 0.16 to 2.1; FeRA and it agree within 1e-4 (on values up to 285)
        assert (want - plain).abs().max() > 0.03, "the LoRA had no effect: the comparison would prove nothing"
        torch.testing.assert_close(fera, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rows_with_different_spectra_are_routed_differently(family):
    patcher = tiny_model(family)
    adapter = adapter_for(patcher.model)
    trace = RoutingTrace()
    run(apply_fera(patcher, adapter, 1.0, trace=trace))
    first = [r for r in trace.rows() if r["call"] == 0 and r["cond"] == "cond"]
    assert [r["row"] for r in first] == [0, 1]
    # float32 noise is ~1e-7; measured 2.6e-3 (flux) to 6.3e-3 (sd3): both rows are mostly noise at the first call
    assert max(abs(a - b) for a, b in zip(first[0]["weights"], first[1]["weights"])) > 1e-4


@pytest.mark.parametrize("family, name", [("sd15", "SD1.5"), ("sd2", "SD2"), ("sdxl", "SDXL"), ("sd3", "SD3"),
                                          ("flux", "Flux")])
def test_refusal_names_the_model_family_as_users_know_it(family, name):
    model = build_model(family)  # meta device: matching reads shapes only
    adapter = adapter_for(tiny_model("flux" if family == "sd15" else "sd15").model)
    with pytest.raises(routing.AdapterMismatchError, match=f"does not fit this {name} model: 0 of"):
        routing.match_layers(model, adapter)
