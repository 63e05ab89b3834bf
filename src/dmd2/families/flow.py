"""The rectified-flow family: velocity-prediction networks on the straight path between data and noise.

    x_t = (1 − t)·x0 + t·ε,   v = ε − x0,   so   x0 = x_t − t·v̂        (t = 1: pure noise)

as in SD3 and Flux (Esser et al. 2024, "Scaling Rectified Flow Transformers"). Time is continuous; DMD2's timestep
indices i = 0 … N−1 (the generator's 999, the DM loss's 20 … 980) name the points t_i = shift((i + 1)/N) of the
family's table, where the shift moves time towards noise: shift(s) = m·s / (1 + (m − 1)·s), with m static (SD3:
3.0) or made from the image's token count (Flux: m = exp(μ), μ linear in the count). With a static shift the table
is diffusers' `FlowMatchEulerDiscreteScheduler` training table (tested); with Flux's, the same formula with that m,
the shift diffusers applies when it samples. The teacher samples with that scheduler.

The teacher trained here draws logit-normal (SD3's distribution) or uniform continuous times; the critic's denoising
loss draws indices of the table, uniformly or logit-normally (`distill.critic_times`, any family). The
network is a diffusers UNet (sharing the diffusers family's network, conditions, GAN features and LoRA) or SD3's
MM-DiT, `SD3Transformer2DModel`, with the class label one-hot as its pooled and context inputs; either takes N·t as
its timestep, as diffusers' flow pipelines give it. The transformer's GAN features are the image tokens after its
middle block, and the later blocks never run: a forward hook ends the forward there by raising (`exit_after_block`),
tested on one process (`tests/test_flow.py`) and under FSDP2 with gradient checkpointing (two sharded processes
land where one does: `tests/test_flow_pipelines.py`); not yet under DDP.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from dmd2.config import Strict, TeacherTraining, to_dict
from dmd2.families.base import Family, ModelError, logit_normal
from dmd2.families.diffusers import DiffusersFamily, DiffusersUNetConfig, decoder_skipped, unet_config

TRANSFORMER = "SD3Transformer2DModel"

# ------------------------------------------------------------------------------ params.yaml's teacher block


class ResolutionShift(Strict):
    """Flux's shift from the image's token count L (2×2 patches): μ = base + (max − base)·(L − L_base)/(L_max − L_base),
    m = exp(μ)."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = Field(256, ge=1)
    max_seq_len: int = Field(4096, ge=2)


class FlowScheduleConfig(Strict):
    num_train_timesteps: int = Field(1000, ge=2, description="points of the time table DMD2's timestep indices name")
    shift: float = Field(1.0, gt=0, description="static time shift m (SD3: 3.0; 1: none)")
    resolution_shift: ResolutionShift | None = Field(None, description="Flux's shift from the token count instead "
                                                     "of `shift`")
    teacher_times: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="the teacher's training times (before the shift): logit-normal (SD3) or uniform")
    logit_mean: float = Field(0.0, description="teacher_times logit_normal: the logit's mean")
    logit_std: float = Field(1.0, gt=0, description="teacher_times logit_normal: the logit's standard deviation")


class FlowSamplerConfig(Strict):
    num_steps: int = Field(28, ge=1, description="Euler steps of the teacher's sampler (NFE = n, 2n with guidance)")
    guidance_scale: float = Field(1.0, ge=0, le=100, description="classifier-free guidance of the teacher's own "
                                  "sampler in evaluation")


class FlowTransformerConfig(Strict):
    """Constructor arguments of an `SD3Transformer2DModel` trained here (names as in diffusers); the class label
    reaches it one-hot, as its pooled projection and as a one-token context."""

    patch_size: int = Field(2, ge=1)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(16, ge=1)
    qk_norm: Literal["rms_norm"] | None = None


class FlowTeacherConfig(TeacherTraining):
    """`family: flow`: a rectified-flow (velocity-prediction) diffusers UNet or SD3-style transformer trained here
    with the flow objective."""

    family: Literal["flow"] = "flow"
    unet_class: Literal["UNet2DModel", "UNet2DConditionModel", "SD3Transformer2DModel"] = Field(
        "UNet2DModel", description="the network: a diffusers UNet (configured by `unet`) or SD3's MM-DiT "
        "(`transformer`)")
    unet: DiffusersUNetConfig = Field(default_factory=DiffusersUNetConfig)
    transformer: FlowTransformerConfig = Field(default_factory=FlowTransformerConfig)
    schedule: FlowScheduleConfig = Field(default_factory=FlowScheduleConfig)
    sampler: FlowSamplerConfig = Field(default_factory=FlowSamplerConfig)

    @model_validator(mode="after")
    def _check(self) -> FlowTeacherConfig:
        shift = self.schedule.resolution_shift
        if shift is not None and shift.max_seq_len <= shift.base_seq_len:
            raise ValueError("schedule.resolution_shift: max_seq_len must be above base_seq_len")
        return self


