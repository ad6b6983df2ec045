"""Train FeRA in a real ComfyUI (COMFYUI_PATH) on tiny models of every family, built with ComfyUI's classes.

Models are built and their weights loaded under torch.inference_mode(), as ComfyUI's loaders
run, so the trainer meets the inference tensors a real checkpoint gives it.
"""
import pytest
import torch

from comfy_host import TINY_FAMILIES, pack_module, setup_comfy, tiny_model

setup_comfy()
import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models as sm  # noqa: E402
from comfy_extras.nodes_custom_sampler import Guider_Basic  # noqa: E402

from fera_core.training.step import regression_target  # noqa: E402
from tiny_training import NODE_ARGS, PREDICTION, TINY, data, tiny  # noqa: E402

training = pack_module("nodes.train_loop")
train_nodes = pack_module("nodes.train_nodes")
objective_mod = pack_module("nodes.objective")

def settings(**kw):
    base = dict(steps=30, learning_rate=3e-3, batch_size=2, seed=0, dtype=None)
    base.update(kw)
    return training.TrainSettings(**base)


def adapter_for(patcher, preset="attention", seed=0, fecl=0.1):
    return train_nodes.new_adapter(patcher.model, preset, 4, 4.0, 3, 3, 0.7, "partition", fecl, seed)


def train(patcher, adapter, lat, pos, **kw):
    with torch.inference_mode():  # as a node runs
        out = training.train(patcher, adapter, lat, pos, settings(**kw))
    comfy.model_management.unload_all_models()
    return out


def eval_loss(patcher, adapter, lat, pos, checkpointing):
    """Mean loss over 8 fixed draws (seed 123): a run whose AdamW steps move each weight by at most
    1e-12, orders of magnitude below the training effect measured with it."""
    _, losses = train(patcher, adapter, lat, pos, steps=8, learning_rate=1e-12, seed=123,
                      gradient_checkpointing=checkpointing)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("family", sorted(TINY))
def test_loss_falls(family):
    """40 steps lower the loss on fixed draws by 4% or more (measured: 6% sd15 .. 33% sd3); an
    adapter that does not learn leaves it unchanged to ~1e-7."""
    patcher = tiny(family)
    lat, pos = data(family)
    start = adapter_for(patcher)
    checkpointing = family == "flux"  # Flux adds residuals in place: it trains with checkpointing only
    trained, losses = train(patcher, start, lat, pos, steps=40, learning_rate=1e-2, gradient_checkpointing=checkpointing)
    assert len(losses) == 40 and all(torch.isfinite(torch.tensor(losses)))
    before = eval_loss(patcher, start, lat, pos, checkpointing)
    after = eval_loss(patcher, trained, lat, pos, checkpointing)
    assert after < 0.96 * before, (family, before, after)


def test_flux_without_checkpointing_says_what_to_do():
    patcher = tiny("flux")
    lat, pos = data("flux")
    with pytest.raises(RuntimeError, match="turn gradient_checkpointing on"):
        train(patcher, adapter_for(patcher), lat, pos, steps=1)


def _params(adapter):
    return {k: v.detach().clone() for k, v in adapter.state_dict().items()}


def test_frozen_weights_get_no_gradient_and_keep_their_flags():
    """A model built outside inference mode has weights that require grad. Training must not compute
    their gradients (the work of a full backward, and a gradient the size of the model) and must leave
    the flags as they were."""
    patcher = tiny_model("sd15", 0)
    weights = list(patcher.model.requires_grad_(True).parameters())  # ComfyUI 0.33 builds them without
    assert not any(w.is_inference() for w in weights)
    lat, pos = data("sd15")
    train(patcher, adapter_for(patcher), lat, pos, steps=2)
    assert sum(w.grad is not None for w in weights) == 0
    assert all(w.requires_grad for w in weights)


