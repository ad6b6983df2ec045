"""Video and 5-D latents in a real ComfyUI (COMFYUI_PATH): tiny Wan 2.1 and Qwen-Image models.

The router reads a (B, C, T, H, W) latent per clip (one expert mix per row), in the model's own
latent space (process_latent_in: Wan's per-channel normalisation); Latent Band Energy and the
bake node's router mix, given the model, read a LATENT in that same space; 4-D image latents of a
5-D model (Qwen-Image) are given their frame axis as ComfyUI's sampler does.
"""
import json

import pytest
import torch

from comfy_host import TINY_CONTEXT, pack_module, patcher_of, setup_comfy
from native_models import adapter_for, conds, fixed_loss, latent_shape, native_model, run
from tiny_training import NODE_ARGS

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from fera_core.indicator import band_energies  # noqa: E402
from fera_core.trace import RoutingTrace  # noqa: E402

routing = pack_module("nodes.routing")
inspect_nodes = pack_module("nodes.inspect_nodes")


def clips(family="wan21_t2v", rows=2):
    """Clips whose channels have the offsets of a real Wan latent (the format's per-channel means)."""
    gen = torch.Generator().manual_seed(3)
    shape = latent_shape(family, rows)
    mean = torch.as_tensor(native_model(family).model.latent_format.latents_mean).reshape(1, -1, 1, 1, 1)
    return torch.randn(shape, generator=gen) * 0.5 + mean


def routed_energies(patcher, adapter, latent):
    """The band energies the router read at a one-step run with no noise (x = (1 - 1e-3) x0 in model space)."""
    trace = RoutingTrace()
    sampler = comfy.samplers.sampler_object("euler")
    comfy.sample.sample_custom(routing.apply_fera(patcher, adapter, 1.0, trace=trace), torch.zeros_like(latent), 1.0,
                               sampler, torch.tensor([1e-3, 0.0]), conds(1), conds(2), latent, disable_pbar=True, seed=0)
    comfy.model_management.unload_all_models()
    return torch.tensor([r["energies"] for r in trace.rows()])


def test_probe_reads_the_latent_where_the_router_does():
    """Given the model, Latent Band Energy reports what the router read; without it, the stored LATENT's
    energies, which Wan's per-channel normalisation makes differ (measured: by 0.2 of a share)."""
    patcher = native_model("wan21_t2v")
    adapter = adapter_for(patcher)
    latent = clips()
    seen = routed_energies(patcher, adapter, latent)
    text = inspect_nodes.FeRALatentBandEnergy.execute({"samples": latent}, 3, "partition", model=patcher).args[0]
    probe = torch.tensor(json.loads(text)["rows"])
    raw = band_energies(latent, 3, "partition")
    torch.testing.assert_close(probe, seen, rtol=1e-4, atol=1e-5)
    assert (raw - seen).abs().max() > 0.05


def test_clips_are_routed_per_clip_over_all_their_frames():
    """Each clip's row gets the energies of all its frames (the frames folded into channels): changing
    one frame of clip 0 changes clip 0's routing only."""
    patcher = native_model("wan21_t2v")
    adapter = adapter_for(patcher)
    latent = clips()
    changed = latent.clone()
    changed[0, :, 1] = torch.sign(changed[0, :, 1]) * 3  # a harsher last frame
    before, after = routed_energies(patcher, adapter, latent), routed_energies(patcher, adapter, changed)
    assert (before[0] - after[0]).abs().max() > 1e-3
    torch.testing.assert_close(before[1], after[1], rtol=0, atol=1e-6)


def test_image_latents_of_a_5d_model_are_probed_and_trained_as_the_sampler_gives_them():
    """Qwen-Image takes Wan-format 5-D latents; its sampler nodes give a 4-D image LATENT a frame axis
    (fix_empty_latent_channels): the probe and Train FeRA do the same."""
    patcher = native_model("qwen_image")
    adapter = adapter_for(patcher)
    image = clips("qwen_image")[:, :, 0]  # (B, C, H, W)
    seen = routed_energies(patcher, adapter, image[:, :, None])
    text = inspect_nodes.FeRALatentBandEnergy.execute({"samples": image}, 3, "partition", model=patcher).args[0]
    torch.testing.assert_close(torch.tensor(json.loads(text)["rows"]), seen, rtol=1e-4, atol=1e-5)
    training = pack_module("nodes.train_loop")
    with torch.inference_mode():
        _, losses = training.train(patcher, adapter, image, conds(7), training.TrainSettings(steps=2, batch_size=2))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("family", ["wan21_t2v", "wan21_i2v"])
def test_an_adapter_moves_between_variants_whose_layers_match(family):
    """A Wan 2.1 T2V adapter's layers all exist in I2V (which adds k_img/v_img): it applies there; the
    family is the same, so continuing its training there is not refused."""
    t2v = native_model("wan21_t2v")
    adapter = adapter_for(t2v, "attention")
    other = native_model(family)
    assert pack_module("nodes.train_nodes").continued_adapter(other.model, adapter, 0.1) is not adapter
    assert (run(routing.apply_fera(other, adapter, 1.0), family) - run(other, family)).abs().max() > 5e-3


