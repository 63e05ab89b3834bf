"""Stable Diffusion 1.5 and SDXL pieces of the diffusers family: prompts → the UNet's conditions, and the latent
space (images ↔ VAE latents), computed as diffusers' own pipelines compute them, from a local pipeline directory.

SD1.5 conditions the UNet on the CLIP text model's last hidden state; its unconditional branch is the encoding
of the empty prompt. SDXL concatenates both text encoders' penultimate hidden states, takes the pooled
(projected) embedding of the second, and adds `time_ids` = (height, width, 0, 0, height, width): original size,
crop corner, target size; its unconditional branch is zeros, as in the original DMD2 and diffusers'
`force_zeros_for_empty_prompt`. Latents are the VAE's `latent_dist` sample × `scaling_factor` (the SDXL VAE
overflows in float16, so it runs in float32).

`StableDiffusionFamily` puts these behind the family interface: it is the diffusers family (ε/v-prediction over
`alphas_cumprod`, DDIM, the GAN head on the UNet's mid-block) with prompts as raw conditions, VAE latents as
samples and the pipeline's VAE as the decoder. Its prompts come from the data stage (`use_data`): the training
prompts LMDB for the generator, the held-out captions for evaluation and sample grids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from dmd2.atomic import replace_directory
from dmd2.config import Strict, to_dict
from dmd2.families.base import ARCHITECTURES, ModelError
from dmd2.families.diffusers import (
    DiffusersFamily,
    lora_config,
    lora_weights,
    pretrained_architecture,
    pretrained_reference,
    resolve_pretrained,
)

PIPELINES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl"}


SD3_AND_FLUX = "SD3 and Flux pipelines: teacher.family flow_pipeline"


def pipeline_kind(path: str | Path, kinds: dict[str, str] = PIPELINES, others: str = SD3_AND_FLUX) -> str:
    """The kind of pipeline at `path`, "sd15" or "sdxl" (or another of `kinds`: class name → kind), from its
    model_index.json; `others` says which family reads other pipelines."""
    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:  # TypeError: a list, not an object
        raise ModelError(f"{index} cannot be read ({type(err).__name__}): {path} is not a diffusers pipeline "
                         "directory") from None
    if name not in kinds:
        raise ModelError(f"{index} names {name}; this teacher family reads {', '.join(kinds)} ({others})")
    return kinds[name]


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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEncoder:
        """Move the text encoders (and, with `dtype`, keep their weights in it: bf16 halves SDXL's 3.3 GB of them;
        the encodings still come out in float32)."""
        self.text_encoders = [enc.to(device, dtype) for enc in self.text_encoders]
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
            return {"encoder_hidden_states": self.text_encoders[0](ids)[0].float()}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(self._ids(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the second encoder's projected pooled embedding
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
    """Images in [-1, 1] ↔ the denoiser's latents: (VAE latents − `shift_factor`) × `scaling_factor`, the shift
    factor 0 where the VAE has none (SD1.5, SDXL; SD3's and Flux's have one)."""

    def __init__(self, vae: nn.Module):
        self.vae = vae.requires_grad_(False).eval()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

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
        return (dist.sample(generator=generator) - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → pixels in [-1, 1] (not clamped)."""
        return self.differentiable_decode(latents)

    def differentiable_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`decode` with gradients (the regression's LPIPS loss reaches the generator through it)."""
        return self.vae.decode(latents.float() / self.scaling_factor + self.shift_factor).sample


# ------------------------------------------------------------------------------ params.yaml's teacher block


class TextSamplerConfig(Strict):
    num_steps: int = Field(50, ge=1, description="deterministic DDIM steps of the teacher's own sampler (NFE = n, "
                           "2n with guidance)")
    guidance_scale: float = Field(1.0, ge=0, le=100, description="classifier-free guidance of the teacher's own "
                                  "sampler in evaluation (the DM loss uses distill.real_guidance_scale)")


class StableDiffusionTeacherConfig(Strict):
    """`family: stable_diffusion`: a text-to-image latent diffusion pipeline (Stable Diffusion 1.5 or SDXL, or a tiny
    one of the same shape) read from a local diffusers pipeline directory or a hub id; never trained here."""

    family: Literal["stable_diffusion"] = "stable_diffusion"
    source: Literal["pretrained"] = "pretrained"
    pretrained: str = Field(description="a local diffusers pipeline directory (model_index.json, unet/, vae/, "
                            "text_encoder/, tokenizer/, scheduler/), or a hub id such as "
                            "stable-diffusion-v1-5/stable-diffusion-v1-5 already in the local hub cache when offline, "
                            "or tiny:sd15 / tiny:sdxl (a tiny random pipeline of that shape, built offline)")
    sampler: TextSamplerConfig = Field(default_factory=TextSamplerConfig)


# ------------------------------------------------------------------------------------------------ the family

PROMPTS_FILE, EVAL_PROMPTS_FILE, LATENTS_FILE = "prompts.lmdb", "eval_prompts.lmdb", "latents.lmdb"


TINY_PREFIX = "tiny:"
# The paper's pipelines by hub id → the copy of their config files in ARCHITECTURES (`architecture_config`)
PUBLISHED = {"stabilityai/stable-diffusion-xl-base-1.0": "stable-diffusion-xl-base-1.0",
             "stable-diffusion-v1-5/stable-diffusion-v1-5": "stable-diffusion-v1-5",
             "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5"}


def tiny_pipeline_dir(name: str) -> Path:
    """`tiny:<kind>` (sd15, sdxl, sd3, flux): the tiny random 32 px pipeline of that shape (`dmd2.tiny_pipelines`),
    built once (seed 0) into $DMD2_CACHE/tiny-pipelines (default ~/.cache/dmd2), the way a hub id resolves to the hub cache."""
    import os
    import shutil

    from dmd2.tiny_pipelines import KINDS, tiny_pipeline

    kind = name[len(TINY_PREFIX):]
    if kind not in KINDS:
        raise ModelError(f"teacher.pretrained: {name} is not a tiny pipeline (tiny:{' or tiny:'.join(KINDS)})")
    folder = Path(os.environ.get("DMD2_CACHE", Path.home() / ".cache" / "dmd2")) / "tiny-pipelines" / f"{kind}-32px"
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        with torch.random.fork_rng():  # its seed must not move the caller's random stream
            tiny_pipeline(kind, tmp, resolution=32, seed=0)
        if not (folder / "model_index.json").exists():  # another process may have finished first
            replace_directory(tmp, folder)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def pipeline_root(name: str, root: Path = Path(".")) -> Path:
    """The local directory of `teacher.pretrained`: a path (relative to the project root), a hub id in the local
    hub cache, or `tiny:<kind>`."""
    if name.startswith(TINY_PREFIX):
        return tiny_pipeline_dir(name)
    local = Path(name).expanduser()
    if not local.is_absolute() and (root / local).exists():
        return (root / local).resolve()
    return resolve_pretrained(name)


def vae_downsampling(path: Path) -> int:
    """How many pixels a latent of the pipeline at `path` spans per side (2 per VAE block after the first)."""
    return 2 ** (len(json.loads((path / "vae" / "config.json").read_text())["block_out_channels"]) - 1)


def pipeline_resolution(path: Path, denoiser: str = "unet") -> int:
    """The image size a pipeline's denoiser (its `unet` or `transformer` folder) was built for: its latent size ×
    the VAE's downsampling."""
    size = json.loads((path / denoiser / "config.json").read_text())["sample_size"]
    return (size if isinstance(size, int) else size[0]) * vae_downsampling(path)


def text_teacher_config(cfg: StableDiffusionTeacherConfig, root: Path = Path(".")) -> dict[str, Any]:
    """The config.json of a text-to-image teacher: its UNet recorded by reference and hash (as any pretrained
    diffusers teacher), plus the pipeline it belongs to (prompts and latents go through its other components)."""
    path = pipeline_root(cfg.pretrained, root)
    return {**text_architecture_config(cfg, path), "pretrained": pretrained_reference(resolve_pretrained(str(path)),
                                                                                     "unet")}


def text_architecture_config(cfg: StableDiffusionTeacherConfig, path: Path) -> dict[str, Any]:
    """`text_teacher_config` without the weights' reference: from the pipeline's config files alone."""
    unet, scheduler = pretrained_architecture(path, "unet")
    return {"family": "stable_diffusion", "kind": "teacher", "unet_class": "UNet2DConditionModel", "unet": unet,
            "scheduler": scheduler, "num_classes": 0, "null_class": None, "sampler": to_dict(cfg.sampler),
            "pipeline": {"path": str(path), "kind": pipeline_kind(path), "resolution": pipeline_resolution(path)}}


class StableDiffusionFamily(DiffusersFamily):
    """Text-to-image latent diffusion (SD1.5, SDXL): prompts in, VAE latents out."""

    schema = StableDiffusionTeacherConfig  # its `teacher:` block in params.yaml
    name, sampler_name = "stable_diffusion", "DDIM"
    published = PUBLISHED  # hub id → the copy of its config files in ARCHITECTURES

    @staticmethod
    def recorded_config(cfg, root: Path = Path(".")) -> dict[str, Any]:
        """The teacher's config.json: its pipeline's architecture and its denoiser's weights by reference."""
        return text_teacher_config(cfg, root)

    @staticmethod
    def pipeline_architecture(cfg, path: Path) -> dict[str, Any]:
        """`recorded_config` without the weights' reference, from the config files of the pipeline at `path`."""
        return text_architecture_config(cfg, path)

    @classmethod
    def teacher_config(cls, cfg, sample_shape, num_classes):
        return cls.recorded_config(cfg)

    @classmethod
    def import_teacher(cls, cfg, sample_shape, num_classes, root):
        config = cls.recorded_config(cfg, root)
        print(f"teacher: recorded the {config['pipeline']['kind']} pipeline {cfg.pretrained} "
              f"({config['pipeline']['path']}) by reference")
        return {**config, "source": {"type": "pretrained", "name": cfg.pretrained}}, None

    @classmethod
    def architecture_config(cls, cfg, root):
        """`pipeline_architecture` of the published pipeline's config files (`published`), else of the teacher's
        downloaded or tiny pipeline."""
        published = cls.published.get(cfg.pretrained)
        return cls.pipeline_architecture(cfg, ARCHITECTURES / published if published
                                         else pipeline_root(cfg.pretrained, root))

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self._start_text_to_image()

    def _start_text_to_image(self) -> None:
        """The prompt encoder, codec and prompts, all loaded on first use."""
        self._encoder: PromptEncoder | None = None
        self._encoder_device: torch.device | None = None
        self._encoder_dtype: torch.dtype | None = None  # None: as stored (float32)
        self._codec: LatentCodec | None = None
        self._prompts = self._eval_prompts = self._eval_labels = None

    @property
    def pipeline_path(self) -> Path:
        return Path(self.config["pipeline"]["path"])

    @property
    def resolution(self) -> int:
        return int(self.config["pipeline"]["resolution"])

    @property
    def latent_space(self) -> bool:
        return True

    # -------------------------------------------------------------------------- data stage and export

    rgb_images = True

    @classmethod
    def text_pipeline(cls, teacher_cfg, root: Path) -> tuple[Path, int]:
        """The teacher's pipeline directory and image size, checked to be one this family reads."""
        return sd_pipeline(teacher_cfg, root)

    @classmethod
    def check_data(cls, data_cfg, teacher_cfg, source, root):
        return check_text_to_image(data_cfg, source, root, cls.text_pipeline(teacher_cfg, root))

    @classmethod
    def prepare_data(cls, out_dir, data_cfg, teacher_cfg, checked, splits, root):
        captions, prompts = checked
        summary = prepare_text_to_image(out_dir, data_cfg, cls.text_pipeline(teacher_cfg, root), captions, splits,
                                        prompts)
        print(f"wrote {out_dir}/{LATENTS_FILE} ({summary['latents']}), {PROMPTS_FILE} ({summary['prompts']}) and "
              f"{EVAL_PROMPTS_FILE} ({summary['eval_prompts']})")
        return summary

    def real_samples(self, data_dir: Path):
        from dmd2.latents import LatentDataset

        return LatentDataset(Path(data_dir) / LATENTS_FILE, expect_shape=self.sample_shape)

    @property
    def exports_pipeline(self) -> bool:
        return True

    def export_student(self, student, student_dir, out_dir):
        return export_pipeline(student, student_dir, out_dir)

    def pixel_decoder(self, device):
        self.codec.vae.to(device)
        return self.codec.differentiable_decode

    # ------------------------------------------------------------------------------------------- prompts

    def use_data(self, data_dir: Path) -> None:
        from dmd2.prompts import PromptDataset

        self._prompts = PromptDataset(Path(data_dir) / PROMPTS_FILE)
        held_out = PromptDataset(Path(data_dir) / EVAL_PROMPTS_FILE)
        self._eval_prompts = held_out.batch(range(len(held_out)))
        self._eval_labels = None
        images = Path(data_dir) / "heldout.lmdb"  # the captions' own images: their labels, when they have classes
        if (images / "data.mdb").exists():
            from dmd2.data import LMDBImageDataset

            dataset = LMDBImageDataset(images)
            if dataset.num_classes > 1 and len(dataset) == len(self._eval_prompts):
                self._eval_labels = dataset.labels()

    def _need_prompts(self):
        if self._prompts is None:
            raise ModelError("a text-to-image model draws its prompts from the experiment's data: run "
                             "`dmd2 prepare-data` (it writes prompts.lmdb and eval_prompts.lmdb)")

    def random_conditions(self, n: int, draw) -> list[str]:
        self._need_prompts()
        return self._prompts.batch(draw.randint(0, len(self._prompts), n, "cpu"))

    def balanced_conditions(self, n: int) -> list[str]:
        """The held-out captions in order, repeated as often as needed."""
        self._need_prompts()
        return [self._eval_prompts[i % len(self._eval_prompts)] for i in range(n)]

    def balanced_labels(self, n: int) -> torch.Tensor | None:
        """The labels of the held-out images whose captions `balanced_conditions` cycles through (None without)."""
        self._need_prompts()
        return None if self._eval_labels is None else self._eval_labels[torch.arange(n) % len(self._eval_labels)]

    def grid_conditions(self, rows: int) -> tuple[list[str], int]:
        self._need_prompts()
        columns = min(8, len(self._eval_prompts))
        return self._eval_prompts[:columns] * rows, columns

    def new_prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder.from_pipeline(self.pipeline_path, (self.resolution, self.resolution))

    def prompt_encoder(self, device: torch.device | str) -> PromptEncoder:
        """The pipeline's tokenizers and frozen text encoders (loaded once, moved where the samples are)."""
        device = torch.device(device)
        if self._encoder is None:
            self._encoder = self.new_prompt_encoder()
        if self._encoder_device != device:
            self._encoder, self._encoder_device = self._encoder.to(device, self._encoder_dtype), device
        return self._encoder

    def frozen_networks(self) -> dict[str, nn.Module]:
        import transformers
        from diffusers import AutoencoderKL

        index = json.loads((self.pipeline_path / "model_index.json").read_text())
        networks = {}
        with torch.device("meta"):
            for name in sorted(k for k in index if k.startswith("text_encoder")):
                if index[name][1]:
                    cls = getattr(transformers, index[name][1])
                    networks[name] = cls(cls.config_class.from_pretrained(self.pipeline_path / name))
            networks["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(self.pipeline_path / "vae"))
        return networks

    def memory_conditions(self, n: int) -> dict[str, Any]:
        # the shapes PromptEncoder gives: 77 tokens of text-encoder states; SDXL adds pooled text and size ids
        unet = self.config["unet"]
        cond: dict[str, Any] = {"encoder_hidden_states": torch.zeros(n, 77, unet["cross_attention_dim"])}
        if self.config["pipeline"]["kind"] == "sdxl":
            pooled = unet["projection_class_embeddings_input_dim"] - 6 * unet["addition_time_embed_dim"]
            cond["added_cond_kwargs"] = {"text_embeds": torch.zeros(n, pooled), "time_ids": torch.zeros(n, 6)}
        return cond

    def keep_frozen_weights_in(self, dtype: torch.dtype) -> None:
        self._encoder_dtype = dtype
        if self._encoder is not None:
            self._encoder.to(self._encoder_device, dtype)

    def encode_conditions(self, raw, device):
        if raw is None:
            raise ModelError("a text-to-image model needs prompts as its conditions (got none)")
        return self.prompt_encoder(device)(list(raw), device)

    def unconditional(self, cond):
        return self.prompt_encoder(cond["encoder_hidden_states"].device).unconditional(cond)

    # ------------------------------------------------------------------------------------------- latents

    @property
    def codec(self) -> LatentCodec:
        if self._codec is None:
            self._codec = LatentCodec.from_pipeline(self.pipeline_path)
        return self._codec

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self.codec.vae.to(x.device)
        return self.codec.decode(x)

    # ------------------------------------------------------------------------------------------- teacher

    def teacher_loss(self, net, x0, cond):
        raise ModelError("a text-to-image teacher is pretrained (teacher.source: pretrained), never trained here")

    def teacher_nfe(self, num_steps: int) -> int:
        return num_steps * (1 if self.default_guidance_scale == 1.0 else 2)


# ------------------------------------------------------------------------------------ the data stage


def sd_pipeline(teacher_cfg, root: Path) -> tuple[Path, int]:
    """The teacher pipeline's directory (an SD1.5/SDXL pipeline folder, or a clear error) and its image size."""
    pipeline = pipeline_root(teacher_cfg.pretrained, root)
    pipeline_kind(pipeline)
    return pipeline, pipeline_resolution(pipeline)


def check_resolution(cfg, pipeline: Path, size: int) -> Path:
    """`pipeline`, after checking that its images (`size` px) are `data.resolution`'s."""
    from dmd2.data import DataError

    if cfg.resolution != size:
        raise DataError(f"data.resolution is {cfg.resolution}, but the teacher pipeline {pipeline} makes {size}px "
                        f"images; set data.resolution: {size}")
    return pipeline


def check_text_to_image(cfg, source, root: Path, pipeline: tuple[Path, int]) -> tuple[list[str], tuple | None]:
    """Everything the text-to-image outputs need, checked before the data stage writes anything: the pipeline's
    resolution (`pipeline`: its directory and image size), every image's caption and the training prompts. Returns
    (captions, training prompts)."""
    from dmd2.latents import source_captions, training_prompts

    check_resolution(cfg, *pipeline)
    return source_captions(cfg, source.labels, source.class_names, root), training_prompts(cfg, root)


def prepare_text_to_image(out_dir: Path, cfg, pipeline: tuple[Path, int], captions: list[str], splits: dict[str, Any],
                          prompts: tuple[list[str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """latents.lmdb (the training images through the teacher pipeline's VAE, with their captions), prompts.lmdb and
    eval_prompts.lmdb, beside the image LMDBs `dmd2.data.prepare` wrote into `out_dir`; `pipeline` as
    `check_text_to_image` takes it, `prompts` from `training_prompts`."""
    import hashlib

    from dmd2.data import LMDBImageDataset
    from dmd2.latents import encode_split, weights_digest, write_latents_lmdb
    from dmd2.prompts import write_prompts_lmdb

    pipeline = check_resolution(cfg, *pipeline)
    train_captions = [captions[i] for i in splits["train"]]
    train = LMDBImageDataset(out_dir / "train.lmdb")
    codec = LatentCodec.from_pipeline(pipeline)
    latents = encode_split(train, codec, cfg.seed)
    vae = pipeline / "vae"
    meta = {"split": "train", "source": train.meta["source"], "source_sha256": train.meta["source_sha256"],
            "pipeline": str(pipeline), "vae_sha256": weights_digest(vae), "scaling_factor": codec.scaling_factor,
            "shift_factor": codec.shift_factor}
    write_latents_lmdb(out_dir / LATENTS_FILE, latents, train_captions, meta)
    if prompts is None:
        prompts = (train_captions, {"split": "train", "source": "the training images' captions",
                                    "source_sha256": hashlib.sha256("\n".join(train_captions).encode()).hexdigest()})
    write_prompts_lmdb(out_dir / PROMPTS_FILE, *prompts)
    held_out = [captions[i] for i in splits["heldout"]]
    write_prompts_lmdb(out_dir / EVAL_PROMPTS_FILE, held_out,
                       {"split": "heldout", "source": "the held-out images' captions",
                        "source_sha256": hashlib.sha256("\n".join(held_out).encode()).hexdigest()})
    return {"latents": len(latents), "prompts": len(prompts[0]), "eval_prompts": len(held_out)}


# ------------------------------------------------------------------------------------------------ export


def lcm_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps `LCMScheduler` takes for `num_steps` steps when `original_inference_steps` = `num_steps`."""
    k = num_train_timesteps // num_steps
    return [k * i - 1 for i in range(num_steps, 0, -1)]


def student_scheduler_config(teacher_scheduler: dict[str, Any], timesteps: list[int]) -> dict[str, Any]:
    """An LCMScheduler config on the teacher's noise schedule whose default timesteps are the student's when they
    can be (evenly spaced from the top), else the nearest; `timesteps_to_pass` says what to give the call."""
    from diffusers import LCMScheduler

    keep = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "rescale_betas_zero_snr")
    config = {k: v for k, v in teacher_scheduler.items() if k in keep}
    scheduler = LCMScheduler(**config, original_inference_steps=len(timesteps), clip_sample=False,
                             set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1)  # unused by LCM; 1 keeps SD pipelines from warning
    return dict(scheduler.config)


def export_pipeline(student, student_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write a loaded Stable Diffusion student (`dmd2.families.Model`) as a diffusers pipeline into `out_dir`: the
    teacher pipeline's components, the student's UNet and an LCMScheduler (see `dmd2.export`); a LoRA student's
    adapters also alone. Returns how to call it."""
    from diffusers import DiffusionPipeline, LCMScheduler

    family, timesteps = student.family, student.timesteps
    scheduler = LCMScheduler.from_config(student_scheduler_config(student.config["scheduler"], timesteps))
    pipeline = DiffusionPipeline.from_pretrained(family.pipeline_path, unet=student.net, scheduler=scheduler)
    pipeline.save_pretrained(out_dir)
    lora = student.config["generator"].get("lora")
    if lora:  # the adapters alone too, for `load_lora_weights` on a copy of the teacher pipeline
        from safetensors.torch import load_file

        adapter = load_file(Path(student_dir) / lora["file"])
        save_lora_state(family.pipeline_path, adapter, lora_config(lora["rank"], lora["alpha"]), out_dir)
    usage = {"num_inference_steps": len(timesteps), "guidance_scale": 0.0}
    if lcm_timesteps(len(timesteps), family.num_train_timesteps) != timesteps:
        usage["timesteps"] = timesteps  # not LCM's default for this step count: pass them to the call
    return {"call": usage, "teacher_pipeline": str(family.pipeline_path)}


# -------------------------------------------------------------------------------------------------- LoRA

def save_lora(pipeline_dir: str | Path, unet: nn.Module, out_dir: str | Path) -> Path:
    """Write the UNet's adapter as `pytorch_lora_weights.safetensors` in `out_dir`, loadable with
    `DiffusionPipeline.from_pretrained(pipeline_dir).load_lora_weights(out_dir)`."""
    return save_lora_state(pipeline_dir, lora_weights(unet), unet.peft_config["default"].to_dict(), out_dir)


def save_lora_state(pipeline_dir: str | Path, adapter: dict[str, torch.Tensor], lora_config: dict[str, Any],
                    out_dir: str | Path) -> Path:
    """`save_lora` for adapter weights under peft's names and their `LoraConfig` as a dict."""
    import diffusers

    pipeline_class = getattr(diffusers, json.loads((Path(pipeline_dir) / "model_index.json").read_text())["_class_name"])
    # the adapter's config (rank, alpha, targets) travels in the file's metadata: without it a loader assumes
    # alpha = rank, which rescales the adapter
    pipeline_class.save_lora_weights(str(out_dir), unet_lora_layers=adapter, safe_serialization=True,
                                     unet_lora_adapter_metadata=lora_config)
    return Path(out_dir) / "pytorch_lora_weights.safetensors"