def test_bf16_training_runs_the_network_in_bf16_and_leaves_the_model_as_it_was():
    """training_dtype as in TrainLoraNode: the model's compute dtype for the session (every op, not
    only autocast's list, so norms and attention run in bf16 too), on the session's clone only."""
    patcher = tiny("sd15")
    before = patcher.model.manual_cast_dtype
    seen = set()
    layer = patcher.model.diffusion_model.input_blocks[0][0]  # conv_in: autocast alone hands it float32
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    lat, pos = data("sd15")
    try:
        train(patcher, adapter_for(patcher), lat, pos, steps=2, dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert seen == {torch.bfloat16}
    assert patcher.model.manual_cast_dtype is before and "manual_cast_dtype" not in patcher.object_patches


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fixed_seed_reproduces_exactly(checkpointing):
    patcher = tiny("sd15")
    lat, pos = data("sd15", n=3)
    start = adapter_for(patcher)
    runs = [train(patcher, start, lat, pos, steps=5, batch_size=2, seed=s, gradient_checkpointing=checkpointing)
            for s in (7, 7, 8)]
    (a, la), (b, lb), (c, lc) = runs
    assert la == lb and la != lc
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_checkpointing_gives_the_same_training():
    """Recomputing activations in backward changes memory, not the result (same kernels, same order)."""
    patcher = tiny("sd3")
    lat, pos = data("sd3")
    start = adapter_for(patcher)
    (a, la), (b, lb) = (train(patcher, start, lat, pos, steps=4, gradient_checkpointing=c) for c in (False, True))
    assert la == lb
    pa, pb = _params(a), _params(b)
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=1e-6)


class _Probe(comfy.samplers.Sampler):
    """Runs fn(objective, model_wrap) where the training loop would run."""

    def __init__(self, fn):
        self.fn = fn

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, *args, **kwargs):
        self.result = self.fn(objective_mod.ComfyObjective(model_wrap, extra_args), latent_image)
        return latent_image


