"""Tiny Stable Diffusion 1.5-, SDXL-, SD3- and Flux-shaped diffusers pipelines with random weights, built offline.

    dmd2 tiny-pipeline sd15 models/sd-tiny/pipeline
    dmd2 tiny-pipeline sdxl models/sdxl-tiny/pipeline
    dmd2 tiny-pipeline sd3 models/sd3-tiny/pipeline
    dmd2 tiny-pipeline flux models/flux-tiny/pipeline

They have the real pipelines' components and wiring (a `UNet2DConditionModel` with cross-attention, an
`AutoencoderKL`, CLIP text encoders with CLIP's own tokenizer, the original schedulers) at a few thousand
parameters, in the sizes diffusers' own tests use. They exist so that the text-to-image path (prompt encoding,
latents, the exported student pipeline) runs end to end on a laptop or in CI without downloading gigabytes; their
images are noise. The tokenizer is CLIP's BPE rebuilt from open_clip's file (`dmd2.text`), cut to the tiny text
models' 1,000-token vocabulary. SD3 and Flux add a T5 encoder, whose tokenizer is the tiny one `dmd2.text.t5_tokenizer`
makes (T5's SentencePiece file is not reachable offline), and a 16-channel VAE with a shift factor.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from dmd2.text import END, clip_tokenizer

TINY_VOCAB = 1000
KINDS = ("sd15", "sdxl", "sd3", "flux")
T5_TOKENS = 32  # the tiny T5 tokenizer's model_max_length: the text length the tiny pipelines read


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


def _vae(latent_channels: int = 4, **flow_vae):
    """A two-block VAE (latents at 1/2 of the resolution); SD3's and Flux's have 16 channels, a shift factor and
    no quant convolutions."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, **flow_vae)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    from dmd2.text import t5_tokenizer

    config = T5Config(vocab_size=TINY_VOCAB, d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config), t5_tokenizer(TINY_VOCAB, T5_TOKENS)


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


def tiny_sd3(out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """A random SD3-shaped pipeline: an MM-DiT (`SD3Transformer2DModel`, 2×2 patches, four joint blocks) on
    16-channel latents, two projected CLIP text encoders (their penultimate states, side by side, padded to T5's
    width and followed by T5's states, are the context; their pooled projections, concatenated, the pooled input)
    and a T5 encoder, SD3's flow-matching scheduler (static shift 3). The VAE's scaling and shift factors are SD3's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=resolution // 2, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=4, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64,
                                        pos_embed_max_size=resolution // 2)
    text = _text_config(16, 37, 4, 2, projection_dim=32)  # two of 16 wide: 32 = T5's width, no padding needed
    t5, t5_tokenizer = _t5(32)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModelWithProjection(text), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=_tokenizer(pad_token="!"),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def tiny_flux(out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """A random Flux-shaped pipeline: `FluxTransformer2DModel` (two double-stream and two single-stream blocks) on
    16-channel latents packed into 2×2 patches, with the guidance embedding of a guidance-distilled model (as
    FLUX.1-dev); a CLIP text encoder (its pooled output) and T5 (the context); Flux's resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    t5, t5_tokenizer = _t5(32)
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler,
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=CLIPTextModel(_text_config(32, 37, 4, 2)), tokenizer=_tokenizer(),
        text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


BUILDERS = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


def tiny_pipeline(kind: str, out_dir: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    if kind not in KINDS:
        raise ValueError(f"tiny pipeline kind {kind!r} is not one of {', '.join(KINDS)}")
    return BUILDERS[kind](out_dir, resolution, seed)
