"""The model-family interface: everything DMD2, sampling and evaluation need to know about a teacher family.

A family object is built from a model's `config.json` (the normalised format every teacher and student is
stored in) and owns what differs between families: building, loading and saving the network; the noise
parameterisation (σ-space EDM, or ε/v-prediction over `alphas_cumprod`); conditions and their
unconditional branch; the sample shape and decoding to pixels; the teacher's own multi-step sampler; where the
GAN head reads its features; gradient checkpointing. The loop, the losses, sampling, evaluation and the report
only talk to this interface (k-diffusion's `external.py` wraps other families into one denoiser in the same
spirit). A family also owns its `teacher:` block of params.yaml (`schema`), its data files beyond the image
LMDBs (`check_data`, `prepare_data`, `real_samples`) and its export format (`export_student`). Adding a family
means its module and a line in `FAMILIES` (or `register_family`); nothing outside `dmd2/families/` names a family
(`tests/test_families.py` checks the imports and comparisons of every other module).

Timesteps are indices t ∈ {0, …, num_train_timesteps − 1} into the family's own noise table, higher = noisier
(EDM's Karras σ, a DDPM schedule's ᾱ, a flow's continuous time t ∈ (0, 1]): DMD2's step ranges (20…980, the
generator's 999 or [999, 749, 499, 249]) mean the same thing whatever the family. The family draws the times the
loop uses (`dm_timesteps`, `critic_timesteps`, `gan_timesteps`): by default the original's uniform draws, with
logit-normal times for the critic and the DM loss as options.
Conditions come in two forms: *raw* conditions (integer class labels, −1 = no label; prompts later) that data
and samplers hand around, and *encoded* conditions (`encode_conditions`) that the networks take.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from dmd2.errors import Dmd2Error

FORMAT = "dmd2-denoiser/1"
# Config-only copies (no weights) of the published architectures of the paper's downloaded teachers, so that their
# recipes can be estimated (`dmd2 memory`) before anything is downloaded; each family knows its own.
ARCHITECTURES = Path(__file__).parents[1] / "architectures"


def uniform_timesteps_up_to(uniform: torch.Tensor, low: int, high: torch.Tensor) -> torch.Tensor:
    """t ~ U{low, …, high_i} per sample (each of its high_i − low + 1 values equally likely), from draws in [0, 1)."""
    high = high.clamp(min=low)
    return (low + (uniform * (high - low + 1)).floor().long()).clamp(max=high)


def logit_normal(uniform: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """s = sigmoid(mean + std·z), z the standard normal quantile of `uniform` ∈ (0, 1): logit-normal fractions."""
    return torch.sigmoid(mean + std * torch.special.ndtri(uniform.clamp(1e-6, 1 - 1e-6)))


class ModelError(Dmd2Error, RuntimeError):
    """A model directory is missing, not in the normalised format, or does not match its config."""


class Family(ABC):
    """One teacher family, configured by a model's config.json (`self.config`)."""

    name: str
    sampler_name: str  # the teacher's own sampler, for tables ("Heun", "DDIM")
    # params.yaml's `teacher:` block of this family (`dmd2.config.Params.current` reads it): with `source` (train:
    # the teacher stage trains `build_network` on `teacher_loss`, with `dmd2.config.TeacherTraining`'s settings;
    # anything else: `import_teacher`)
    schema: type[BaseModel]

    def __init__(self, config: dict[str, Any]):
        self.config = config

    @staticmethod
    @abstractmethod
    def teacher_config(cfg: Any, sample_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
        """The config.json of a teacher from params.yaml's `teacher:` block of this family (trained here on
        samples of `sample_shape` with `num_classes` classes, or recorded from a pretrained model)."""

    @staticmethod
    def import_teacher(cfg: Any, sample_shape: tuple[int, ...], num_classes: int,
                       root: Path) -> tuple[dict[str, Any], Any]:
        """A teacher not trained here (`teacher.source` other than train): its config.json and its weights (a state
        dict, or None when the config records them by reference); relative input paths are relative to `root`."""
        raise ModelError(f"teacher.source: {cfg.source} is not available for the {cfg.family} family")

    @staticmethod
    def architecture_config(cfg: Any, root: Path) -> dict[str, Any]:
        """The teacher's config.json from config files alone, no weights (`dmd2 memory` estimates from it before
        the teacher is downloaded or trained): a copy of a released teacher's (`ARCHITECTURES`), else the teacher's
        own files where the family can find them."""
        raise ModelError(f"the {cfg.family} family makes a teacher's architecture from its data or weights only")

    # ------------------------------------------------------------------------------------------ network

    @abstractmethod
    def build_network(self) -> nn.Module:
        """A randomly initialised network of the configured architecture."""

    def load_network(self, model_dir: Path) -> nn.Module:
        """The network with the weights stored in (or referenced by) `model_dir`."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        net = self.build_network()
        weights = Path(model_dir) / "model.safetensors"
        try:
            state = load_file(weights)
        except (OSError, SafetensorError) as err:
            raise ModelError(f"{weights} cannot be read ({err}); rerun the stage that wrote it") from None
        config = Path(model_dir) / "config.json"
        try:
            missing, unexpected = net.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of another shape
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
            raise ModelError(f"{weights} does not match {config} ({detail}); rerun the stage that wrote it") from None
        if missing or unexpected:
            raise ModelError(f"{weights} does not match {config} (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                             "rerun the stage that wrote it")
        return net

    def add_lora(self, net: nn.Module, rank: int, alpha: float) -> nn.Module:
        """Freeze `net` and attach trainable low-rank adapters (a LoRA generator)."""
        raise ModelError(f"distill.lora is not available for the {self.name} family (diffusers UNets only)")

    def fuse_lora(self, state: dict[str, torch.Tensor], rank: int,
                  alpha: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A LoRA generator's state dict → (the network's own weights with the adapters fused in, the adapters)."""
        raise ModelError(f"distill.lora is not available for the {self.name} family (diffusers UNets only)")

    @abstractmethod
    def enable_gradient_checkpointing(self, net: nn.Module) -> None:
        """Recompute activations in backward (memory for compute)."""

    # ------------------------------------------------------------------------------- shapes, conditions

    @property
    @abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample the networks see (pixels, or latents)."""

    @property
    def num_classes(self) -> int:
        """Class labels the model is conditioned on (0: not class-conditional)."""
        return int(self.config.get("num_classes", 0))

    def random_conditions(self, n: int, draw) -> torch.Tensor | None:
        """Raw conditions for n generated samples (labels uniform over the classes), drawn from `draw`
        (`GlobalBatchRandom`, so every rank draws the global batch and keeps its slice)."""
        return draw.randint(0, self.num_classes, n, "cpu") if self.num_classes else None

    def balanced_conditions(self, n: int) -> torch.Tensor | None:
        """Raw conditions for evaluation: every class equally often, in order 0, 1, …, 0, 1, …"""
        return torch.arange(n) % self.num_classes if self.num_classes else None

    def balanced_labels(self, n: int) -> torch.Tensor | None:
        """The class label of each of `balanced_conditions(n)` where one is known (class accuracy), else None."""
        return self.balanced_conditions(n)

    def grid_conditions(self, rows: int) -> tuple[Any, int]:
        """Raw conditions for a sample grid with `rows` rows (one seed each) and one column per condition (class),
        row by row; and the column count."""
        if not self.num_classes:
            return None, rows
        return torch.arange(self.num_classes).repeat(rows), self.num_classes

    def use_data(self, data_dir: Path) -> None:
        """Read the conditions that come from the experiment's data (`prepare-data`'s outputs in `data_dir`), such
        as a text-to-image family's prompts. Class-conditional and unconditional families need none."""
        return None

    def keep_frozen_weights_in(self, dtype: torch.dtype) -> None:
        """Hold the family's own frozen networks (a text-to-image family's text encoders) in `dtype` from now on
        (bf16 runs: half their memory); what they compute is still handed on in float32. Most families have none."""
        return None

    def frozen_networks(self) -> dict[str, nn.Module]:
        """Meta-device skeletons of the frozen networks besides the teacher that a distillation keeps on its GPU (a
        text-to-image family's text encoders and VAE), by name: what `dmd2 memory` counts. Most families have none."""
        return {}

    def memory_conditions(self, n: int) -> Any:
        """Encoded conditions of `n` samples with the shapes training gives the network, made without running any
        encoder (`dmd2 memory` passes them to fake-tensor networks)."""
        return self.encode_conditions(self.balanced_conditions(n), "cpu")

    @property
    def latent_space(self) -> bool:
        """Whether samples are latents (real data comes from the data stage's latents LMDB) rather than pixels."""
        return False

    # ------------------------------------------------------------------------------------- the data stage

    rgb_images: bool = False  # the data stage stores grey source images as RGB (a VAE reads three channels)

    @staticmethod
    def check_data(data_cfg: Any, teacher_cfg: Any, source: Any, root: Path) -> Any:
        """Check what the family's own data files need (`prepare_data`) before the data stage writes anything, and
        return what `prepare_data` takes. Most families need nothing beyond the image LMDBs."""
        return None

    @staticmethod
    def prepare_data(out_dir: Path, data_cfg: Any, teacher_cfg: Any, checked: Any, splits: dict[str, Any],
                     root: Path) -> dict[str, Any]:
        """Write the family's own data files beside the image LMDBs in `out_dir` (a latent family's encoded
        training images, a text-to-image family's prompts; `splits`: the source's train/heldout indices) and return
        their record counts for the stage record."""
        return {}

    def real_samples(self, data_dir: Path) -> Any:
        """The real training samples, when they are not the training images (`train.lmdb`) themselves: a latent
        family's encoded images. None: the images."""
        return None

    # ------------------------------------------------------------------------------------------ export

    @property
    def exports_pipeline(self) -> bool:
        """Whether a student of this family also ships in its ecosystem's own format (`export_student`), which
        distillation then writes beside it."""
        return False

    def export_student(self, student: Any, student_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Write a loaded student (`dmd2.families.Model`) into the new directory `out_dir` in its ecosystem's own
        format (a diffusers pipeline), and return what the export's marker file records beside its timesteps and
        source: `call`, the keyword arguments that sample it as trained, and anything else a user needs."""
        raise ModelError(f"{student_dir}: students of the {self.name} family have no export format; `dmd2 generate` "
                         "samples them")

    @abstractmethod
    def encode_conditions(self, raw: torch.Tensor | None, device: torch.device | str) -> Any:
        """Raw conditions (labels, −1 = unconditional) → what the network takes."""

    @abstractmethod
    def unconditional(self, cond: Any) -> Any:
        """The family's own unconditional input for a batch of encoded conditions (the CFG branch)."""

    @property
    def has_unconditional_branch(self) -> bool:
        """Whether the network learned what `unconditional` gives it (label dropout, empty prompts), so that
        classifier-free guidance means something."""
        return True

    # ------------------------------------------------------------------------------ noise and predictions

    @property
    @abstractmethod
    def num_train_timesteps(self) -> int:
        """Length of the discrete noise table."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t: a clean sample noised to timestep t (forward process)."""

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        """Unit Gaussian noise of `shape` (a batch of samples) from `generator`, as the family's exported pipeline
        draws it when it re-noises between a student's steps (so `dmd2 generate` and the export agree)."""
        return torch.randn(shape, generator=generator)

    @abstractmethod
    def generator_input(self, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The generator's input at timestep t made from unit Gaussian noise alone (no clean sample)."""

    @abstractmethod
    def denoise(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """One network call, as an x0 prediction in float32."""

    def predict_x0(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                   guidance_scale: float = 1.0) -> torch.Tensor:
        """x0 prediction at timestep t, with classifier-free guidance when `guidance_scale` is not 1."""
        return self.guided(lambda c: self.denoise(net, x_t, t, c), cond, guidance_scale)

    def guided(self, denoise: Callable[[Any], torch.Tensor], cond: Any, guidance_scale: float) -> torch.Tensor:
        """Classifier-free guidance in x0 space, x̂_u + s·(x̂_c − x̂_u), for a `denoise(cond)` at fixed (x_t, t).

        The one place guidance is written (training, `generate`, `evaluate`, the teachers' samplers). Guidance is
        linear in the network output, so guiding x0 equals guiding ε or v at the same (x_t, t)."""
        x0 = denoise(cond)
        if guidance_scale == 1.0 or cond is None:
            return x0
        if not self.has_unconditional_branch:
            raise ModelError(f"guidance scale {guidance_scale} needs an unconditional branch, which this {self.name} "
                             "network never learned (trained without label dropout, as EDM's released checkpoints "
                             "are): set distill.real_guidance_scale and the sampler's guidance_scale to 1")
        x0_uncond = denoise(self.unconditional(cond))
        return x0_uncond + guidance_scale * (x0 - x0_uncond)

    def dm_timesteps(self, n: int, draw, device: torch.device | str, low: int, high: int,
                     cap: torch.Tensor | None = None, times: str = "uniform",
                     logit: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Timestep indices of the DM loss's noise, one per sample, from `draw` (`GlobalBatchRandom`): uniform over
        {low, …, high} (DMD2's 20…980), or with a per-sample `cap` (`distill.dm_noise_below_input`) over
        {low, …, min(cap_i, high)}; `times` "logit_normal" (`distill.dm_times`) puts the same range's fraction at
        s = sigmoid(mean + std·z) instead of uniform. A family may draw otherwise."""
        if times == "uniform" and cap is None:
            return draw.randint(low, high + 1, n, device)  # the original's draw: runs from before the option repeat
        high_per_sample = torch.full((n,), high, device=device) if cap is None else cap.clamp(max=high)
        fraction = draw.rand(n, device)
        if times == "logit_normal":
            fraction = logit_normal(fraction, *logit)
        return uniform_timesteps_up_to(fraction, low, high_per_sample)

    def gan_timesteps(self, n: int, draw, device: torch.device | str, high: int) -> torch.Tensor:
        """Timestep indices at which the diffusion-GAN head sees real and generated samples: uniform over
        {0, …, high − 1} (`distill.gan.diffusion_max_timestep`). A family may draw otherwise."""
        return draw.randint(0, high, n, device)

    def critic_timesteps(self, n: int, draw, device: torch.device | str, times: str = "uniform",
                         logit: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Timestep indices of the critic's denoising loss (`fake_score_loss`), one per sample, from `draw`
        (`GlobalBatchRandom`): uniform over the whole table, or `times` "logit_normal": the table's fraction
        s = sigmoid(mean + std·z) (`logit` = (mean, std)), index ⌈s·N⌉ − 1. A family may draw otherwise."""
        if times == "uniform":
            return draw.randint(0, self.num_train_timesteps, n, device)
        s = logit_normal(draw.rand(n, device), *logit)
        return (s * self.num_train_timesteps).ceil().long().clamp(1, self.num_train_timesteps) - 1

    @abstractmethod
    def fake_score_loss(self, net: nn.Module, x0: torch.Tensor, t: torch.Tensor, cond: Any,
                        noise: torch.Tensor) -> torch.Tensor:
        """The critic's own denoising loss on (detached) generator samples x0 at timesteps t."""

    # --------------------------------------------------------------------------------------- GAN head

    @abstractmethod
    def gan_features(self, net: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The critic's features the diffusion-GAN head classifies: maps (N × C × H × W) or tokens (N × L × D)."""

    @property
    @abstractmethod
    def gan_feature_shape(self) -> tuple[int, ...]:
        """(C, H, W) or (L, D) of `gan_features` for one sample: it picks the head (`dmd2.critic.gan_head`)."""

    # -------------------------------------------------------------------------------------- teacher

    @abstractmethod
    def teacher_loss(self, net: nn.Module, x0: torch.Tensor, cond: Any) -> torch.Tensor:
        """The family's own training objective (the teacher stage), drawing its noise from torch's RNG."""

    @abstractmethod
    def sample_teacher(self, net: nn.Module, noise: torch.Tensor, cond: Any, num_steps: int,
                       guidance_scale: float = 1.0) -> torch.Tensor:
        """The teacher's own multi-step sampler: unit Gaussian noise → x0 (float32)."""

    @abstractmethod
    def teacher_nfe(self, num_steps: int) -> int:
        """Network evaluations of `sample_teacher` with `num_steps` steps at the default guidance scale."""

    @property
    def default_teacher_steps(self) -> int:
        return int(self.config["sampler"]["num_steps"])

    @property
    def default_guidance_scale(self) -> float:
        """Classifier-free guidance of the teacher's own sampler when the caller names none."""
        return float(self.config["sampler"].get("guidance_scale", 1.0))

    # ---------------------------------------------------------------------------------------- pixels

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples → images in [−1, 1] (pixel-space families: the samples themselves)."""
        return x

    def pixel_decoder(self, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
        """Samples → images in [−1, 1] in float32, differentiable (a loss on pixels trains through it), on `device`."""
        return lambda x: x.float()


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """A model directory's config.json, checked to be the normalised format."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.exists():
        raise ModelError(f"no model at {model_dir} (missing {cfg_file}); run the stage that writes it "
                         "(`dmd2 teacher` or `dmd2 distill`) first")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{cfg_file} is not valid JSON ({err}); rerun the stage that wrote it") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ModelError(f"{cfg_file}: format {found!r}, expected {FORMAT!r}; rerun the stage that wrote it")
    return config