def probe(patcher, lat, pos, fn):
    sampler = _Probe(fn)
    guider = Guider_Basic(patcher)
    guider.set_conds(pos)
    guider.sample(torch.zeros_like(lat), lat, sampler, torch.ones(2), seed=0, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return sampler.result


def hand_target(family, sigma, x0, noise):
    """The regression target written out per family from the published parameterisations."""
    s = sigma.reshape(-1, 1, 1, 1)
    if PREDICTION[family] == "epsilon":
        return noise
    if PREDICTION[family] == "v_prediction":
        return (noise - s * x0) / (1 + s**2).sqrt()
    return noise - x0


@pytest.mark.parametrize("family", sorted(TINY))
def test_targets_and_predictions_follow_model_sampling(family):
    """For the same noise and sigma: the target is the hand-written epsilon/v/flow target, turns back
    into x0 through the model's own calculate_denoised, and predict() returns the network's raw output
    for the input calculate_input(noise_scaling(...)) ComfyUI gives it."""
    patcher = tiny(family)
    lat, pos = data(family)
    seen = {}

    def record(_module, args, out):
        seen["input"], seen["output"] = args[0].detach().clone(), out.detach().clone()

    def check(obj, x0):
        ms = obj.sampling
        assert obj.prediction == PREDICTION[family]
        u = torch.tensor([0.2, 0.85])
        a, b, model_time = obj.coefficients(u)
        sigma = model_time[0]
        assert torch.allclose(sigma, torch.tensor([ms.percent_to_sigma(0.8), ms.percent_to_sigma(0.15)]))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        target = regression_target(obj.prediction, x0, noise, a, b)
        torch.testing.assert_close(target, hand_target(family, sigma, x0, noise), rtol=1e-5, atol=1e-5)
        x_k = ms.noise_scaling(sigma, noise, x0)
        torch.testing.assert_close(ms.calculate_denoised(sigma, target, x_k), x0, rtol=1e-4, atol=1e-4)
        x_in = ms.calculate_input(sigma, x_k)
        x_t = a.reshape(-1, 1, 1, 1) * x0 + b.reshape(-1, 1, 1, 1) * noise
        torch.testing.assert_close(x_t, x_in, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            pred = obj.predict(x_t, model_time, [0, 0], experts=True)
        torch.testing.assert_close(seen["input"], x_in, rtol=1e-5, atol=1e-5)
        # x0 -> prediction conversion divides by b (>= 0.27 here): float32 rounding stays below 1e-4
        torch.testing.assert_close(pred, seen["output"].float(), rtol=1e-4, atol=1e-4)
        return (pred - target).abs().max()

    handle = patcher.model.diffusion_model.register_forward_hook(record)
    try:
        with torch.inference_mode():
            gap = probe(patcher, lat, pos, check)
    finally:
        handle.remove()
    assert gap > 1e-2  # a random model's output is far from the target: the comparisons above are not vacuous


def node_train(patcher, lat, pos, **kw):
    """TrainFeRA as ComfyUI calls it: every input a list (is_input_list)."""
    args = {k: [v] for k, v in (NODE_ARGS | kw).items()}
    with torch.inference_mode():
        return train_nodes.TrainFeRA.execute([patcher], [{"samples": lat}], [pos], **args)


def sample(patcher, family="sd15", seed=4):
    channels, _ = TINY[family]
    _, pos = data(family, seed=9)
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out = comfy.sample.sample(patcher, torch.randn(1, channels, 8, 8, generator=gen), 3, 1.0, "euler", "normal",
                                  pos, pos, torch.zeros(1, channels, 8, 8), seed=seed, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


def weights(patcher):
    return {k: v.clone() for k, v in patcher.model.state_dict().items()}


def test_train_node_outputs_and_leaves_the_input_model_untouched(models_dir, monkeypatch):
    import comfy.utils
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    before_w, before_out = weights(patcher), sample(patcher)
    bar = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: bar.append(
        (value, total)))
    out = node_train(patcher, lat, pos)
    # the bar moves with the steps (newer ComfyUI throttles the updates it forwards, so some may be skipped)
    assert bar[-1] == (6, 6) and bar == sorted(set(bar)) and set(bar) <= {(i, 6) for i in range(1, 7)}
    model, adapter, loss, text = out.args
    assert len(loss["loss"]) == 6 and adapter.training_settings["steps"] == 6 and adapter.config.base_model == "sd15"
    assert f"{len(adapter.layers)} layers" in text and f"{adapter.num_parameters():,} parameters" in text
    assert not patcher.object_patches and not patcher.wrappers
    after_w = weights(patcher)
    assert all(torch.equal(before_w[k], after_w[k]) for k in before_w)
    assert torch.equal(sample(patcher), before_out)
    assert (sample(model) - before_out).abs().max() > 1e-3  # the trained MODEL differs


def test_cancel_stops_within_a_step_with_no_file_and_an_unchanged_model(models_dir, monkeypatch):
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    before_w, before_out = weights(patcher), sample(patcher)
    steps = []
    real = training.training_step

    def step_then_cancel(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            comfy.model_management.interrupt_current_processing(True)
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "training_step", step_then_cancel)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            node_train(patcher, lat, pos, steps=50, gradient_checkpointing=True)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    comfy.model_management.unload_all_models()
    assert len(steps) == 3  # the step in progress finished, the next one did not start
    assert not any(models_dir.rglob("*.safetensors")) and not any(models_dir.rglob("*.tmp"))
    after_w = weights(patcher)
    assert all(torch.equal(before_w[k], after_w[k]) and not after_w[k].requires_grad for k in before_w)
    assert not any(hasattr(m, "forward") and "forward" in vars(m) for m in patcher.model.modules())
    assert torch.equal(sample(patcher), before_out)


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_save_load_apply_reproduces_the_trained_model(family, models_dir):
    patcher = tiny(family)
    lat, pos = data(family)
    model, adapter, _, _ = node_train(patcher, lat, pos, gradient_checkpointing=family == "flux").args
    adapter_nodes = pack_module("nodes.adapter_nodes")
    with torch.inference_mode():
        train_nodes.SaveFeRAAdapter.execute(adapter, "runs/mine")
        train_nodes.SaveFeRAAdapter.execute(adapter, "runs/mine")
    files = sorted(p.name for p in (models_dir / "fera" / "runs").iterdir())
    assert files == ["mine_00001_.safetensors", "mine_00002_.safetensors"]  # never overwritten
    names = adapter_nodes.LoadFeRAAdapter.GET_SCHEMA().inputs[0].options
    assert "runs/mine_00001_.safetensors" in names  # the loader's list shows it
    loaded = adapter_nodes.LoadFeRAAdapter.execute("runs/mine_00001_.safetensors").args[0]
    assert loaded.training_settings == adapter.training_settings and loaded.training_settings["layers"] == "attention"
    assert set(loaded.layers) == set(adapter.layers)
    if family != "sd15":  # fused q/k/v saved as diffusers' separate projections
        assert any(p.endswith("attn.to_q") for p in loaded.layers) and any(p.endswith("attn.to_v") for p in loaded.layers)
    applied = adapter_nodes.ApplyFeRA.execute(patcher, loaded, 1.0).args[0]
    want, got, base = sample(model, family), sample(applied, family), sample(patcher, family)
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(learning_rate=0.0), "learning rate must be a positive number"),
    (dict(per_image=3), "2 images but 3 conditionings"),
    (dict(other_family=True), "trained for SD3, this model is SD1.5"),
    (dict(retention=True), "retention images are part of Diff-Tuning"),
])
def test_bad_inputs_stop_with_a_clear_message(change, message, models_dir):
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    kw = {}
    if change.get("per_image"):
        pos = data("sd15", n=3, per_image=True)[1]
    if change.get("other_family"):
        sd3 = tiny("sd3")
        kw["fera_adapter"] = adapter_for(sd3)
        kw["fera_adapter"].config.base_model = "sd3"
    if change.get("retention"):
        kw["retention_latents"] = {"samples": lat}
    if "learning_rate" in change:
        kw["learning_rate"] = change["learning_rate"]
    with pytest.raises(ValueError, match=message):
        node_train(patcher, lat, pos, **kw)
    assert not patcher.object_patches and not patcher.wrappers