# ----------------------------------------------------------------------------------------- flow formulas


def shift_times(s: torch.Tensor, shift: float) -> torch.Tensor:
    """m·s / (1 + (m − 1)·s), written as m / (m + 1/s − 1) (diffusers' exponential `time_shift` with μ = ln m)."""
    return s * shift / (1 + (shift - 1) * s)


def resolution_shift(tokens: int, cfg: dict[str, Any]) -> float:
    """Flux's m = exp(μ) for an image of `tokens` 2×2 patches (μ linear in the count between the two anchors)."""
    slope = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_seq_len"] - cfg["base_seq_len"])
    return math.exp(cfg["base_shift"] + slope * (tokens - cfg["base_seq_len"]))


def transformer_config(cfg: FlowTransformerConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """An `SD3Transformer2DModel`'s constructor config for samples of `sample_shape`, its context and pooled inputs
    one-hot class labels (plus the null class; one constant input when unconditional)."""
    channels, size = sample_shape[0], sample_shape[-1]
    labels = num_classes + 1 if num_classes else 1
    return {"sample_size": size, "in_channels": channels, "out_channels": channels, "patch_size": cfg.patch_size,
            "pos_embed_max_size": size // cfg.patch_size, "num_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_attention_heads, "attention_head_dim": cfg.attention_head_dim,
            # the context stream is as wide as the image stream (SD3's joint attention adds them head by head)
            "caption_projection_dim": cfg.num_attention_heads * cfg.attention_head_dim, "joint_attention_dim": labels,
            "pooled_projection_dim": labels, "qk_norm": cfg.qk_norm}


class _EarlyExit(Exception):  # noqa: N818 (a control-flow signal, not an error)
    """Carries a transformer block's image tokens out of the forward: the blocks after it never run."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.tokens = tokens


@contextlib.contextmanager
def exit_after_block(net: nn.Module, index: int):
    """While inside, the transformer's forward stops after block `index` (of its joint blocks, then Flux's
    single-stream ones), raising `_EarlyExit` with the image tokens that block returned (every block of SD3's and
    Flux's returns (context, image) tokens)."""

    def stop(module, args, output):
        raise _EarlyExit(output[1])

    blocks = [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", [])]
    handle = blocks[index].register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def flow_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, *[1] * (x0.ndim - 1))
    return ((1 - t) * x0.double() + t * noise.double()).to(x0.dtype)


# ----------------------------------------------------------------------------------------------- the family


class FlowFamily(DiffusersFamily):
    schema = FlowTeacherConfig  # its `teacher:` block in params.yaml
    name, sampler_name = "flow", "Euler"

    @staticmethod
    def teacher_config(cfg: FlowTeacherConfig, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        # "unet": the network's constructor config, UNet or transformer (the diffusers family's key)
        network = (transformer_config(cfg.transformer, sample_shape, num_classes) if cfg.unet_class == TRANSFORMER
                   else unet_config(cfg, sample_shape, num_classes))
        return {"family": "flow", "kind": "teacher", "unet_class": cfg.unet_class,
                "unet": network, "schedule": to_dict(cfg.schedule),
                "num_classes": num_classes, "null_class": num_classes if num_classes else None,
                "sampler": to_dict(cfg.sampler)}

    @staticmethod
    def import_teacher(cfg, sample_shape, num_classes, root):
        return Family.import_teacher(cfg, sample_shape, num_classes, root)

    def __init__(self, config: dict[str, Any]):
        Family.__init__(self, config)  # no DDPM noise table: the flow's own
        schedule = config["schedule"]
        n = int(schedule["num_train_timesteps"])
        self.shift = self._shift(schedule)
        # t_i = shift((i + 1)/n), float64: index n − 1 is pure noise (t = 1)
        self.times = shift_times(torch.arange(1, n + 1, dtype=torch.float64) / n, self.shift)

    def _shift(self, schedule: dict[str, Any]) -> float:
        if schedule.get("resolution_shift") is None:
            return float(schedule["shift"])
        _, height, width = self.sample_shape
        return resolution_shift((height // 2) * (width // 2), schedule["resolution_shift"])

    @property
    def is_transformer(self) -> bool:
        return self.config["unet_class"] == TRANSFORMER

    def build_network(self) -> nn.Module:
        if not self.is_transformer:
            return super().build_network()
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_config(self.config["unet"])

    def _transformer_inputs(self, cond: Any, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The class label (`encode_conditions`' class_labels; none: index 0, the one constant input) one-hot, as
        the transformer's pooled projection and as its one context token."""
        if not cond and self.num_classes:
            raise ModelError("this class-conditional transformer needs class labels (got none)")
        labels = cond["class_labels"] if cond else torch.zeros(n, dtype=torch.long, device=device)
        one_hot = F.one_hot(labels, self.config["unet"]["pooled_projection_dim"]).float()
        return {"pooled_projections": one_hot, "encoder_hidden_states": one_hot[:, None, :]}

    # ------------------------------------------------------------------------------ noise and predictions

    @property
    def num_train_timesteps(self) -> int:
        return len(self.times)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """The continuous time (float64) of timestep indices `t`."""
        return self.times.to(t.device)[t.long()]

    def add_noise(self, x0, noise, t):
        return flow_interpolate(x0, noise, self.time(t))

    def generator_input(self, noise, t):
        return noise  # pure noise whatever t names (a one-step generator at an earlier t, as SDXL's at 399)

    def velocity(self, net: nn.Module, x_t: torch.Tensor, time: torch.Tensor, cond: Any) -> torch.Tensor:
        """v̂ at continuous times `time` (the network takes N·t, N = num_train_timesteps, as diffusers' flow
        pipelines give it), float32."""
        timestep = (time * self.num_train_timesteps).to(x_t.dtype).expand(len(x_t))
        if not self.is_transformer:
            return self._call(net, x_t, timestep, cond)
        return net(x_t, timestep=timestep, **self._transformer_inputs(cond, len(x_t), x_t.device)).sample.float()

    def denoise(self, net, x_t, t, cond):
        time = self.time(t)
        v = self.velocity(net, x_t, time, cond).double()
        return (x_t.double() - time.reshape(-1, *[1] * (x_t.ndim - 1)) * v).float()

    def flow_loss(self, net: nn.Module, x0: torch.Tensor, time: torch.Tensor, cond: Any,
                  noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching objective: mean (v̂(x_t, t) − (ε − x0))²."""
        v = self.velocity(net, flow_interpolate(x0, noise, time), time, cond)
        return F.mse_loss(v, (noise.float() - x0.float()))

    def fake_score_loss(self, net, x0, t, cond, noise):
        return self.flow_loss(net, x0, self.time(t), cond, noise)

    # --------------------------------------------------------------------------------------- GAN head

    def gan_features(self, net, x_t, t, cond):
        """A UNet's mid-block output (its decoder skipped); a transformer's image tokens after its middle block
        (the blocks after it never run)."""
        if not self.is_transformer:
            with decoder_skipped(net):
                return self.velocity(net, x_t, self.time(t), cond)
        try:
            with exit_after_block(net, self.gan_block):
                self.velocity(net, x_t, self.time(t), cond)
        except _EarlyExit as exit:
            return exit.tokens
        raise ModelError(f"the transformer's block {self.gan_block} never ran")

    @property
    def gan_block(self) -> int:
        """The middle transformer block (of n, block n//2 − 1 counting from 0: the first half runs)."""
        return max(self.config["unet"]["num_layers"] // 2 - 1, 0)

    @property
    def gan_feature_shape(self) -> tuple[int, ...]:
        if not self.is_transformer:
            return super().gan_feature_shape
        network = self.config["unet"]
        tokens = (network["sample_size"] // network["patch_size"]) ** 2
        return (tokens, network["num_attention_heads"] * network["attention_head_dim"])

    # -------------------------------------------------------------------------------------- teacher

    def teacher_loss(self, net, x0, cond):
        schedule = self.config["schedule"]
        uniform = torch.rand(len(x0), dtype=torch.float64)
        if schedule["teacher_times"] == "logit_normal":
            uniform = logit_normal(uniform, schedule["logit_mean"], schedule["logit_std"])
        time = shift_times(uniform, self.shift).to(x0.device)
        return self.flow_loss(net, x0, time, cond, torch.randn_like(x0))

    def scheduler(self, num_steps: int):
        """diffusers' FlowMatchEulerDiscreteScheduler on this family's table, set to `num_steps` steps (a
        resolution-dependent shift as Flux's pipeline sets it: its sigmas linspace(1, 1/n, n), dynamically shifted
        with μ = ln m)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        dynamic = self.config["schedule"].get("resolution_shift") is not None
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift,
                                                    use_dynamic_shifting=dynamic)
        if dynamic:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=math.log(self.shift))
        else:
            scheduler.set_timesteps(num_steps)
        return scheduler

    @torch.no_grad()
    def sample_teacher(self, net, noise, cond, num_steps, guidance_scale=1.0):
        """Euler steps on the flow's ODE through diffusers' FlowMatchEulerDiscreteScheduler (its sigmas are t),
        guidance on v̂ (linear: the same as guiding x0)."""
        scheduler = self.scheduler(num_steps)
        x = noise.float()
        for i, step in enumerate(scheduler.timesteps):
            time = scheduler.sigmas[i].double().to(x.device).expand(len(x))
            v = self.guided(lambda c: self.velocity(net, x, time, c), cond, guidance_scale)  # noqa: B023
            x = scheduler.step(v, step, x).prev_sample
        return x

    def teacher_nfe(self, num_steps: int) -> int:
        guided = self.num_classes and self.default_guidance_scale != 1.0  # two branches per step
        return num_steps * (2 if guided else 1)
