"""Tiny Stable Diffusion 1.5- and SDXL-shaped diffusers pipelines with random weights, built offline.

    dmd2 tiny-pipeline sd15 models/sd-tiny/pipeline
    dmd2 tiny-pipeline sdxl models/sdxl-tiny/pipeline

They have the real pipelines' components and wiring (a `UNet2DConditionModel` with cross-attention, an
`AutoencoderKL`, CLIP text encoders with CLIP's own tokenizer, the original schedulers) at a few thousand
parameters, in the sizes diffusers' own tests use. They exist so that the text-to-image path (prompt encoding,
latents, the exported student pipeline) runs end to end on a laptop or in CI without downloading gigabytes; their
images are noise. The tokenizer is CLIP's BPE rebuilt from open_clip's file (`dmd2.text`), cut to the tiny text
models' 1,000-token vocabulary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dmd2.text import END, clip_tokenizer

TINY_VOCAB = 1000
KINDS = ("sd15", "sdxl")


def _text_config(hidden: int, intermediate: int, heads: int, layers: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    end = TINY_VOCAB - 1  # the tiny tokenizer's start/end tokens take the last two ids
    extra = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                          num_hidden_layers=layers, vocab_size=TINY_VOCAB, bos_token_id=end - 1, eos_token_id=end,
                          pad_token_id=end, max_position_embeddings=77, **extra)


def _tokenizer(pad_token: str = END):
    """CLIP's tokenizer cut to the tiny vocabulary (it reads its files once; the pipeline saves its own copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        return clip_tokenizer(tmp, TINY_VOCAB, pad_token)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2)


def tiny_sd15(out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """A random SD1.5-shaped pipeline (ε-prediction, scaled-linear DDIM schedule, 4-channel latents at 1/2 of the
    resolution: the tiny VAE has two blocks) saved with `save_pretrained` into `out_dir`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=resolution // 2,
                                in_channels=4, out_channels=4, cross_attention_dim=8, norm_num_groups=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # SD1.5's own scheduler offset
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(8, 16, 2, 2)),
                                   tokenizer=_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_sdxl(out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """A random SDXL-shaped pipeline: two CLIP text encoders (the second with a projection, whose pooled output and
    the resolution's `time_ids` feed the UNet's `text_time` embedding), Euler discrete schedule."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(2, 4), layers_per_block=2, sample_size=resolution // 2,
                                in_channels=4, out_channels=4, attention_head_dim=(2, 4), use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    text = _text_config(32, 37, 4, 5, projection_dim=32)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(text), text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer(pad_token="!"), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_pipeline(kind: str, out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    if kind not in KINDS:
        raise ValueError(f"tiny pipeline kind {kind!r} is not one of {', '.join(KINDS)}")
    return (tiny_sd15 if kind == "sd15" else tiny_sdxl)(out_dir, resolution, seed)