def moving_clips(rows=2):
    """Wan 2.1 clips whose pattern moves from frame to frame, one spatial frequency per clip."""
    shape = latent_shape("wan21_t2v", rows)
    grid = torch.arange(shape[-1], dtype=torch.float32)
    return torch.stack([torch.stack([torch.sin(grid[:, None] / (3 + i) + grid[None, :] / 4 + frame).expand(shape[1], -1, -1)
                                     for frame in range(shape[2])], dim=1) for i in range(rows)]) * 2


def test_train_fera_takes_a_batch_of_clips_with_their_conditioning():
    """Train FeRA as ComfyUI calls it on a video VAE's output (one 5-D LATENT per clip, one conditioning per
    clip, every input a list): it trains 2 whole clips, and the loss on 8 fixed draws falls by 3% or more
    after 20 steps of 3e-2 (as the per-family check; measured on 0.33.0: see the assertion message)."""
    train_nodes = pack_module("nodes.train_nodes")
    with torch.inference_mode():
        patcher = native_model("wan21_t2v")
    lat = moving_clips()
    pos = conds(7) + conds(8)
    args = NODE_ARGS | dict(steps=20, learning_rate=3e-2, layers="attention + feed-forward", gradient_checkpointing=True)
    with torch.inference_mode():
        out = train_nodes.TrainFeRA.execute([patcher], [{"samples": lat[:1]}, {"samples": lat[1:]}],
                                            [pos[:1], pos[1:]], **{k: [v] for k, v in args.items()})
    comfy.model_management.unload_all_models()
    trained = out.args[1]
    assert trained.training_settings["images"] == 2
    start = train_nodes.new_adapter(patcher.model, args["layers"], args["rank"], args["alpha"], args["experts"],
                                    args["bands"], args["tau"], args["indicator"], args["fecl_weight"], args["seed"])
    before, after = fixed_loss(patcher, start, lat, pos), fixed_loss(patcher, trained, lat, pos)
    assert after < 0.97 * before, (before, after)


def ltx2_model():
    """A tiny LTX-2 (ComfyUI's LTXAV: video and audio streams in one model); skips on a host without it."""
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "LTXAV"):
        pytest.skip("this ComfyUI has no LTXAV (LTX-2) model class")
    return patcher_of(comfy.supported_models.LTXAV(dict(
        image_model="ltxav", in_channels=128, audio_in_channels=128, cross_attention_dim=64, audio_cross_attention_dim=32,
        attention_head_dim=32, audio_attention_head_dim=16, num_attention_heads=2, audio_num_attention_heads=2,
        caption_channels=TINY_CONTEXT, num_layers=1, connector_attention_head_dim=16, connector_num_attention_heads=2,
        connector_num_layers=1)))


def test_packed_audio_video_latents_are_routed_on_the_video_stream():
    """LTX-2's sampler packs the nested (video, audio) latent into one (B, 1, N) tensor; the router unpacks
    it with ComfyUI's helper and reads the video clip: the energies it records are the video part's (in
    model space at sigma ~ 0), a harsher audio stream leaves them as they were, and Latent Band Energy given
    the model reads the nested LATENT's video part alike; the adapter acts on both streams' layers and
    strength 0 is the base model bit for bit."""
    patcher = ltx2_model()
    import comfy.nested_tensor  # 0.33 on
    adapter = adapter_for(patcher, "attention")
    gen = torch.Generator().manual_seed(5)
    video, audio = torch.randn(2, 128, 2, 4, 4, generator=gen), torch.randn(2, 8, 5, 16, generator=gen)

    def sample(model, audio, sigmas=(1e-3, 0.0)):
        cond = [[torch.randn(1, 7, 2 * TINY_CONTEXT, generator=torch.Generator().manual_seed(1)),
                 {"attention_mask": torch.ones(1, 7, dtype=torch.long)}]]
        latent = comfy.nested_tensor.NestedTensor([video, audio])
        noise = comfy.nested_tensor.NestedTensor([torch.zeros_like(video), torch.zeros_like(audio)])
        out = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"),
                                         torch.tensor(sigmas), cond, cond, latent, disable_pbar=True, seed=0)
        comfy.model_management.unload_all_models()
        return torch.cat([part.flatten(1) for part in out.unbind()], 1)

    def routed(audio):
        trace = RoutingTrace()
        sample(routing.apply_fera(patcher, adapter, 1.0, trace=trace), audio)
        return torch.tensor([r["energies"] for r in trace.rows()])

    want = band_energies(patcher.model.process_latent_in(video), 3, "partition")
    seen = routed(audio)
    torch.testing.assert_close(seen, want.repeat(len(seen) // 2, 1), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(routed(torch.sign(audio) * 3), seen, rtol=0, atol=1e-6)
    nested = {"samples": comfy.nested_tensor.NestedTensor([video, audio])}  # the LATENT the sampler gives
    text = inspect_nodes.FeRALatentBandEnergy.execute(nested, 3, "partition", model=patcher).args[0]
    torch.testing.assert_close(torch.tensor(json.loads(text)["rows"]), want, rtol=1e-4, atol=1e-5)
    plain = sample(patcher, audio, (1.0, 0.5, 0.0))
    assert torch.equal(sample(routing.apply_fera(patcher, adapter, 0.0), audio, (1.0, 0.5, 0.0)), plain)
    assert (sample(routing.apply_fera(patcher, adapter, 1.0), audio, (1.0, 0.5, 0.0)) - plain).abs().max() > 5e-3
