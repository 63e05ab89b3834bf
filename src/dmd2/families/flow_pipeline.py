"""Text-to-image rectified-flow pipelines (SD3/SD3.5- and Flux-shaped): the flow family's formulas (`dmd2.families.flow`)
on a diffusers pipeline's transformer, with the Stable Diffusion family's text-to-image plumbing (prompts from the
data stage, VAE latents as samples, a diffusers pipeline as the export).

- **SD3** (`StableDiffusion3Pipeline`, `SD3Transformer2DModel`): the context is both CLIP encoders' penultimate
  states side by side, padded to T5's width, followed by T5's states; the pooled input is both CLIP projections
  concatenated; the unconditional branch is the empty prompt's encoding (the pipeline's negative prompt). The
  static shift is the pipeline scheduler's (3.0).
- **Flux** (`FluxPipeline`, `FluxTransformer2DModel`): the pooled input is CLIP's, the context T5's; latents are
  packed into 2×2 patches for the transformer (the family's samples stay C×H×W, packed around each call); the
  shift depends on the image's token count. FLUX.1-dev is guidance-distilled: guidance is an input embedding and
  there is no unconditional branch. The generator and the critic always receive `teacher.embedded_guidance` (3.5,
  as FLUX.1-dev's default and NVIDIA FastGen's DMD2 recipe); the DM loss's teacher receives
  `distill.real_guidance_scale` in its place when that is not 1, and the teacher's sampler its guidance_scale.

Prompts are encoded by the pipeline's own `encode_prompt`, so the conditions are the pipeline's. The
GAN head reads the image tokens after the middle block (double- and single-stream blocks counted together for
Flux); the later blocks never run. LoRA adapts the attention and feed-forward projections of every block.
The student exports as the teacher's pipeline with its transformer and a `FlowMatchLCMScheduler` (shift 1; the
student's times passed as `sigmas`), which re-noises with fresh noise between steps as the few-step sampler does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from dmd2.config import Strict, to_dict
from dmd2.families.base import Family, ModelError
from dmd2.families.diffusers import check_reference, pretrained_architecture, pretrained_reference
from dmd2.families.flow import FlowFamily, FlowSamplerConfig
from dmd2.families.stable_diffusion import (
    StableDiffusionFamily,
    pipeline_kind,
    pipeline_resolution,
    pipeline_root,
    vae_downsampling,
)

PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
# The published pipelines by hub id → the copy of their config files in ARCHITECTURES (`architecture_config`)
PUBLISHED = {"stabilityai/stable-diffusion-3.5-large": "stable-diffusion-3.5-large",
             "black-forest-labs/FLUX.1-dev": "FLUX.1-dev"}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
FLUX_DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default_sample_size: 1024 px through FLUX.1's VAE
# The attention and feed-forward projections of the joint blocks (the targets of diffusers' SD3 and Flux LoRA
# training scripts), and the MLP input of Flux's single-stream blocks
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")


class FlowPipelineTeacherConfig(Strict):
    """`family: flow_pipeline`: a text-to-image rectified-flow pipeline (SD3/SD3.5 or Flux, or a tiny one of the same
    shape) read from a local diffusers pipeline directory or a hub id; never trained here."""

    family: Literal["flow_pipeline"] = "flow_pipeline"
    source: Literal["pretrained"] = "pretrained"
    pretrained: str = Field(description="a local diffusers pipeline directory, a hub id already in the local hub "
                            "cache when offline (stabilityai/stable-diffusion-3.5-large, black-forest-labs/FLUX.1-dev), "
                            "or tiny:sd3 / tiny:flux (a tiny random pipeline of that shape, built offline)")
    resolution: int | None = Field(None, ge=16, description="the image size to distil at (null: SD3's transformer "
                                   "sample size; Flux's pipeline default, 1024 px)")
    max_sequence_length: int = Field(256, ge=1, description="T5 tokens per prompt (the pipelines' own default: SD3 "
                                     "256, FLUX.1-dev 512)")
    embedded_guidance: float = Field(3.5, ge=0, description="a guidance-embedding transformer (FLUX.1-dev): the "
                                     "guidance value the generator and the critic receive")
    sampler: FlowSamplerConfig = Field(default_factory=FlowSamplerConfig)


def flow_pipeline(cfg: FlowPipelineTeacherConfig, root: Path = Path("."),
                  path: Path | None = None) -> tuple[Path, str, int]:
    """The teacher's pipeline directory (`path`, else where `teacher.pretrained` resolves), its kind ("sd3" or
    "flux") and the image size distilled at."""
    path = path or pipeline_root(cfg.pretrained, root)
    kind = pipeline_kind(path, PIPELINES, "SD1.5 and SDXL pipelines: teacher.family stable_diffusion")
    down = vae_downsampling(path)
    if cfg.resolution is not None:
        size = cfg.resolution
    elif kind == "sd3":
        size = pipeline_resolution(path, "transformer")
    else:
        size = FLUX_DEFAULT_LATENT_SIZE * down
    if size % (2 * down):
        raise ModelError(f"teacher.resolution {size} is not a multiple of {2 * down}: the transformer reads 2×2 "
                         f"patches of latents that are 1/{down} of the image")
    return path, kind, size


def architecture(cfg: FlowPipelineTeacherConfig, root: Path = Path("."), path: Path | None = None) -> dict[str, Any]:
    """The teacher's config.json without its weights' reference: from the pipeline's config files alone (those at
    `path`, else the teacher's)."""
    path, kind, size = flow_pipeline(cfg, root, path)
    transformer, scheduler = pretrained_architecture(path, "transformer")
    vae = json.loads((path / "vae" / "config.json").read_text())
    latent = size // vae_downsampling(path)
    dynamic = bool(scheduler.get("use_dynamic_shifting"))
    schedule = {"num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
                "shift": float(scheduler.get("shift", 1.0)),
                "resolution_shift": {"base_shift": scheduler["base_shift"], "max_shift": scheduler["max_shift"],
                                     "base_seq_len": scheduler["base_image_seq_len"],
                                     "max_seq_len": scheduler["max_image_seq_len"]} if dynamic else None}
    return {"family": "flow_pipeline", "kind": "teacher", "unet_class": TRANSFORMERS[kind], "unet": transformer,
            "schedule": schedule, "num_classes": 0, "null_class": None, "sampler": to_dict(cfg.sampler),
            "text": {"max_sequence_length": cfg.max_sequence_length, "embedded_guidance": cfg.embedded_guidance},
            "pipeline": {"path": str(path), "kind": kind, "resolution": size,
                         "latent_shape": [int(vae["latent_channels"]), latent, latent]}}


