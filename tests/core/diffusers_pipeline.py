"""Tiny SD1.5-, SDXL- and SD3-layout diffusers pipelines with random weights and a local CLIP tokenizer (no hub),
and a folder of captioned images, for the trainer's tests."""
import json
from pathlib import Path

import numpy as np
import torch

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
WORDS = ("red", "blue", "green", "disc", "square", "stripes", "soft")


def tokenizer(folder: Path):
    """A CLIPTokenizer over single letters (no merges), built from files written here."""
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def make_pipeline(root: Path, scheduler: str = "DDPMScheduler", prediction_type: str = "epsilon") -> Path:
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    vae = _vae()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1))
    kwargs = {} if scheduler.startswith("FlowMatch") else dict(SD_BETAS, prediction_type=prediction_type,
                                                                 steps_offset=1, clip_sample=False)
    sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, **kwargs)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer(root / "_tok"), unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(root))
    return root


def make_sdxl(root: Path) -> Path:
    """SDXL layout: two CLIP encoders (the second with a projection: pooled embeds) and text_time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64,
                                norm_num_groups=8)
    text_config = dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**text_config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)), tokenizer=tokenizer(root / "_tok"),
        tokenizer_2=tokenizer(root / "_tok2"), unet=unet,
        scheduler=EulerDiscreteScheduler(prediction_type="epsilon", **SD_BETAS))
    pipe.save_pretrained(str(root))
    return root


def make_sd3(root: Path, shift: float = 3.0) -> Path:
    """SD3 layout without T5 (its part of the prompt embedding is zeros, as diffusers does without it)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    text_config = dict(vocab_size=54, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=_vae(shift_factor=0.06),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)), tokenizer=tokenizer(root / "_tok"),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config)), tokenizer_2=tokenizer(root / "_tok2"),
        text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(root))
    return root


def _vae(**extra):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=8, sample_size=16, **extra)


def make_images(folder: Path, n: int = 6, size: int = 16) -> Path:
    """Striped squares: a pattern a random UNet does not produce, so the loss has room to fall."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
        img[4:12, 4:12] = (np.arange(8)[None, :, None] // 2 % 2) * 255
        Image.fromarray(img).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(" ".join(rng.choice(WORDS, 3)))
    return folder