def test_nan_loss_stops_with_a_clear_message(models_dir):
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    with pytest.raises(FloatingPointError, match="the loss became nan at step 1"):
        node_train(patcher, lat * float("nan"), pos)


def test_continue_training_and_diff_tuning_with_retention_images(models_dir):
    patcher = tiny("sd15")
    lat, pos = data("sd15", n=3)
    _, first, _, _ = node_train(patcher, lat, pos, steps=3).args
    kept = _params(first)
    ret, _ = data("sd15", n=2, seed=11)
    _, second, loss, _ = node_train(patcher, lat, pos, steps=3, fera_adapter=first, diff_tuning=True,
                                    retention_latents={"samples": ret}, batch_size=3).args
    assert all(torch.equal(kept[k], v) for k, v in _params(first).items())  # the input adapter is untouched
    assert any(not torch.equal(kept[k], v) for k, v in _params(second).items())
    assert second.training_settings["continued_from"]["steps"] == 3 and second.training_settings["retention_images"] == 2
    assert second.training_settings["diff_tuning"] and all(torch.isfinite(torch.tensor(loss["loss"])))


def diffusers_unet(patcher):
    """The tiny ComfyUI SD1.5 UNet's weights in a diffusers UNet2DConditionModel of the same architecture,
    renamed with ComfyUI's own diffusers map."""
    diffusers = pytest.importorskip("diffusers")
    import comfy.utils
    cfg = patcher.model.model_config.unet_config
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=cfg["num_heads"], norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    comfy_sd = patcher.model.diffusion_model.state_dict()
    sd = {d: comfy_sd[c].clone() for d, c in comfy.utils.unet_to_diffusers(cfg).items() if c in comfy_sd}
    missing, unexpected = unet.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    return unet.eval()


def test_sd15_file_trained_here_gives_fera_core_outputs_on_the_diffusers_layout(models_dir):
    from fera_core.model import FeRAModel
    patcher = tiny("sd15")
    lat, pos = data("sd15")
    model, adapter, _, _ = node_train(patcher, lat, pos, steps=20, learning_rate=3e-2).args
    with torch.inference_mode():
        train_nodes.SaveFeRAAdapter.execute(adapter, "sd15")
    path = models_dir / "fera" / "sd15_00001_.safetensors"
    unet = diffusers_unet(patcher)
    gen = torch.Generator().manual_seed(2)
    x0 = lat
    noise = torch.randn(x0.shape, generator=gen)
    u = torch.tensor([0.3, 0.9])

    def comfy_eps(obj, _):
        a, b, t = obj.coefficients(u)
        x_t = a.reshape(-1, 1, 1, 1) * x0 + b.reshape(-1, 1, 1, 1) * noise
        with torch.no_grad():
            return x_t, obj.sampling.timestep(t[0]), obj.predict(x_t, t, [0, 0], experts=True)
    with torch.inference_mode():
        x_t, timestep, want = probe(model, lat, pos, comfy_eps)
        _, _, base = probe(patcher, lat, pos, comfy_eps)
    context = pos[0][0].expand(2, -1, -1)
    fera = FeRAModel.from_file(unet, path)
    with torch.no_grad():
        fera.prepare_forward(x_t)
        got = unet(x_t, timestep, encoder_hidden_states=context).sample
    effect = (want - base).abs().max()
    # float32 through two implementations of the same network (different attention kernels): 4e-7 seen,
    # against an adapter effect of 0.07
    assert effect > 1e-2, effect
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_lists_of_latents_and_conditionings_are_joined(models_dir):
    """Newer ComfyUI's dataset loaders give one image per list item: VAE Encode then makes one LATENT each."""
    patcher = tiny("sd15")
    lat, pos = data("sd15", n=2, per_image=True)
    args = {k: [v] for k, v in NODE_ARGS.items()}
    with torch.inference_mode():
        out = train_nodes.TrainFeRA.execute([patcher], [{"samples": lat[:1]}, {"samples": lat[1:]}],
                                            [pos[:1], pos[1:]], **args)
    assert out.args[1].training_settings["images"] == 2
    with pytest.raises(ValueError, match="the images have different sizes"):
        with torch.inference_mode():
            train_nodes.TrainFeRA.execute([patcher], [{"samples": lat[:1]}, {"samples": lat[1:, :, :4]}], [pos[:1]],
                                          **args)