def teacher_config(cfg: FlowPipelineTeacherConfig, root: Path = Path(".")) -> dict[str, Any]:
    """`architecture`, plus the transformer's weight files by size and hash (the teacher is recorded by reference)."""
    config = architecture(cfg, root)
    return {**config, "pretrained": pretrained_reference(Path(config["pipeline"]["path"]), "transformer")}


class PipelinePrompts:
    """Prompts → the transformer's conditions, by the pipeline's own `encode_prompt` (its text encoders frozen)."""

    def __init__(self, path: Path, kind: str, max_sequence_length: int, guidance: float | None):
        from diffusers import DiffusionPipeline

        self.kind, self.max_sequence_length, self.guidance = kind, max_sequence_length, guidance
        self.pipe = DiffusionPipeline.from_pretrained(path, transformer=None, vae=None)
        self.text_encoders = [getattr(self.pipe, name).requires_grad_(False).eval()
                              for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
                              if getattr(self.pipe, name, None) is not None]
        self._empty: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PipelinePrompts:
        for encoder in self.text_encoders:
            encoder.to(device, dtype)
        self._empty = None
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        device = device or next(self.text_encoders[0].parameters()).device
        if self.kind == "sd3":
            states, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
        else:
            states, pooled, _ = self.pipe.encode_prompt(prompts, None, device=device,
                                                        max_sequence_length=self.max_sequence_length)
        cond = {"encoder_hidden_states": states.float(), "pooled_projections": pooled.float()}
        if self.guidance is not None:
            cond["guidance"] = torch.full((len(prompts),), self.guidance, device=device)
        return cond

    def unconditional(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The empty prompt's encoding, as SD3's pipeline makes its negative branch."""
        states = cond["encoder_hidden_states"]
        if self._empty is None or self._empty["encoder_hidden_states"].device != states.device:
            self._empty = self([""], states.device)
        return {key: value.expand(len(states), *value.shape[1:]) for key, value in self._empty.items()}


class FlowPipelineFamily(StableDiffusionFamily, FlowFamily):
    """Text-to-image rectified flow (SD3/SD3.5, Flux): prompts in, VAE latents out. Where both bases define a
    method, Stable Diffusion's is the one: the teacher is a recorded pipeline, never trained (`teacher_config`,
    `import_teacher`, `teacher_loss`); the flow's formulas come from `FlowFamily`, which Stable Diffusion does not
    define (its noise and sampler are `DiffusersFamily`'s, after `FlowFamily` in the resolution order)."""

    schema = FlowPipelineTeacherConfig  # its `teacher:` block in params.yaml
    name, sampler_name = "flow_pipeline", "Euler"
    lora_targets = LORA_TARGETS
    published = PUBLISHED
    recorded_config = staticmethod(teacher_config)

    @staticmethod
    def pipeline_architecture(cfg, path):
        return architecture(cfg, path=path)

    @classmethod
    def text_pipeline(cls, teacher_cfg, root):
        path, _, size = flow_pipeline(teacher_cfg, root)
        return path, size

    def __init__(self, config: dict[str, Any]):
        FlowFamily.__init__(self, config)  # the flow's time table (its shift needs `sample_shape`, below)
        self._start_text_to_image()

    @property
    def kind(self) -> str:
        return self.config["pipeline"]["kind"]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config["pipeline"]["latent_shape"])

    @property
    def is_transformer(self) -> bool:
        return True

    @property
    def embeds_guidance(self) -> bool:
        return bool(self.config["unet"].get("guidance_embeds"))

    # ------------------------------------------------------------------------------------------ network

    def _transformer_class(self) -> type[nn.Module]:
        import diffusers

        name = self.config["unet_class"]
        if name not in TRANSFORMERS.values():
            raise ModelError(f"unet_class {name!r} is not one of {', '.join(TRANSFORMERS.values())}")
        return getattr(diffusers, name)

    def build_network(self) -> nn.Module:
        return self._transformer_class().from_config(self.config["unet"])

    def load_network(self, model_dir: Path) -> nn.Module:
        ref = self.config.get("pretrained")
        if ref is None:  # a student: its own weights
            return Family.load_network(self, model_dir)
        check_reference(ref)
        return self._transformer_class().from_pretrained(ref["path"], subfolder=ref.get("subfolder"))

    # ---------------------------------------------------------------------------------------- prompts

    def new_prompt_encoder(self) -> PipelinePrompts:
        text = self.config["text"]
        guidance = text["embedded_guidance"] if self.embeds_guidance else None
        return PipelinePrompts(self.pipeline_path, self.kind, text["max_sequence_length"], guidance)

    def guided(self, denoise, cond, guidance_scale):
        """Two-branch classifier-free guidance (SD3); a guidance-embedding transformer (Flux-dev) instead receives
        `guidance_scale` as its guidance input in one call (scale 1, "no guidance", keeps the conditions' own:
        teacher.embedded_guidance)."""
        if not self.embeds_guidance or cond is None:
            return super().guided(denoise, cond, guidance_scale)
        if guidance_scale == 1.0:
            return denoise(cond)
        return denoise({**cond, "guidance": torch.full_like(cond["guidance"], guidance_scale)})

    def memory_conditions(self, n: int) -> dict[str, torch.Tensor]:
        # the shapes PipelinePrompts gives: SD3 reads 77 CLIP tokens then the T5 tokens
        net, tokens = self.config["unet"], self.config["text"]["max_sequence_length"]
        context = tokens + (77 if self.kind == "sd3" else 0)
        cond = {"encoder_hidden_states": torch.zeros(n, context, net["joint_attention_dim"]),
                "pooled_projections": torch.zeros(n, net["pooled_projection_dim"])}
        if self.embeds_guidance:
            cond["guidance"] = torch.zeros(n)
        return cond

    # -------------------------------------------------------------------------------------- predictions

    def velocity(self, net, x_t, time, cond):
        if cond is None:
            raise ModelError("a text-to-image model needs prompts as its conditions (got none)")
        n = len(x_t)
        if self.kind == "sd3":
            timestep = (time * self.num_train_timesteps).to(x_t.dtype).expand(n)  # as the SD3 pipeline gives it
            return net(x_t, timestep=timestep, encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"]).sample.float()
        from diffusers import FluxPipeline

        # Flux: 2×2 latent patches as tokens with their (0, row, column) ids; time in [0, 1] (the transformer
        # scales it and the guidance by 1000 itself)
        channels, height, width = x_t.shape[1:]
        tokens = FluxPipeline._pack_latents(x_t, n, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, x_t.device, x_t.dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = net(hidden_states=tokens, timestep=time.to(x_t.dtype).expand(n), guidance=cond.get("guidance"),
                  pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
                  txt_ids=text_ids, img_ids=image_ids).sample
        return FluxPipeline._unpack_latents(out, height, width, 1).float()  # sizes in latents: a factor of 1

    def draw_noise(self, shape, generator):
        """Flux's pipeline draws its re-noising noise in 2×2-patch tokens: the same numbers, unpacked."""
        if self.kind != "flux":
            return super().draw_noise(shape, generator)
        from diffusers import FluxPipeline

        n, channels, height, width = shape
        tokens = torch.randn((n, (height // 2) * (width // 2), channels * 4), generator=generator)
        return FluxPipeline._unpack_latents(tokens, height, width, 1)

    @property
    def gan_block(self) -> int:
        """The middle block of all (joint, then Flux's single-stream), counting from 0: the first half runs."""
        net = self.config["unet"]
        return max((net["num_layers"] + net.get("num_single_layers", 0)) // 2 - 1, 0)

    @property
    def gan_feature_shape(self) -> tuple[int, int]:
        _, height, width = self.sample_shape
        net = self.config["unet"]
        return ((height // 2) * (width // 2), net["num_attention_heads"] * net["attention_head_dim"])

    def teacher_nfe(self, num_steps: int) -> int:
        two_branches = not self.embeds_guidance and self.default_guidance_scale != 1.0
        return num_steps * (2 if two_branches else 1)

    # ------------------------------------------------------------------------------------------- export

    def export_student(self, student, student_dir, out_dir):
        """The teacher's pipeline with the student's transformer and a FlowMatchLCMScheduler (shift 1: the student's
        times go in as they are, as `sigmas`); a LoRA student's adapters also alone."""
        from diffusers import DiffusionPipeline, FlowMatchLCMScheduler

        scheduler = FlowMatchLCMScheduler(num_train_timesteps=self.num_train_timesteps, shift=1.0)
        pipeline = DiffusionPipeline.from_pretrained(self.pipeline_path, transformer=student.net, scheduler=scheduler)
        pipeline.save_pretrained(out_dir)
        lora = student.config["generator"].get("lora")
        if lora:
            from safetensors.torch import load_file

            from dmd2.families.diffusers import lora_config

            type(pipeline).save_lora_weights(
                str(out_dir), transformer_lora_layers=load_file(Path(student_dir) / lora["file"]),
                safe_serialization=True,
                transformer_lora_adapter_metadata=lora_config(lora["rank"], lora["alpha"], self.lora_targets))
        size = self.resolution
        usage = {"num_inference_steps": len(student.timesteps),
                 "sigmas": [float(self.times[t]) for t in student.timesteps],
                 "guidance_scale": self.config["text"]["embedded_guidance"] if self.embeds_guidance else 0.0,
                 "max_sequence_length": self.config["text"]["max_sequence_length"], "height": size, "width": size}
        # SD3's and Flux's pipelines give their scheduler no generator: between steps it draws from torch's global one
        renoise = "torch.manual_seed(seed + 1) before the call reproduces `dmd2 generate --seed seed`"
        return {"call": usage, "teacher_pipeline": str(self.pipeline_path), "renoise": renoise}
