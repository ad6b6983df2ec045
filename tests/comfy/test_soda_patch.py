"""SODA in a real ComfyUI (COMFYUI_PATH), nodes/soda_patch.py and the SODA nodes: weight patches at strength 0,
1 and between on tiny SD1.5, SDXL and Flux models against the paper's formula written out with numpy
(tests/core/soda_formulas.py), patch stacking after a LoRA, one factorisation per weight, refusals, training
through the shared loop, and Train -> Save -> Load -> Apply -> Bake through the nodes."""
import numpy as np
import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402

from fera_core.soda import IN, OUT, QR, SVD, SODAAdapter, SODAConfig  # noqa: E402
from soda_formulas import expected  # noqa: E402
from tiny_training import data, tiny  # noqa: E402

soda_patch = pack_module("nodes.soda_patch")
training = pack_module("nodes.train_loop")
keys = pack_module("nodes.module_paths")
LayerMerge = pack_module("fera_core.soda.merge").LayerMerge  # the class the pack's nodes use
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FAMILY_ID = {"sd15": "sd15", "sdxl": "sdxl", "flux": "flux"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: on a shared CPU, spinning OpenMP threads made them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_soda(model, family, variant=SVD, side=IN, seed=0, scale=0.3):
    """A SODA adapter on every attention projection, as after training: spectrum increments
    N(0, scale^2) and rotations exp(scale * skew) per factor, drawn from a seeded generator."""
    shapes = {}
    for path, (comfy_path, rows) in sorted(keys.diffusers_to_comfy(model).items()):
        if path.endswith(ATTENTION) and "attn" in path:
            w = model.get_submodule(comfy_path).weight
            shapes[path] = tuple(w.shape) if rows is None else (rows[1], *w.shape[1:])
    adapter = SODAAdapter.for_shapes(SODAConfig(variant=variant, side=side, base_model=FAMILY_ID[family],
                                                target_modules=list(ATTENTION)), shapes)
    gen = torch.Generator().manual_seed(seed)
    for layer in adapter.layers.values():
        with torch.no_grad():
            layer.spectrum.copy_(torch.randn(layer.spectrum.shape, generator=gen) * scale)
        skews = [torch.randn(s, s, generator=gen) * scale for s in layer.rotation.sizes]
        layer.rotation.load([torch.matrix_exp(a - a.t()) for a in skews])
    return adapter


def loaded_weights(patcher):
    """The diffusion model's weights as ComfyUI patches them for sampling (then unpatched)."""
    comfy.model_management.load_models_gpu([patcher])
    try:
        return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    finally:
        comfy.model_management.unload_all_models()


def expected_weights(model, adapter, base, strength):
    """{state-dict key: W0 + strength (W'(W0) - W0)} with W' from the numpy formula, slice by slice."""
    out = {}
    for path, layer in adapter.layers.items():
        comfy_path, rows = keys.diffusers_to_comfy(model)[path]
        key = f"{comfy_path}.weight"
        full = out.get(key, base[key].double().clone())
        w0 = base[key].double() if rows is None else base[key].double()[rows[0]:rows[0] + rows[1]]
        w_prime = torch.from_numpy(expected(w0.reshape(w0.shape[0], -1).numpy(), layer.double())).reshape(w0.shape)
        value = w0 + strength * (w_prime - w0)
        if rows is None:
            full = value
        else:
            full[rows[0]:rows[0] + rows[1]] = value
        out[key] = full
    return out


@pytest.mark.parametrize("family,variant,side", [("sd15", SVD, IN), ("sd15", QR, OUT), ("sdxl", SVD, OUT),
                                                 ("sdxl", QR, IN), ("flux", SVD, IN), ("flux", QR, IN)])
def test_strength_zero_one_and_between(family, variant, side):
    patcher = tiny(family)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    adapter = random_soda(patcher.model, family, variant, side)
    off = soda_patch.apply_soda(patcher, adapter, 0.0)
    assert not off.patches  # strength 0 adds nothing: the base model bit for bit
    assert all(torch.equal(v, base[k]) for k, v in loaded_weights(off).items())
    for strength in (1.0, 0.5):
        got = loaded_weights(soda_patch.apply_soda(patcher, adapter, strength))
        want = expected_weights(patcher.model, adapter, base, strength)
        assert want and set(want) < set(got)
        for key, w in want.items():  # float32 SVD/QR and merge against float64: <= 5e-6 measured, changes ~0.3
            torch.testing.assert_close(got[key].double(), w, atol=2e-5, rtol=1e-5, msg=key)
        assert all(torch.equal(v, base[k]) for k, v in got.items() if k not in want)
    assert all(torch.equal(v, base[k]) for k, v in patcher.model.state_dict().items())  # base restored


def test_acts_on_the_weight_a_lora_patched_before_it():
    """A LoRA's change (here as ComfyUI's plain diff patch) then SODA: SODA's W' of the LoRA-patched weight,
    as OFT rotates the weight it receives."""
    patcher = tiny("sd15")
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    adapter = random_soda(patcher.model, "sd15")
    path, layer = next(iter(adapter.layers.items()))
    key = f"{keys.diffusers_to_comfy(patcher.model)[path][0]}.weight"
    gen = torch.Generator().manual_seed(9)
    up, down = torch.randn(base[key].shape[0], 2, generator=gen), torch.randn(2, base[key].shape[1], generator=gen)
    lora = patcher.clone()
    lora.add_patches({key: ("diff", (up @ down,))}, 0.1)
    got = loaded_weights(soda_patch.apply_soda(lora, adapter, 1.0))[key]
    lora_weight = base[key].double() + 0.1 * (up @ down).double()
    torch.testing.assert_close(got.double(), torch.from_numpy(expected(lora_weight.numpy(), layer.double())),
                               atol=2e-5, rtol=1e-5)


def test_each_weight_is_factorised_once(monkeypatch):
    """Factorisations happen when ComfyUI patches weights, once per weight: not per sampling step, not
    again for another strength of the same adapter."""
    patcher = tiny("sd15")
    adapter = random_soda(patcher.model, "sd15")
    calls = []
    difference = LayerMerge.difference
    monkeypatch.setattr(LayerMerge, "difference", lambda self, *a: calls.append(1) or difference(self, *a))
    lat, pos = data("sd15")
    for strength in (1.0, 0.7):
        model = soda_patch.apply_soda(patcher, adapter, strength)
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
        comfy.sample.sample(model, noise, 4, 5.0, "euler", "normal", pos, pos, lat, seed=0, disable_pbar=True)
        comfy.model_management.unload_all_models()
    n = len(adapter.layers)
    assert len(calls) == 2 * n  # once per weight per model load; 4 steps x 2 calls each add nothing
    assert [m.factorisations for m in soda_patch.merges(adapter, torch.float32).values()] == [1] * n


def test_an_adapter_for_another_model_is_refused():
    sd15, flux = tiny("sd15"), tiny("flux")
    with pytest.raises(soda_patch.AdapterMismatchError, match="trained for SD1.5, this model is Flux"):
        soda_patch.apply_soda(flux, random_soda(sd15.model, "sd15"), 1.0)
    other = random_soda(sd15.model, "sd15")
    other.config.base_model = "unknown"
    with pytest.raises(soda_patch.AdapterMismatchError, match="does not fit"):
        soda_patch.apply_soda(flux, other, 1.0)


@pytest.mark.parametrize("family,variant", [("sd15", SVD), ("flux", QR)])
def test_loss_falls_in_comfyui(family, variant):
    """40 steps of the shared training loop with SODA's weight wrappers lower the loss on fixed draws by 1% or
    more (measured: 2.2% sd15, the tiny random UNet's attention barely moves its epsilon output; flux more);
    an adapter that does not learn leaves it unchanged to ~1e-7."""
    patcher = tiny(family)
    lat, pos = data(family)
    start = random_soda(patcher.model, family, variant, scale=0.0)  # identity, as a fresh adapter
    checkpointing = family == "flux"

    def run(adapter, steps, lr, seed):
        settings = training.TrainSettings(steps=steps, learning_rate=lr, batch_size=2, seed=seed,
                                          gradient_checkpointing=checkpointing)
        with torch.inference_mode():
            out = training.train(patcher, adapter, lat, pos, settings, attach=soda_patch.attach_live)
        comfy.model_management.unload_all_models()
        return out

    trained, losses = run(start, 40, 0.1, 0)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert trained.orthogonality_error() < 1e-5
    before = np.mean(run(start, 8, 1e-12, 123)[1])
    after = np.mean(run(trained, 8, 1e-12, 123)[1])
    assert after < 0.99 * before, (before, after)


def test_nodes_train_save_load_apply_and_bake(models_dir):
    """Train SODA -> Save -> Load -> Apply (strength 1 = Train SODA's own model) -> Bake to a LoRA that
    ComfyUI's own LoRA loader maps completely."""
    import comfy.lora
    import comfy.utils
    nodes = pack_module("nodes.soda_nodes")
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    with torch.inference_mode():
        out = nodes.TrainSODA.execute([patcher], [{"samples": lat}], [pos], [3], [1e-2], ["soda-qr"], ["out"],
                                      ["attention"], [2], [1], [0], ["fp32"], [False], [False], ["320=16x20"])
    trained_model, adapter, losses, text = out.args
    assert len(losses["loss"]) == 3 and adapter.config.method == "soda-qr" and adapter.config.side == "out"
    assert "soda-qr 'attention'" in text and adapter.training_settings["steps"] == 3
    nodes.SaveSODAAdapter.execute(adapter, "mine")
    name = next(p.name for p in (models_dir / "fera").iterdir())
    loaded = nodes.LoadSODAAdapter.execute(name).args[0]
    assert loaded.file_state_dict().keys() == adapter.file_state_dict().keys()
    applied = nodes.ApplySODA.execute(patcher, loaded, 1.0).args[0]
    a, b = loaded_weights(applied), loaded_weights(trained_model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lora_name, report = nodes.BakeSODAToLoRA.execute(patcher, loaded, 8, 1.0, "baked").args
    assert "energy kept" in report and len(report.splitlines()) == len(loaded.layers) + 1
    lora = comfy.utils.load_torch_file(str(models_dir / "loras" / lora_name))
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    assert set(comfy.lora.load_lora(lora, key_map)) == {f"{keys.diffusers_to_comfy(patcher.model)[p][0]}.weight"
                                                         for p in loaded.layers}
