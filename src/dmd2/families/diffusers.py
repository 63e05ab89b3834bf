"""The diffusers family: discrete-time ε- or v-prediction UNets (`UNet2DModel`, `UNet2DConditionModel`) over a
noise schedule `alphas_cumprod` taken from the model's scheduler config.

    x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε                       (forward process, `add_noise`)
    x0  = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t                 (ε-prediction, in float64 as the method notes say)
    x0  = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂                     (v-prediction)

The critic's own loss is the unweighted ε-MSE (or v-MSE) at t ~ U{0…T−1}, as the original's SD path; the
generator's input at any timestep is the unit noise itself (t = 999 ≈ pure noise; the SDXL one-step recipe feeds
the same noise at t = 399). Class labels go in as `class_labels` with one extra "null" class (index
`num_classes`) as the unconditional branch that label dropout trains. The teacher's own sampler is
deterministic DDIM with trailing timestep spacing (so one step starts at t = T − 1, not at t = 0).
The GAN head reads the UNet's mid-block output; the decoder does not run for it (`decoder_skipped`).

Weights: a teacher trained here is stored as `model.safetensors` beside config.json; a pretrained teacher is
recorded by reference (its directory, and each weight file's size and sha256) and loaded from there, never
copied.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from dmd2.config import Strict, TeacherTraining, to_dict
from dmd2.families.base import Family, ModelError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def unet_class(name: str) -> type[nn.Module]:
    if name not in UNET_CLASSES:
        raise ModelError(f"unet_class {name!r} is not supported (supported: {', '.join(UNET_CLASSES)})")
    import diffusers

    return getattr(diffusers, name)


def build_scheduler(config: dict[str, Any]):
    """A diffusers scheduler from its config dict (`_class_name` names the class; only scheduler classes)."""
    import diffusers

    name = config.get("_class_name", "DDPMScheduler")
    if not name.endswith("Scheduler") or not hasattr(diffusers, name):
        raise ModelError(f"scheduler class {name!r} is not a diffusers scheduler")
    return getattr(diffusers, name).from_config(config)


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


def lora_config(rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, Any]:
    """The `LoraConfig` `add_lora` attaches, as a dict (a LoRA file's metadata)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()


# ------------------------------------------------------------------------------ params.yaml's teacher block


class DiffusersUNetConfig(Strict):
    """Constructor arguments of a diffusers UNet trained here (names as in diffusers)."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    down_block_types: list[str] = Field(default_factory=lambda: ["DownBlock2D"] * 3)
    up_block_types: list[str] = Field(default_factory=lambda: ["UpBlock2D"] * 3)
    mid_block_type: str | None = Field("UNetMidBlock2D", description="UNetMidBlock2D (UNet2DModel), "
                                       "UNetMidBlock2DCrossAttn (text UNet2DConditionModel), or null")
    norm_num_groups: int = Field(8, ge=1)
    attention_head_dim: int = Field(8, ge=1)
    add_attention: bool = Field(False, description="UNet2DModel: self-attention in the middle block")
    cross_attention_dim: int = Field(8, ge=1, description="UNet2DConditionModel only")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> DiffusersUNetConfig:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"down_block_types and up_block_types need one entry per block_out_channels ({n})")
        return self


class NoiseScheduleConfig(Strict):
    """The discrete-time noise schedule of a diffusers teacher trained here (a DDPMScheduler config)."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.00085, gt=0, lt=1)
    beta_end: float = Field(0.012, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = Field("epsilon", description="what the UNet predicts")


class DDIMSamplerConfig(Strict):
    num_steps: int = Field(50, ge=1, description="deterministic DDIM steps of the teacher's full sampler (NFE = n)")


class DiffusersTeacherConfig(TeacherTraining):
    """`family: diffusers`: a discrete-time ε- or v-prediction UNet from diffusers, trained here with the DDPM
    objective (`source: train`) or loaded from a diffusers directory or hub id (`source: pretrained`)."""

    family: Literal["diffusers"] = "diffusers"
    source: Literal["train", "pretrained"] = "train"
    pretrained: str | None = Field(None, description="source: pretrained: a local diffusers directory (a pipeline "
                                   "folder with unet/ and scheduler/, or a model folder) or a hub id such as "
                                   "google/ddpm-cifar10-32 (already in the local hub cache when offline)")
    subfolder: str | None = Field("unet", description="where the UNet sits inside `pretrained` (null: at the top)")
    unet_class: Literal["UNet2DModel", "UNet2DConditionModel"] = "UNet2DModel"
    unet: DiffusersUNetConfig = Field(default_factory=DiffusersUNetConfig)
    scheduler: NoiseScheduleConfig = Field(default_factory=NoiseScheduleConfig)
    sampler: DDIMSamplerConfig = Field(default_factory=DDIMSamplerConfig)

    @model_validator(mode="after")
    def _check(self) -> DiffusersTeacherConfig:
        if self.source == "pretrained" and not self.pretrained:
            raise ValueError("source: pretrained needs `pretrained:` (a local diffusers directory or a hub id)")
        return self


class DiffusersFamily(Family):
    schema = DiffusersTeacherConfig  # its `teacher:` block in params.yaml
    name, sampler_name = "diffusers", "DDIM"
    lora_targets = LORA_TARGETS  # the modules a LoRA generator adapts

    @staticmethod
    def import_teacher(cfg: DiffusersTeacherConfig, sample_shape: tuple[int, ...], num_classes: int, root: Path):
        config = pretrained_teacher_config(cfg)
        print(f"teacher: recorded {cfg.pretrained} ({config['pretrained']['path']}) by reference")
        return {**config, "source": {"type": "pretrained", "name": cfg.pretrained}}, None

    @staticmethod
    def teacher_config(cfg: DiffusersTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        if cfg.source == "pretrained":
            return pretrained_teacher_config(cfg)
        return teacher_config(cfg, sample_shape, num_classes)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.prediction_type = config["scheduler"].get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelError(f"prediction_type {self.prediction_type!r} is not supported "
                             "(epsilon, v_prediction or sample)")
        # ᾱ as the scheduler computes it (float32), held in float64 for the x0 conversions
        self.alphas_cumprod = build_scheduler(config["scheduler"]).alphas_cumprod.double()

    # ------------------------------------------------------------------------------------------ network

    def build_network(self) -> nn.Module:
        return unet_class(self.config["unet_class"]).from_config(self.config["unet"])

    def load_network(self, model_dir: Path) -> nn.Module:
        ref = self.config.get("pretrained")
        if ref is None:
            return super().load_network(model_dir)
        check_reference(ref)
        return unet_class(self.config["unet_class"]).from_pretrained(ref["path"], subfolder=ref.get("subfolder"))

    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        net.enable_gradient_checkpointing()

    def add_lora(self, net: nn.Module, rank: int, alpha: float) -> nn.Module:
        return add_lora(net, rank, alpha, self.lora_targets)

    def fuse_lora(self, state, rank, alpha):
        with torch.device("meta"):
            net = self.add_lora(self.build_network(), rank, alpha)
        # copies: an unsharded run's state dict shares storage with the live generator, which fusing would change
        net.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        adapter = {k: v.clone() for k, v in lora_weights(net).items()}
        net.fuse_lora()  # base weight += B·A·alpha/rank, in place
        net.unload_lora()  # the adapters' layers removed: the plain network, with the fused weights
        return {k: v.detach() for k, v in net.state_dict().items()}, adapter

    # ------------------------------------------------------------------------------- shapes, conditions

    @property
    def sample_shape(self) -> tuple[int, ...]:
        unet = self.config["unet"]
        size = unet["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return (unet["in_channels"], height, width)

    @property
    def null_class(self) -> int:
        """The class index label dropout trained as 'no label' (teachers trained here: the last embedding)."""
        null = self.config.get("null_class")
        if null is None:
            raise ModelError("this class-conditional UNet has no unconditional class (a pretrained model whose label "
                             "convention is unknown): use real_guidance_scale 1 and labels >= 0")
        return int(null)

    def encode_conditions(self, raw, device):
        if raw is None or not self.num_classes:
            return None
        labels = raw.to(device).long()
        if (labels < 0).any():
            labels = torch.where(labels < 0, self.null_class, labels)  # −1 → the null class
        return {"class_labels": labels}

    def unconditional(self, cond):
        return {**cond, "class_labels": torch.full_like(cond["class_labels"], self.null_class)}

    @property
    def has_unconditional_branch(self) -> bool:
        return not self.num_classes or self.config.get("null_class") is not None

    # ------------------------------------------------------------------------------ noise and predictions

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def _coefficients(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1−ᾱ_t)) in float64, shaped to broadcast over a batch of `ndim`-dimensional samples."""
        abar = self.alphas_cumprod.to(t.device)[t.long()].reshape(-1, *[1] * (ndim - 1))
        return abar.sqrt(), (1 - abar).sqrt()

    def add_noise(self, x0, noise, t):
        a, s = self._coefficients(t, x0.ndim)
        return (a * x0.double() + s * noise.double()).to(x0.dtype)

    def generator_input(self, noise, t):
        return noise

    def _call(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        kwargs = dict(cond or {})
        if self.config.get("unet_class") == "UNet2DConditionModel":
            kwargs.setdefault("encoder_hidden_states", None)  # class-conditional without cross-attention
        out = net(x_t, t, **kwargs)
        return (out.sample if hasattr(out, "sample") else out).float()

    def _target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output at (x0, ε, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a, s = self._coefficients(t, x0.ndim)
        return (a * noise.double() - s * x0.double()).float()  # v = √ᾱ·ε − √(1−ᾱ)·x0

    def denoise(self, net, x_t, t, cond):
        out = self._call(net, x_t, t, cond).double()
        if self.prediction_type == "sample":
            return out.float()
        a, s = self._coefficients(t, x_t.ndim)
        x = x_t.double()
        x0 = (x - s * out) / a if self.prediction_type == "epsilon" else a * x - s * out
        return x0.float()

    def fake_score_loss(self, net, x0, t, cond, noise):
        pred = self._call(net, self.add_noise(x0, noise, t), t, cond)
        return F.mse_loss(pred, self._target(x0, noise, t).float())

    # --------------------------------------------------------------------------------------- GAN head

    def gan_features(self, net, x_t, t, cond):
        with decoder_skipped(net):
            return self._call(net, x_t, t, cond)  # the mid-block's output

    @property
    def gan_feature_shape(self) -> tuple[int, int, int]:
        unet = self.config["unet"]
        down = 2 ** (len(unet["down_block_types"]) - 1)  # every down block but the last halves the size
        _, height, width = self.sample_shape
        return (unet["block_out_channels"][-1], height // down, width // down)

    # -------------------------------------------------------------------------------------- teacher

    def teacher_loss(self, net, x0, cond):
        """The DDPM objective: ε-MSE (or v-MSE) at t ~ U{0…T−1}."""
        t = torch.randint(0, self.num_train_timesteps, (len(x0),), device=x0.device)
        return self.fake_score_loss(net, x0, t, cond, torch.randn_like(x0))

    @torch.no_grad()
    def sample_teacher(self, net, noise, cond, num_steps, guidance_scale=1.0):
        """Deterministic DDIM with trailing timestep spacing. It is Euler's method on the probability-flow ODE in
        σ-space, so from the same start it gives what diffusers' EulerDiscreteScheduler gives on the same timesteps
        (the SDXL pipeline's, which the original's regression pairs come from; tested). The one difference: that
        pipeline starts at σ_max·z in σ-space, 0.23 % less noise than x_999 = z, the start here."""
        from diffusers import DDIMScheduler

        # x0 comes from `predict_x0` (guided, float64 conversions); the scheduler only steps. Never clamp: DDIM's
        # default clip_sample=True, taken by any config without the key, would clamp latents to ±1.
        ddim = DDIMScheduler.from_config(self.config["scheduler"], prediction_type="sample",
                                         timestep_spacing="trailing", clip_sample=False, thresholding=False)
        ddim.set_timesteps(num_steps)
        x = noise * ddim.init_noise_sigma
        for t in ddim.timesteps:
            t_batch = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
            x0 = self.predict_x0(net, x, t_batch, cond, guidance_scale)
            x = ddim.step(x0, t, x).prev_sample
        return x0

    def teacher_nfe(self, num_steps: int) -> int:
        return num_steps


# ---------------------------------------------------------------------------------------------- helpers


# What follows the mid-block in diffusers' UNet2DModel and UNet2DConditionModel: the decoder and the output layers.
_AFTER_MID_BLOCK = ("up_blocks", "conv_norm_out", "conv_act", "conv_out")


@contextlib.contextmanager
def decoder_skipped(net: nn.Module):
    """For the duration of the block, the UNet's own forward returns its mid-block's output: the up blocks become
    an empty list and the output layers identities (all restored afterwards), so the decoder never runs, as in the
    original's early-exit forward. It stays an ordinary call of the whole network, so DDP's and FSDP2's hooks see a
    normal forward whose output is the features (FSDP2 prepares the root's backward from its output)."""
    if getattr(net, "mid_block", None) is None:
        raise ModelError("the GAN head reads the UNet's mid-block output, but this UNet has no mid_block "
                         "(unet.mid_block_type: null); set a mid block or turn distill.gan.enabled off")
    saved = {name: net._modules[name] for name in _AFTER_MID_BLOCK}
    try:
        net.up_blocks = nn.ModuleList()
        for name in _AFTER_MID_BLOCK[1:]:
            setattr(net, name, nn.Identity())
        yield
    finally:
        for name, module in saved.items():
            setattr(net, name, module)


def unet_config(cfg: Any, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The constructor config of a diffusers UNet (`cfg.unet_class`, `cfg.unet`) trained here on samples of
    `sample_shape` with `num_classes` classes (plus the null class label dropout trains)."""
    channels, size = sample_shape[0], sample_shape[-1]
    unet = {**to_dict(cfg.unet), "sample_size": size, "in_channels": channels, "out_channels": channels,
            "num_class_embeds": num_classes + 1 if num_classes else None}  # + the null class
    if cfg.unet_class == "UNet2DModel":
        for key in ("cross_attention_dim",):
            unet.pop(key)
    else:
        unet.pop("add_attention")
    return unet


def teacher_config(cfg: DiffusersTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """The config.json of a diffusers UNet trained here on samples of `sample_shape`."""
    scheduler = {"_class_name": "DDPMScheduler", **to_dict(cfg.scheduler), "clip_sample": False}
    return {"family": "diffusers", "kind": "teacher", "unet_class": cfg.unet_class,
            "unet": unet_config(cfg, sample_shape, num_classes), "scheduler": scheduler, "num_classes": num_classes,
            "null_class": num_classes if num_classes else None, "sampler": to_dict(cfg.sampler)}


# ------------------------------------------------------------------------------------- pretrained teachers


def resolve_pretrained(name: str) -> Path:
    """A local diffusers directory for `name` (a path, or a hub id already in the local hub cache); offline or
    absent, one line that says what is missing, where it was looked for, and how to fetch it."""
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelError(f"teacher.pretrained: {name} does not exist (looked for a local directory); give a diffusers "
                         "directory or a hub id such as google/ddpm-cifar10-32")
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name, local_files_only=offline))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        where = f"the hub cache {HF_HUB_CACHE}" + ("" if offline else " and the hub")
        raise ModelError(f"teacher.pretrained: {name} is not a local directory and is not in {where} "
                         f"({type(err).__name__}); on a connected "
                         f"machine run `hf download {name}` (or `hf download {name} --local-dir DIR` and set "
                         "teacher.pretrained: DIR)") from None


def pretrained_teacher_config(cfg: DiffusersTeacherConfig) -> dict[str, Any]:
    """The config.json of a pretrained diffusers teacher, recorded by reference and hash."""
    root = resolve_pretrained(cfg.pretrained)
    unet, scheduler = pretrained_architecture(root, cfg.subfolder)
    # a pretrained class-conditional UNet: every embedding is a class; its unconditional input is unknown
    return {"family": "diffusers", "kind": "teacher", "unet_class": cfg.unet_class, "unet": unet,
            "scheduler": scheduler, "num_classes": int(unet.get("num_class_embeds") or 0), "null_class": None,
            "sampler": to_dict(cfg.sampler), "pretrained": pretrained_reference(root, cfg.subfolder)}


def pretrained_architecture(root: Path, subfolder: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The UNet's config and its noise schedule's, from a diffusers directory's config files (no weights read)."""
    unet_dir = root / subfolder if subfolder else root
    if not (unet_dir / "config.json").exists():
        raise ModelError(f"{unet_dir / 'config.json'} not found: {root} is not a diffusers UNet directory "
                         "(set teacher.subfolder to where the UNet is, or null if it is at the top)")
    unet = {k: v for k, v in _read_json(unet_dir / "config.json").items() if not k.startswith("_")}
    scheduler_dir = next((d for d in (root / "scheduler", root) if (d / "scheduler_config.json").exists()), None)
    if scheduler_dir is None:
        raise ModelError(f"no scheduler_config.json in {root}/scheduler or {root}: the noise schedule of a pretrained "
                         "teacher comes from its own scheduler config")
    scheduler = {k: v for k, v in _read_json(scheduler_dir / "scheduler_config.json").items()
                 if k == "_class_name" or not k.startswith("_")}
    return unet, scheduler


def pretrained_reference(root: Path, subfolder: str | None) -> dict[str, Any]:
    """The UNet's weight files by size and hash: what a teacher recorded by reference is checked against."""
    from dmd2.checkpoint import sha256_file

    unet_dir = root / subfolder if subfolder else root
    files = sorted(p for p in unet_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ModelError(f"no weights (*.safetensors or *.bin) in {unet_dir}")
    return {"path": str(root), "subfolder": subfolder,
            "files": {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path} cannot be read as JSON ({err})") from None


def check_reference(ref: dict[str, Any]) -> None:
    """The referenced weight files are still there with the recorded sizes (hashes are checked by the teacher
    stage and feed the distillation run's fingerprint)."""
    folder = Path(ref["path"]) / (ref.get("subfolder") or "")
    for name, info in ref["files"].items():
        path = folder / name
        if not path.exists() or path.stat().st_size != info["size"]:
            raise ModelError(f"{path} is missing or changed since `dmd2 teacher` recorded it; rerun `dmd2 teacher`")
