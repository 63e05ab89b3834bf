"""Stable Diffusion 1.5 and SDXL pieces of the diffusers family: prompts → the UNet's conditions, and the latent
space (images ↔ VAE latents), computed as diffusers' own pipelines compute them, from a local pipeline directory.

SD1.5 conditions the UNet on the CLIP text model's last hidden state; its unconditional branch is the encoding
of the empty prompt. SDXL concatenates both text encoders' penultimate hidden states, takes the pooled
(projected) embedding of the second, and adds `time_ids` = (height, width, 0, 0, height, width): original size,
crop corner, target size; its unconditional branch is zeros, as in the original DMD2 and diffusers'
`force_zeros_for_empty_prompt`. Latents are the VAE's `latent_dist` sample × `scaling_factor` (the SDXL VAE
overflows in float16, so it runs in float32).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmd2.families.base import ModelError

PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


def pipeline_kind(path: str | Path) -> str:
    """The kind of pipeline at `path`, "sd15" or "sdxl", from its model_index.json."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise ModelError(f"{index} cannot be read ({type(err).__name__}): {path} is not a diffusers pipeline "
                         "directory") from None
    if name not in PIPELINES:
        raise ModelError(f"{index} names {name}; text-to-image distillation supports {', '.join(PIPELINES)}")
    return PIPELINES[name]


class PromptEncoder:
    """Prompts → the keyword arguments `UNet2DConditionModel` takes, with frozen text encoders."""

    def __init__(self, kind: str, tokenizers: list, text_encoders: list[nn.Module], resolution: tuple[int, int]):
        if kind not in PIPELINES.values():
            raise ModelError(f"prompt encoder kind {kind!r} is not one of {', '.join(PIPELINES.values())}")
        self.kind, self.tokenizers, self.resolution = kind, tokenizers, resolution
        self.text_encoders = [enc.requires_grad_(False).eval() for enc in text_encoders]
        self._empty: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_pipeline(cls, path: str | Path, resolution: tuple[int, int]) -> PromptEncoder:
        """The tokenizers and text encoders of the local pipeline at `path` (nothing is fetched)."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path, kind = Path(path), pipeline_kind(path)
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)]
        encoders: list[nn.Module] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                                   local_files_only=True)]
        if kind == "sdxl":
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                        local_files_only=True))
        return cls(kind, tokenizers, encoders, resolution)

    def to(self, device: torch.device | str) -> PromptEncoder:
        self.text_encoders = [enc.to(device) for enc in self.text_encoders]
        self._empty = None
        return self

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str | None = None) -> dict[str, Any]:
        device = device or next(self.text_encoders[0].parameters()).device
        if self.kind == "sd15":
            ids = self._ids(self.tokenizers[0], prompts).to(device)
            return {"encoder_hidden_states": self.text_encoders[0](ids)[0]}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(self._ids(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        height, width = self.resolution
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=device)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}}

    def unconditional(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The classifier-free-guidance branch for a batch of encoded conditions."""
        states = cond["encoder_hidden_states"]
        if self.kind == "sdxl":
            added = cond["added_cond_kwargs"]
            return {"encoder_hidden_states": torch.zeros_like(states),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(added["text_embeds"]),
                                          "time_ids": added["time_ids"]}}
        if self._empty is None or self._empty["encoder_hidden_states"].device != states.device:
            self._empty = self([""], states.device)
        return {"encoder_hidden_states": self._empty["encoder_hidden_states"].expand_as(states).to(states.dtype)}


class LatentCodec:
    """Images in [-1, 1] ↔ the UNet's latents (VAE latents × `scaling_factor`)."""

    def __init__(self, vae: nn.Module):
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def from_pipeline(cls, path: str | Path) -> LatentCodec:
        from diffusers import AutoencoderKL

        # float32 whatever the pipeline's dtype: the SDXL VAE overflows in float16
        return cls(AutoencoderKL.from_pretrained(Path(path), subfolder="vae", torch_dtype=torch.float32))

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // self.downsampling
        return (int(self.vae.config.latent_channels), size, size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels → latents: a sample of the VAE's posterior (as the original's data stage), scaled."""
        dist = self.vae.encode(images.float()).latent_dist
        return dist.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [-1, 1] (not clamped)."""
        return self.vae.decode(latents.float() / self.scaling_factor).sample


# -------------------------------------------------------------------------------------------------- LoRA

# The SDXL LoRA recipe's target modules: attention projections, the transformer blocks' in/out projections and
# feed-forward, the ResNet convolutions and shortcuts, the down/up-samplers and the time-embedding projections.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def add_lora(unet: nn.Module, rank: int = 64, alpha: float = 8, targets: tuple[str, ...] = LORA_TARGETS) -> nn.Module:
    """Attach a LoRA adapter (peft, through diffusers' `add_adapter`) and freeze everything else: only the
    adapter's weights train. It starts as the identity (peft zero-initialises the up projections)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    return unet


def lora_weights(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's key names (`…to_q.lora_A.weight`), which `load_lora_weights` reads
    (diffusers' older `lora.down` names would leave the attention projections unloaded)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def save_lora(pipeline_dir: str | Path, unet: nn.Module, out_dir: str | Path) -> Path:
    """Write the UNet's adapter as `pytorch_lora_weights.safetensors` in `out_dir`, loadable with
    `DiffusionPipeline.from_pretrained(pipeline_dir).load_lora_weights(out_dir)`."""
    import diffusers

    pipeline_class = getattr(diffusers, json.loads((Path(pipeline_dir) / "model_index.json").read_text())["_class_name"])
    # the adapter's config (rank, alpha, targets) travels in the file's metadata: without it a loader assumes
    # alpha = rank, which rescales the adapter
    pipeline_class.save_lora_weights(str(out_dir), unet_lora_layers=lora_weights(unet), safe_serialization=True,
                                     unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(out_dir) / "pytorch_lora_weights.safetensors"
