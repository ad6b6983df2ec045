"""FeRA on models with quantized weights (COMFYUI_PATH), as most Flux, Qwen and Wan users run them: fp8
(Load Diffusion Model's weight_dtype fp8_e4m3fn / fp8_e5m2) and GGUF (city96/ComfyUI-GGUF's loader).

The tiny SD1.5 and Flux models are loaded by ComfyUI's own loader, comfy.sd.load_diffusion_model_state_dict
with model_options {"dtype": fp8}, as UNETLoader does (only the detection, which knows full-size models, is
given the tiny model's configuration): the weights are stored in fp8 and ComfyUI's manual-cast layers compute
in float32 on this CPU. The reference is the same model in float32 with those fp8-rounded weights: Apply FeRA,
the trace and training on the fp8 model must give what they give there, the experts computing in float32
(computing them in the weights' fp8 would round their output to 2-3 significant bits).
"""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from comfy_host import comfyui_root, patcher_of, pack_module, setup_comfy, tiny_model
from tiny_sampling import adapter_for, run

setup_comfy()
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402

from fera_core.trace import RoutingTrace  # noqa: E402

routing = pack_module("nodes.routing")
training = pack_module("nodes.train_loop")

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fp8_and_reference(family, weight_dtype, monkeypatch):
    """(the tiny model loaded by ComfyUI with fp8 weights, the float32 model with the same rounded weights)."""
    source = tiny_model(family).model
    config = source.model_config
    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet",
                        lambda sd, prefix, *args, **kwargs: type(config)(dict(config.unet_config)))
    fp8 = comfy.sd.load_diffusion_model_state_dict(dict(source.diffusion_model.state_dict()),
                                                   model_options={"dtype": weight_dtype})
    weights = fp8.model.diffusion_model.state_dict()
    assert {w.dtype for w in weights.values()} >= {weight_dtype}
    assert fp8.model.manual_cast_dtype == torch.float32
    reference = patcher_of(type(config)(dict(config.unet_config)))
    reference.model.diffusion_model.load_state_dict({k: w.float() for k, w in weights.items()})
    return fp8, reference


def traced(patcher, adapter):
    trace = RoutingTrace()
    out = run(routing.apply_fera(patcher, adapter, 1.0, trace=trace))
    return out, torch.tensor([r["energies"] + r["weights"] for r in trace.rows()])


@pytest.mark.parametrize("weight_dtype", FP8, ids=["fp8_e4m3fn", "fp8_e5m2"])
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_fp8_weights_apply_trace_and_train_as_their_float32_values(family, weight_dtype, monkeypatch):
    """Same weights, same float32 arithmetic: tolerances of float32 summation order (outputs up to ~10)."""
    fp8, reference = fp8_and_reference(family, weight_dtype, monkeypatch)
    adapter = adapter_for(fp8.model)
    plain = run(fp8)
    torch.testing.assert_close(plain, run(reference), rtol=1e-5, atol=1e-5)
    out, rows = traced(fp8, adapter)
    want, want_rows = traced(reference, adapter)
    assert (out - plain).abs().max() > 5e-3  # the adapter acts
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(run(routing.apply_fera(fp8, adapter, 0.0)), plain)

    channels = fp8.model.latent_format.latent_channels
    gen = torch.Generator().manual_seed(5)
    lat, pos = torch.randn(2, channels, 8, 8, generator=gen), [[torch.randn(1, 7, 32, generator=gen),
                                                                 {"pooled_output": torch.randn(1, 32, generator=gen)}]]
    settings = training.TrainSettings(steps=3, learning_rate=1e-2, batch_size=2, seed=0, gradient_checkpointing=True)
    results = []
    for patcher in (fp8, reference):
        with torch.inference_mode():
            results.append(training.train(patcher, adapter, lat, pos, settings))
        comfy.model_management.unload_all_models()
    (trained, losses), (trained_ref, losses_ref) = results
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=1e-6)
    assert all(e.up.dtype == torch.float32 for e in trained.layers.values())
    for path, experts in trained.layers.items():
        torch.testing.assert_close(experts.up, trained_ref.layers[path].up, rtol=1e-3, atol=1e-5)


def gguf_nodes():
    """city96/ComfyUI-GGUF as ComfyUI imports it (a package), from GGUF_NODES_PATH or custom_nodes/ComfyUI-GGUF;
    skips when it or its `gguf` package is missing."""
    path = Path(os.environ.get("GGUF_NODES_PATH") or comfyui_root() / "custom_nodes" / "ComfyUI-GGUF")
    if not (path / "ops.py").is_file():
        pytest.skip(f"no ComfyUI-GGUF at {path} (git clone https://github.com/city96/ComfyUI-GGUF there, or set "
                    "GGUF_NODES_PATH)")
    pytest.importorskip("gguf", reason="ComfyUI-GGUF needs the gguf package (pip install gguf)")
    if "comfyui_gguf" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_gguf", path / "__init__.py",
                                                      submodule_search_locations=[str(path)])
        sys.modules["comfyui_gguf"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    import comfyui_gguf.dequant
    import comfyui_gguf.loader
    import comfyui_gguf.nodes
    import comfyui_gguf.ops
    return comfyui_gguf


def test_gguf_q8_layers_apply_and_trace_as_their_dequantized_values(tmp_path, monkeypatch):
    """A tiny Flux written as a Q8_0 .gguf file (2-D weights whose rows are whole 32-blocks; the rest F32)
    and loaded as UnetLoaderGGUF loads it (gguf_sd_loader, its GGMLOps, GGUFModelPatcher): Apply FeRA and the
    trace give what the float32 model with the dequantized weights gives (same float32 arithmetic)."""
    nodes = gguf_nodes()
    import gguf
    source = tiny_model("flux").model
    config = source.model_config
    path = tmp_path / "tiny_flux.gguf"
    writer = gguf.GGUFWriter(str(path), arch="flux")
    for key, weight in source.diffusion_model.state_dict().items():
        array = weight.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            packed = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(comfy.model_detection, "model_config_from_unet",
                        lambda sd, prefix, *args, **kwargs: type(config)(dict(config.unet_config)))
    ops = nodes.ops.GGMLOps()
    ops.Linear.dequant_dtype, ops.Linear.patch_dtype = None, None
    model = comfy.sd.load_diffusion_model_state_dict(nodes.loader.gguf_sd_loader(str(path)),
                                                     model_options={"custom_operations": ops})
    model = nodes.nodes.GGUFModelPatcher.clone(model)
    qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert nodes.dequant.is_quantized(qkv.weight)  # stored as Q8_0 blocks, dequantized in forward
    reference = patcher_of(type(config)(dict(config.unet_config)))
    shapes = {k: v.shape for k, v in reference.model.diffusion_model.state_dict().items()}
    reference.model.diffusion_model.load_state_dict(
        {k: nodes.dequant.dequantize_tensor(v, torch.float32).reshape(shapes[k])
         for k, v in nodes.loader.gguf_sd_loader(str(path)).items()})
    adapter = adapter_for(model.model)
    plain = run(model)
    out, rows = traced(model, adapter)
    want, want_rows = traced(reference, adapter)
    assert (out - plain).abs().max() > 5e-3
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(run(routing.apply_fera(model, adapter, 0.0)), plain)
