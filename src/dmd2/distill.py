"""DMD2 distillation: the two-time-scale loop, backward simulation and resumable state.

The loop talks to the teacher's family only through the `Family` interface (`dmd2.families`): it never names a
network architecture, a noise parameterisation or a kind of condition.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list
from torch import nn

from dmd2.checkpoint import (
    BackgroundWriter,
    TrainingParts,
    begin_checkpoint,
    checkpoint_at_or_refuse,
    commit_checkpoint,
    full_state_dict,
    load_latest,
    load_training_state,
    one_writer,
    pending_checkpoint,
    read_checkpoint,
    rng_state,
    run_directory,
    save_training_state,
    set_rng_state,
    snapshot_training_state,
    training_state_path,
    write_training_state,
    writing,
)
from dmd2.config import ConfigError, DistillConfig, LaunchConfig, batch_shares, to_dict
from dmd2.critic import Critic, StepCritics, gan_head
from dmd2.data import DataError, RandomBatches, open_split, read_meta
from dmd2.errors import TrainingDiverged
from dmd2.families import LORA_FILE, Family, Model, load_model, save_model, student_config
from dmd2.losses import distribution_matching_loss, dm_step_range, gan_generator_loss
from dmd2.paths import ExperimentPaths
from dmd2.regression import PairDataset, loss_function, make_pairs, start_weights
from dmd2.sampling import few_step_sample, fixed_noise, grid_conditions, save_grid, to_uint8
from dmd2.sharding import device_mesh, fill_from_rank0, full_weights, shard, shards
from dmd2.stage import StageContext
from dmd2.stopping import stop_requests
from dmd2.training import (
    GlobalBatchRandom,
    adamw,
    all_ranks_agree,
    clip_gradients,
    ema_update_,
    gradient_sync,
    over_micro_batches,
    progress_keys,
    take_rows,
    warmed_up_decay,
    warmup_schedule,
)

# Settings that only say how far or how visibly to train: changing them resumes the same run.
DISTILL_PROGRESS_KEYS = {"steps", "checkpoint_every", "keep_last", "log_every", "sample_every"}


@dataclass
class Batch:
    """What one iteration needs besides noise: its size, encoded conditions (or None) and, with the GAN or
    forward-noised multi-step training, a real batch with its own conditions; with `distill.regression_weight`, on
    generator turns, a batch of the teacher's pairs (its samples, their noise, their conditions)."""

    size: int
    cond: Any = None
    real: torch.Tensor | None = None
    real_cond: Any = None
    pair_target: torch.Tensor | None = None
    pair_noise: torch.Tensor | None = None
    pair_cond: Any = None

    def split(self, count: int) -> list[Batch]:
        """`count` micro-batches of equal size, in order (every tensor with the batch's rows is cut alike)."""
        if count == 1:
            return [self]
        n = self.size // count
        fields = (self.cond, self.real, self.real_cond, self.pair_target, self.pair_noise, self.pair_cond)
        return [Batch(n, *(take_rows(value, self.size, slice(i * n, (i + 1) * n)) for value in fields))
                for i in range(count)]


def new_generator(family: Family, teacher: nn.Module, cfg: DistillConfig,
                  start: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The generator starts as the teacher: a trainable copy, or (distill.lora) a frozen copy with fresh low-rank
    adapters, drawn from the run's seed apart from the main random stream; or from `start`, the weights of the
    regression pre-training stage (`dmd2.regression`)."""
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    if start is not None:
        generator.load_state_dict(start)
    if cfg.lora.enabled:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            family.add_lora(generator, cfg.lora.rank, cfg.lora.alpha)
    return generator


def new_gan_head(family: Family, seed: int) -> nn.Module:
    """The diffusion-GAN head for the family's critic features (maps or tokens), initialised identically on every
    rank."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return gan_head(family.gan_feature_shape)


class DMD2Trainer:
    """Owns the generator, the critic, both optimisers and schedulers, and one iteration of DMD2.

    With `launch.distributed: fsdp` (and more than one process) every network is sharded with FSDP2 (see
    `dmd2.sharding`); otherwise accelerate prepares the two trained models (DDP, or nothing on one process).
    """

    def __init__(self, family: Family, teacher: nn.Module, generator: nn.Module, critic_score: nn.Module,
                 gan_head: nn.Module | None, cfg: DistillConfig, accelerator: Accelerator,
                 launch: LaunchConfig | None = None, teacher_weights: dict[str, torch.Tensor] | None = None,
                 generator_weights: dict[str, torch.Tensor] | None = None, accumulation: int = 1):
        """Sharded runs may pass the networks as meta-device skeletons (see `run_distill`): each is sharded, then
        filled from `teacher_weights` (rank 0: `full_weights` of the teacher; None elsewhere), which rank 0
        broadcasts shard by shard; the generator from `generator_weights` where it does not start as the teacher (a
        LoRA generator: the teacher with its adapters; a regression-pretrained one). `accumulation`: the
        micro-batches each rank's share of the batch is cut into (`launch.micro_batch`)."""
        self.family, self.cfg, self.acc, self.accumulation = family, cfg, accelerator, accumulation
        self.shape = family.sample_shape
        self.draw = GlobalBatchRandom(accelerator.process_index, accelerator.num_processes)
        critic = self._new_critic(critic_score, gan_head)
        critics = list(critic.critics) if isinstance(critic, StepCritics) else [critic]
        critic_scores = [c.score for c in critics]
        self.sharded = shards(launch, accelerator.num_processes)
        if cfg.mixed_precision == "bf16":  # the frozen teacher is only ever read under bf16 autocast: half its memory
            teacher = teacher.to(torch.bfloat16)
            family.keep_frozen_weights_in(torch.bfloat16)  # the text encoders too
        self.teacher = _to(teacher.requires_grad_(False).eval(), accelerator.device)
        # the generator's weight average: a frozen copy, sharded like the generator so its shards line up
        self.generator_ema = (_to(copy.deepcopy(generator).requires_grad_(False).eval(), accelerator.device)
                              if cfg.ema_decay > 0 else None)
        self._average_views = None  # see _update_average
        # fsdp.activation_checkpointing asks for the same thing as distill.gradient_checkpointing: honour either
        if cfg.gradient_checkpointing or (self.sharded and launch.fsdp.activation_checkpointing):
            for net in (generator, *critic_scores):
                family.enable_gradient_checkpointing(net)
        if self.sharded:
            # Shard before building the optimisers, so that they hold (and checkpoint) only this rank's shards.
            mesh = device_mesh(launch, accelerator.num_processes, accelerator.device.type)
            copies = [net for net in (generator, *critic_scores, self.teacher, self.generator_ema) if net is not None]
            for net in [*copies, *(c.head for c in critics)]:
                if net is not None:
                    shard(_to(net, accelerator.device), launch.fsdp, mesh)
            if any(_on_meta(net) for net in copies):
                for net in copies:  # each starts as the teacher, or the generator from `generator_weights`
                    source = generator_weights if net in (generator, self.generator_ema) else None
                    fill_from_rank0(net, source or teacher_weights, accelerator.device)
            accelerator.print(f"FSDP2 {launch.fsdp.sharding_strategy} over the mesh "
                              f"{dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))}")
        opt = dict(weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
        # only what trains: a LoRA generator's frozen base weights get no optimiser state
        opt_g = adamw([p for p in generator.parameters() if p.requires_grad], lr=cfg.generator_lr, **opt)
        opt_c = adamw(critic.parameters(), lr=cfg.critic_lr, **opt)
        self.opt_g, self.opt_c = opt_g, opt_c
        if self.sharded:
            self.generator, self.critic = generator, critic
        else:
            # accelerate prepares the models (DDP across processes) but not the optimisers: its optimiser wrapper
            # serves its own gradient accumulation (ours is in train_step) and fp16 loss scaling, and inspects a
            # signature at every zero_grad (benchmarks/distill_overhead.py). DDP keeps the parameters the optimisers hold.
            self.generator, self.critic = accelerator.prepare(generator, critic)
        # the bare modules under accelerate's wrappers (DDP), looked up once: unwrap_model costs a millisecond
        self.generator_module = accelerator.unwrap_model(self.generator)
        self._critic_module = accelerator.unwrap_model(self.critic)
        self.sched_g = warmup_schedule(self.opt_g, cfg.warmup_steps, cfg.lr_scheduler, cfg.steps)
        self.sched_c = warmup_schedule(self.opt_c, cfg.warmup_steps, cfg.lr_scheduler, cfg.steps)
        self.dm_range = dm_step_range(family.num_train_timesteps, cfg.min_step_percent, cfg.max_step_percent)
        self.regression_loss = None  # (generator samples, teacher samples) → loss: set with the pairs (run_distill)

    # ---------------------------------------------------------------------------------------------- pieces

    def _new_critic(self, score: nn.Module, head: nn.Module | None) -> Critic | StepCritics:
        """One critic for every step, or (distill.critic_per_step) one per step, each from copies of the first's
        fake score and GAN head (the teacher's weights, or a meta skeleton filled later, and the head's start)."""
        cfg = self.cfg

        def critic(score: nn.Module, head: nn.Module | None) -> Critic:
            return Critic(self.family, score, head, cfg.gan.diffusion_max_timestep, self.draw, cfg.critic_times,
                          cfg.critic_logit_normal)

        if not cfg.critic_per_step:
            return critic(score, head)
        copies = [(copy.deepcopy(score), copy.deepcopy(head)) for _ in cfg.denoising_timesteps[1:]]
        return StepCritics([critic(score, head), *(critic(*pair) for pair in copies)])

    def step_of(self, t: torch.Tensor) -> torch.Tensor:
        """Each row's student step (its index in denoising_timesteps) from the timestep of its generator input."""
        steps = torch.tensor(self.cfg.denoising_timesteps, device=t.device)
        return (t[:, None] == steps).int().argmax(dim=1)

    @property
    def student_module(self) -> nn.Module:
        """What the run exports and samples from: the generator's weight average if there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator_module

    @property
    def critic_module(self) -> Critic | StepCritics:
        return self._critic_module

    @property
    def forward_noises_real(self) -> bool:
        """Multi-step training without backward simulation starts from forward-noised real samples."""
        return len(self.cfg.denoising_timesteps) > 1 and not self.cfg.backward_simulation

    def _autocast(self):
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def _same_on_all_ranks(self, value: int) -> int:
        """Rank 0's value everywhere: every rank must run the same number of generator passes (FSDP collectives)."""
        tensor = torch.tensor([value], device=self.acc.device)
        if self.acc.num_processes > 1:
            tensor = broadcast(tensor, from_process=0)
        return int(tensor.item())

    def _critic_trainable(self, trainable: bool) -> None:
        """Switch the critic's and GAN head's gradients (the original also re-enables the frozen teacher's here),
        so the generator turn's backward computes none for them. The critic optimiser's list is exactly these
        parameters, without a walk over the modules; under FSDP2 both are the sharded parameters between passes."""
        for group in self.opt_c.param_groups:
            for param in group["params"]:
                param.requires_grad_(trainable)

    def _update_average(self, updates: int) -> None:
        """The generator's weight average takes this update. The two state dicts are views of the weights, looked
        up at the first update (after any resume has loaded weights into them, in place) and kept: building them
        at every update cost more than the average itself on small networks."""
        if self._average_views is None:
            self._average_views = (self.generator_ema.state_dict(), self.generator_module.state_dict())
        ema_update_(*self._average_views, warmed_up_decay(self.cfg.ema_decay, updates))

    def _full(self, n: int, t: int) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=self.acc.device)

    def generator_input(self, n: int, cond: Any, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x_t, t) the generator is trained on this iteration."""
        steps, family = self.cfg.denoising_timesteps, self.family
        z = self.draw.randn(n, self.shape, self.acc.device)
        if len(steps) == 1:
            t = self._full(n, steps[0])
            return family.generator_input(z, t), t
        if self.cfg.backward_simulation:
            # Backward simulation: roll the current student out for k steps from pure noise (no grad) and train at
            # step k, so training inputs come from the student's own distribution, as at inference.
            if self.cfg.critic_per_step:  # row i of the global batch: step i mod N, equal shares for every critic
                return self._rolled_out_per_sample(z, cond, self.draw.positions(n, self.acc.device) % len(steps))
            if self.cfg.step_per_sample:
                return self._rolled_out_per_sample(z, cond, self.draw.randint(0, len(steps), n, self.acc.device))
            k = self._same_on_all_ranks(int(torch.randint(len(steps), (1,))))
            if k == 0:
                return family.generator_input(z, self._full(n, steps[0])), self._full(n, steps[0])
            with torch.no_grad(), self._autocast():
                x0 = few_step_sample(family, self.generator, z, cond, steps[:k], self.draw.randn_like)
            return family.add_noise(x0, self.draw.randn_like(x0), self._full(n, steps[k])), self._full(n, steps[k])
        if real is None:
            raise ValueError("multi-step training without backward_simulation forward-noises real data: "
                             "enable distill.gan (which loads real batches) or set distill.backward_simulation: true")
        t = torch.tensor(steps, device=self.acc.device)[self.draw.randint(0, len(steps), n, self.acc.device)]
        x_t = family.add_noise(real, self.draw.randn_like(real), t)
        pure = (t == steps[0]).reshape(-1, *[1] * len(self.shape))
        return torch.where(pure, family.generator_input(z, t), x_t), t

    def _rolled_out_per_sample(self, z: torch.Tensor, cond: Any, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward simulation with a step per sample (`k`): the whole batch is rolled out through every step (the
        same number of network calls on every rank, as sharded training needs) and each sample keeps its input at
        its own step."""
        steps, family, n = self.cfg.denoising_timesteps, self.family, len(z)
        x_t = family.generator_input(z, self._full(n, steps[0]))
        chosen = x_t.clone()
        with torch.no_grad(), self._autocast():
            for j in range(1, len(steps)):
                x0 = family.predict_x0(self.generator, x_t, self._full(n, steps[j - 1]), cond).float()
                x_t = family.add_noise(x0, self.draw.randn_like(x0), self._full(n, steps[j]))
                here = (k == j).reshape(-1, *[1] * (x_t.dim() - 1))
                chosen = torch.where(here, x_t, chosen)
        return chosen, torch.tensor(steps, device=self.acc.device)[k]

    def dm_timesteps(self, t_in: torch.Tensor) -> torch.Tensor:
        """The DM loss's noise level per sample: U{min … max step}; with `dm_noise_below_input`, an output the
        generator made from a noisy input at t (not the first step, whose input is pure noise) draws at most t."""
        low, high = self.dm_range
        cap = None
        if self.cfg.dm_noise_below_input:
            from_noise = t_in == self.cfg.denoising_timesteps[0]
            cap = torch.where(from_noise, torch.full_like(t_in, high), t_in)
        return self.family.dm_timesteps(len(t_in), self.draw, t_in.device, low, high, cap, self.cfg.dm_times,
                                        self.cfg.dm_logit_normal)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Few-step generation as at inference (fresh re-noising noise from torch's RNG)."""
        if noise is None:
            noise = torch.randn((n, *self.shape), device=self.acc.device)
        generator = self.student_module
        return few_step_sample(self.family, generator, noise, cond, self.cfg.denoising_timesteps, torch.randn_like)

    # ---------------------------------------------------------------------------------------------- the step

    def generator_turn(self, step: int) -> bool:
        """Whether iteration `step` updates the generator (every dfake_gen_update_ratio-th; the critic every one)."""
        return step % self.cfg.dfake_gen_update_ratio == 0

    def train_step(self, step: int, batch: Batch) -> dict[str, float]:
        """One iteration on this rank's share of the global batch, cut into `accumulation` micro-batches. On a
        generator turn (every dfake_gen_update_ratio-th iteration) each micro-batch's generator loss, divided by
        their number, is backpropagated (gradients add up), then the generator steps once; the critic turn does the
        same on the generated samples, detached, then the critic steps once. Both schedulers step once. With one
        micro-batch this is the whole batch at once; with several, the same up to float summation order."""
        cfg, parts = self.cfg, batch.split(self.accumulation)
        compute_generator = self.generator_turn(step)
        if compute_generator:
            self._critic_trainable(False)  # the generator turn updates the generator only
        passes = over_micro_batches(self.draw, parts, lambda part: self._generator_pass(step, part, compute_generator))
        metrics = _mean_of([m for *_, m in passes])
        if compute_generator:
            metrics["grad_norm_generator"] = clip_gradients(self.opt_g, cfg.max_grad_norm)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            if self.generator_ema is not None:
                self._update_average(step // cfg.dfake_gen_update_ratio)  # generator steps before this one
            self._critic_trainable(True)  # it had no gradients to clear: none were computed for it
        self.sched_g.step()  # every iteration, generator turn or not: warm-up counts iterations

        # Critic turn, on the same (detached) generator samples.
        samples = [(part, *made) for part, (*made, _) in zip(parts, passes, strict=True)]
        metrics.update(_mean_of(over_micro_batches(self.draw, samples, lambda s: self._critic_pass(step, *s))))
        metrics["grad_norm_critic"] = clip_gradients(self.opt_c, cfg.max_grad_norm)
        self.opt_c.step()
        self.opt_c.zero_grad(set_to_none=True)
        self.sched_c.step()
        metrics.update(lr_generator=self.sched_g.get_last_lr()[0], lr_critic=self.sched_c.get_last_lr()[0])
        return metrics

    def _generator_pass(self, step: int, part: Batch, compute_generator: bool
                        ) -> tuple[torch.Tensor, Any, torch.Tensor, dict]:
        """The generator's output on one micro-batch with its conditions and each row's step, and on a generator turn
        the backward of its loss."""
        cfg, metrics = self.cfg, {}
        # forward-noised real samples keep their own conditions; otherwise the batch's generated conditions
        cond = part.real_cond if self.forward_noises_real else part.cond
        x_in, t_in = self.generator_input(part.size, cond, part.real)
        steps = self.step_of(t_in) if self.cfg.critic_per_step else None  # which critic judges each row
        with gradient_sync(self.generator, self._last_micro_batch):  # around the forward: DDP decides there
            with torch.set_grad_enabled(compute_generator), self._autocast():
                x = self.family.predict_x0(self.generator, x_in, t_in, cond).float()
            if compute_generator:
                with self._autocast():
                    loss_dm, dm_stats, loss_gan_g = self._generator_losses(x, cond, t_in, steps)
                    loss_g = cfg.dm_loss_weight * loss_dm
                    if loss_gan_g is not None:
                        loss_g = loss_g + cfg.gan.gen_weight * loss_gan_g
                        metrics["loss_gan_generator"] = loss_gan_g.item()
                if part.pair_target is not None:
                    loss_reg = self._regression_term(part)
                    loss_g = loss_g + cfg.regression_weight * loss_reg
                    metrics["loss_regression"] = loss_reg.item()
                self._check_finite({"loss_generator": loss_g, **dm_stats}, "generator", step)
                self.acc.backward(self._share(loss_g))
                metrics.update(loss_dm=loss_dm.item(), loss_generator=loss_g.item(), **dm_stats)
        return x.detach(), cond, steps, metrics

    def _generator_losses(self, x: torch.Tensor, cond: Any, t_in: torch.Tensor, steps: torch.Tensor | None
                          ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        """The DM loss (with its statistics) and the GAN's generator loss (None without the GAN) on the generator's
        outputs x, each row judged by its step's critic (`steps`: with a critic per step); each loss is the sum of
        the critics' losses weighted by their shares of the rows, so the batch mean."""
        cfg, n = self.cfg, len(x)
        t_dm, noise = self.dm_timesteps(t_in), self.draw.randn_like(x)
        pieces = self.critic_module.by_step(steps, n)
        loss_dm, stats = torch.zeros((), device=x.device), {}
        for critic, rows, share in pieces:
            loss, piece_stats = distribution_matching_loss(self.family, self.teacher, critic.score, x[rows],
                                                           take_rows(cond, n, rows), t_dm[rows], noise[rows],
                                                           cfg.real_guidance_scale, cfg.fake_score_fp32)
            loss_dm = loss_dm + share * loss
            for key, value in piece_stats.items():
                stats[key] = stats.get(key, 0.0) + share * value
        if not self.critic_module.has_gan:
            return loss_dm, stats, None
        loss_gan = torch.zeros((), device=x.device)
        for critic, rows, share in pieces:
            loss_gan = loss_gan + share * gan_generator_loss(critic.logits(x[rows], take_rows(cond, n, rows)))
        return loss_dm, stats, loss_gan

    def _regression_term(self, part: Batch) -> torch.Tensor:
        """DMD's regression loss on one micro-batch of teacher pairs: the generator's first step from each pair's
        noise against the teacher's sample from the same noise (a second forward pass, under the same sync)."""
        t = self._full(len(part.pair_noise), self.cfg.denoising_timesteps[0])
        with self._autocast():
            x = self.family.predict_x0(self.generator, self.family.generator_input(part.pair_noise, t), t, part.pair_cond)
        return self.regression_loss(x.float(), part.pair_target)

    def _critic_pass(self, step: int, part: Batch, x: torch.Tensor, cond: Any, steps: torch.Tensor | None
                     ) -> dict[str, float]:
        """The critic's losses on one micro-batch of generated (and real) samples, and their backward."""
        with gradient_sync(self.critic, self._last_micro_batch):
            with self._autocast():
                out = self.critic(x, cond, part.real, part.real_cond, steps)
                loss_c = out["loss_fake"] + (self.cfg.gan.critic_weight * out["loss_gan_critic"]
                                             if "loss_gan_critic" in out else 0)
            self._check_finite({"loss_critic": loss_c}, "critic", step)
            self.acc.backward(self._share(loss_c))
        return {**{k: v.item() for k, v in out.items()}, "loss_critic": loss_c.item()}

    @property
    def _last_micro_batch(self) -> bool:
        """Gradients are averaged across ranks once, in the last micro-batch's backward (`gradient_sync`)."""
        return self.draw.micro == self.accumulation - 1

    def _share(self, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's part of the batch's mean loss."""
        return loss if self.accumulation == 1 else loss / self.accumulation

    def _check_finite(self, values: dict[str, Any], which: str, step: int) -> None:
        """Stop on a non-finite loss or intermediate (e.g. the DM normaliser), on every rank at once: a rank that
        stopped alone would leave the others waiting in a collective."""
        scalars = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in values.items()}
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}  # losses and statistics
        if _all_ranks(not bad, self.acc):
            return
        what = ", ".join(f"{k} = {v}" for k, v in bad.items()) or "a value on another rank"
        raise TrainingDiverged(f"the {which} turn produced {what} at iteration {step}; stopping before any "
                               "checkpoint is written, so the last good checkpoint is intact. Lower the learning rates "
                               "(distill.generator_lr / distill.critic_lr) or real_guidance_scale and rerun to resume.")

    # ---------------------------------------------------------------------------------------------- state

    def training_parts(self) -> TrainingParts:
        """What `save_training_state` writes: each trained model with its optimiser (and the generator's average)."""
        parts = {"generator": (self.generator_module, self.opt_g), "critic": (self.critic_module, self.opt_c)}
        if self.generator_ema is not None:
            parts["generator_ema"] = (self.generator_ema, None)
        return parts

    def scheduler_states(self) -> dict[str, Any]:
        return {"sched_g": self.sched_g.state_dict(), "sched_c": self.sched_c.state_dict()}

    def load_scheduler_states(self, states: dict[str, Any]) -> None:
        self.sched_g.load_state_dict(states["sched_g"])
        self.sched_c.load_state_dict(states["sched_c"])

    def generator_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """The student's full weights on rank 0 (a collective under FSDP; other ranks get {}), a LoRA generator's
        adapters fused in, and its adapters alone (None without LoRA)."""
        weights = full_state_dict(self.student_module, self.sharded)
        if not self.cfg.lora.enabled or not weights:
            return weights, None
        return self.family.fuse_lora(weights, self.cfg.lora.rank, self.cfg.lora.alpha)


def _on_meta(net: nn.Module) -> bool:
    return any(p.is_meta for p in net.parameters())


def _to(net: nn.Module, device: torch.device) -> nn.Module:
    """`net.to(device)`, except for a meta-device skeleton, which is filled after sharding."""
    return net if _on_meta(net) else net.to(device)


# -------------------------------------------------------------------------------------------------- the stage


def run_distill(ctx: StageContext, accelerator: Accelerator | None = None,
                resume_from: Path | None = None) -> dict[str, Any]:
    """Distil the experiment's teacher into a student in models/<exp>/student; rerunning the same command resumes
    from the run's directory under work/<exp>/distill (see `run_directory`), or from `resume_from`."""
    exp, paths, cfg = ctx.exp, ctx.paths, ctx.exp.distill
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    per_rank, accumulation = batch_shares(cfg.batch_size, acc.num_processes, exp.launch.micro_batch)
    acc.print(f"global batch {cfg.batch_size}: {acc.num_processes} process(es) × {accumulation} micro-batch(es) of "
              f"{per_rank // accumulation}")
    _check_micro_batch_holds_every_step(cfg, per_rank // accumulation)
    # Sharded, no rank builds full copies of the networks: every rank builds meta-device skeletons and only rank 0
    # reads the teacher's weights (one full copy), which fill each network's shards after sharding.
    sharded = shards(exp.launch, acc.num_processes)
    teacher = load_model(paths.teacher, weights=not sharded, data_dir=paths.data)
    family = teacher.family
    teacher_weights = generator_weights = None
    start = start_weights(ctx) if not sharded or acc.is_main_process else None  # regression pre-training's
    if sharded and acc.is_main_process:
        full_teacher = load_model(paths.teacher).net
        teacher_weights = full_weights(full_teacher)
        if cfg.lora.enabled or start is not None:  # the adapters' first weights come from rank 0 too
            generator_weights = full_weights(new_generator(family, full_teacher, cfg, start))
        del full_teacher
    _check_timesteps(cfg, family)
    _check_guidance(cfg, family)
    real = None
    if cfg.gan.enabled or (len(cfg.denoising_timesteps) > 1 and not cfg.backward_simulation):
        real = RandomBatches(real_samples(paths.data, exp.data.resolution, family), cfg.batch_size, cfg.seed,
                             rank=acc.process_index, world=acc.num_processes)

    torch.manual_seed(cfg.seed)  # the same on every rank: see GlobalBatchRandom
    generator = new_generator(family, teacher.net, cfg, None if sharded else start)
    critic_score = copy.deepcopy(teacher.net).train().requires_grad_(True)
    head = new_gan_head(family, cfg.seed) if cfg.gan.enabled else None
    trainer = DMD2Trainer(family, teacher.net, generator, critic_score, head, cfg, acc, exp.launch, teacher_weights,
                          generator_weights, accumulation)
    del teacher_weights, generator_weights  # rank 0's full copies: the shards hold the weights now

    pairs = _regression_pairs(ctx, trainer, acc) if cfg.regression_weight > 0 else None

    run_dir = None
    if acc.is_main_process:  # rank 0 hashes the teacher (gigabytes for SDXL) and tells the others
        run_dir = distill_run_directory(paths, cfg, regressed=start is not None,
                                        pairs=_pair_settings(ctx, pairs) if pairs is not None else None)
    run_dir = broadcast_object_list([run_dir])[0]
    with one_writer(run_dir, acc):
        step, elapsed = _resume(trainer, real, pairs, run_dir / "checkpoints", resume_from, cfg.steps, acc)
        return _train(ctx, trainer, teacher, real, pairs, run_dir, step, elapsed, per_rank)


def _regression_pairs(ctx: StageContext, trainer: DMD2Trainer, acc: Accelerator) -> RandomBatches:
    """The teacher's noise-sample pairs for the regression term (`regression:`'s pair settings; sampled once by a
    full-precision copy of the teacher, loaded only then, and reused from work/<exp>/regression/pairs), as endless
    batches; sets the trainer's loss (`regression.loss`)."""
    exp, paths = ctx.exp, ctx.paths
    # the loss first: missing LPIPS weights or decoder are reported before any teacher sampling
    trainer.regression_loss = loss_function(exp.regression, trainer.family, acc.device, paths.root)
    lmdb_path = make_pairs(ctx, lambda: load_model(paths.teacher, acc.device, data_dir=paths.data), acc)
    dataset = PairDataset(lmdb_path, trainer.family.sample_shape)
    return RandomBatches(dataset, exp.distill.batch_size, exp.distill.seed, rank=acc.process_index,
                         world=acc.num_processes)


def _pair_settings(ctx: StageContext, pairs: RandomBatches) -> dict[str, Any]:
    """What the regression term adds to a run's identity: which pairs (their run directory) and the loss."""
    cfg = ctx.exp.regression
    return {"run": pairs.dataset.samples.path.parent.name, "loss": cfg.loss,
            **({"lpips": to_dict(cfg.lpips), "decoder": cfg.decoder} if cfg.loss == "lpips" else {})}


# Settings added after runs existed, at the value that trains as before they existed: left out of the run's
# fingerprint, so a run started before the key was added still resumes.
KEYS_ADDED_LATER = {"dm_noise_below_input": False, "dm_times": "uniform", "dm_logit_normal": [0.0, 1.0],
                    "regression_weight": 0.0, "step_per_sample": False, "critic_per_step": False}


def distill_run_directory(paths: ExperimentPaths, cfg: DistillConfig, regressed: bool,
                          pairs: dict[str, Any] | None = None) -> Path:
    """The run directory for these settings and inputs: the teacher's files, the regressed generator (when
    distillation starts from one), the prompts the generator draws, the real data's source (the GAN's and
    forward-noised training's batches) and the regression term's pairs and loss. Any of them changed is a new run
    beside the old one."""
    inputs = [paths.teacher / "config.json", paths.teacher / "model.safetensors", paths.data / "prompts.lmdb" / "data.mdb"]
    if regressed:
        inputs.append(paths.regression / "model.safetensors")
    train = paths.data / "train.lmdb"
    data = read_meta(train) if (train / "data.mdb").exists() else None
    settings = {k: v for k, v in to_dict(cfg).items() if KEYS_ADDED_LATER.get(k, object()) != v}
    if pairs is not None:
        settings["regression_pairs"] = pairs
    return run_directory(paths.work("distill"), {**settings, "data": data},
                         progress_keys(DISTILL_PROGRESS_KEYS, cfg.lr_scheduler), [f for f in inputs if f.exists()])


def _train(ctx: StageContext, trainer: DMD2Trainer, teacher: Model, real: RandomBatches | None,
           pairs: RandomBatches | None, run_dir: Path, step: int, elapsed: float, per_rank: int) -> dict[str, Any]:
    """The loop from `step` to `distill.steps`, with logging, sample grids and checkpoints; writes the student."""
    from dmd2.tracking import MetricsLog, Wandb, progress, tracking_config

    exp, paths, cfg, acc, family = ctx.exp, ctx.paths, ctx.exp.distill, trainer.acc, trainer.family
    ckpt_dir, main = run_dir / "checkpoints", acc.is_main_process
    acc.print(f"distillation run directory: {run_dir}")
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    tracker = Wandb(ctx.params.wandb, "distill", ctx.experiment,
                    tracking_config(ctx.params, ctx.experiment, "distill", run_dir), enabled=main)
    source = {"type": "dmd2", "teacher": str(paths.teacher), "run": run_dir.name}
    bar = progress(cfg.steps, step, "distill", disable=not main)
    writer = BackgroundWriter()
    # the bar is closed on errors too, so an error line never lands on its line; the writer finishes the
    # checkpoint in flight whatever happens, so a diverged run keeps its last good one, and it writes the last
    # checkpoint while the student is written
    with bar, contextlib.closing(writer), stop_requests(exp.slurm) as stop:
        t0, last_generator = time.time(), {}

        def checkpoint(step: int) -> Path:
            ckpt = _save(trainer, acc, ckpt_dir, step, real, pairs, elapsed + time.time() - t0, cfg.keep_last,
                         student_config(teacher.config, cfg.denoising_timesteps, {**source, "iterations": step},
                                        _lora(cfg)),
                         writer)
            if tracker.logs_checkpoints:
                writer.wait()  # the artifact is the committed directory
                tracker.log_checkpoint(ckpt, f"{ctx.experiment}-distill-{run_dir.name}")
            return ckpt

        while step < cfg.steps:
            batch = Batch(per_rank, family.encode_conditions(family.random_conditions(per_rank, trainer.draw), acc.device))
            if real is not None:
                x_real, y_real = real.next()
                batch.real, batch.real_cond = x_real.to(acc.device), family.encode_conditions(y_real, acc.device)
            if pairs is not None and trainer.generator_turn(step):  # the term is a generator loss
                target, noise, raw = pairs.next()
                batch.pair_target, batch.pair_noise = target.to(acc.device), noise.to(acc.device)
                batch.pair_cond = family.encode_conditions(raw, acc.device)
            metrics = trainer.train_step(step, batch)
            if "loss_dm" in metrics:  # generator turns are every N-th iteration; log their latest values
                last_generator = {k: v for k, v in metrics.items() if k not in ("loss_fake", "loss_critic")}
            metrics = {**last_generator, **metrics}
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, **_mean_over_ranks(metrics, acc), "time_s": round(elapsed + time.time() - t0, 2)}
                log.write(record)
                tracker.log(record, step)
                bar.set_postfix(dm=f"{metrics.get('loss_dm', float('nan')):.3g}", fake=f"{metrics['loss_fake']:.3g}")
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
                grid = _sample_grid(trainer, run_dir / "samples" / f"step-{step:07d}.png", exp.eval.grid_per_class,
                                    exp.eval.seed, main)
                tracker.log_image("samples", grid, step)
            on_schedule = step % cfg.checkpoint_every == 0 or step == cfg.steps
            if on_schedule:
                ckpt = checkpoint(step)
            if step < cfg.steps and stop.requested(acc.device):  # a time limit or preemption is coming
                ckpt = ckpt if on_schedule else checkpoint(step)
                writer.wait()
                raise stop.stop(step, ckpt)
        bar.close()
        tracker.finish()
        summary = {"steps": cfg.steps, "train_seconds": round(elapsed + time.time() - t0, 1)}
        weights, adapter = trainer.generator_weights()
        if main:
            save_model(paths.student, weights, student_config(teacher.config, cfg.denoising_timesteps,
                                                              {**source, "iterations": cfg.steps}, _lora(cfg)),
                       extra_files={"metrics.jsonl": log.text_through(cfg.steps)}, extra_weights=adapter)
            if family.exports_pipeline:  # a text-to-image student also ships as a diffusers pipeline (`dmd2 export`)
                from dmd2.export import export_pipeline

                pipeline = export_pipeline(paths.student, paths.student / "pipeline")
                acc.print(f"exported a diffusers pipeline to {pipeline}")
    acc.wait_for_everyone()
    return summary


def real_samples(data_dir: Path, resolution: int, family: Family):
    """The real training samples the GAN (or forward-noised multi-step training) reads, checked against the
    teacher's sample shape: the training images, or the family's own (a latent family's encoded images)."""
    own = family.real_samples(data_dir)
    if own is not None:
        return own
    train = open_split(data_dir, "train", resolution)
    if tuple(train.shape) != tuple(family.sample_shape):
        raise DataError(f"{train.path} holds samples of shape {tuple(train.shape)}, but the teacher's samples "
                        f"are {tuple(family.sample_shape)}: the GAN compares the two; match data.resolution "
                        "to the teacher, or set distill.gan.enabled: false")
    return train


def _lora(cfg: DistillConfig) -> dict[str, Any] | None:
    """What a student's config.json records of a LoRA generator (its weights are stored fused)."""
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "file": LORA_FILE} if cfg.lora.enabled else None


def _resume(trainer: DMD2Trainer, real: RandomBatches | None, pairs: RandomBatches | None, ckpt_dir: Path,
            resume_from: Path | None, steps: int, acc: Accelerator) -> tuple[int, float]:
    """Load the explicit checkpoint, or the newest one that loads (a corrupt newer one is moved aside); returns
    (iteration, training seconds so far); (0, 0) for a fresh run."""

    def load(checkpoint: Path) -> tuple[int, float]:
        state, meta = read_checkpoint(checkpoint)
        load_training_state(training_state_path(checkpoint), trainer.training_parts())  # reshards to this run's ranks
        trainer.load_scheduler_states(state["schedulers"])
        set_rng_state(state["rng"])  # one stream for all ranks (GlobalBatchRandom), whatever their number
        if real is not None:
            real.load_state_dict(state["data"])
        if pairs is not None:
            pairs.load_state_dict(state["pairs"])
        return meta["step"], meta.get("train_seconds", 0.0)

    resume_from = resume_from or checkpoint_at_or_refuse(ckpt_dir, steps, "distill.steps")
    if resume_from is not None:
        found = (resume_from, load(resume_from))
    else:
        found = load_latest(ckpt_dir, load, acc.print, lambda ok: _all_ranks(ok, acc))
    if found is None:
        return 0, 0.0
    checkpoint, (step, elapsed) = found
    acc.print(f"resuming distillation from {checkpoint} (iteration {step})")
    return step, elapsed


def _all_ranks(ok: bool, acc: Accelerator) -> bool:
    """True only where every rank says True (a collective under several processes)."""
    return all_ranks_agree(ok, acc.device)


def _check_guidance(cfg: DistillConfig, family: Family) -> None:
    if cfg.real_guidance_scale != 1.0 and not family.has_unconditional_branch:
        raise ConfigError(f"distill.real_guidance_scale is {cfg.real_guidance_scale}, but the teacher never learned an "
                          "unconditional branch (trained without label dropout, as EDM's released checkpoints are), so "
                          "guidance would extrapolate from an input it has never seen: set distill.real_guidance_scale: 1")


def _check_micro_batch_holds_every_step(cfg: DistillConfig, micro_batch: int) -> None:
    """With a critic per step, every micro-batch must hold each step's rows equally (row i of the global batch is
    step i mod N): ranks must call every critic alike (sharded training's collectives), and each critic sees its
    share of every batch."""
    count = len(cfg.denoising_timesteps)
    if cfg.critic_per_step and micro_batch % count:
        raise ConfigError(f"distill.critic_per_step shares every micro-batch equally among its {count} steps, but a "
                          f"micro-batch here holds {micro_batch} samples: make it a multiple of {count} "
                          "(launch.micro_batch, or without it distill.batch_size / processes)")


def _check_timesteps(cfg: DistillConfig, family: Family) -> None:
    top = family.num_train_timesteps
    if max(cfg.denoising_timesteps) >= top or cfg.gan.diffusion_max_timestep > top:
        raise ConfigError(f"distill.denoising_timesteps {cfg.denoising_timesteps} and gan.diffusion_max_timestep "
                         f"{cfg.gan.diffusion_max_timestep} must stay within the teacher's {top} timesteps")


def _sample_grid(trainer: DMD2Trainer, path: Path, per_class: int, seed: int, main: bool) -> Path:
    """A class-major grid from fixed noise (every rank runs the generator: it may be sharded); rank 0 saves it.
    Its randomness is forked off, so sampling during training never changes what is trained."""
    family = trainer.family
    raw_cond, columns = grid_conditions(family, per_class)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        noise = fixed_noise(per_class * columns, family.sample_shape, seed).to(trainer.acc.device)
        cond = family.encode_conditions(raw_cond, trainer.acc.device)
        images = to_uint8(family.decode(trainer.sample(len(noise), cond, noise)).clamp(-1, 1)).cpu()
    return save_grid(images, per_class, path, scale=3) if main else path


def _mean_of(records: list[dict[str, float]]) -> dict[str, float]:
    """The micro-batches' figures averaged, key by key (one micro-batch: its own)."""
    if len(records) == 1:
        return dict(records[0])
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def _mean_over_ranks(metrics: dict[str, float], acc: Accelerator) -> dict[str, float]:
    """Per-rank batch means → global batch means (equal per-rank batches), so logs do not depend on the world size."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = acc.reduce(torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=acc.device), "mean")
    return dict(zip(keys, values.tolist(), strict=True))


def _save(trainer: DMD2Trainer, acc: Accelerator, ckpt_dir: Path, step: int, real: RandomBatches | None,
          pairs: RandomBatches | None, train_seconds: float, keep_last: int, student: dict[str, Any],
          writer: BackgroundWriter) -> Path:
    """Every rank writes its shards of the models and optimisers (sharded runs); rank 0 adds the full generator
    as a student model directory (`student/`, for `evaluate-folder`) and the rest, which every rank holds
    identically (RNG, data position, schedulers), and commits. Rank 0's part is a snapshot written and committed
    by `writer` in the background while training goes on."""
    if acc.is_main_process:
        writer.wait()  # the previous checkpoint is committed before this one begins
        begin_checkpoint(ckpt_dir, step)
    acc.wait_for_everyone()
    tmp = pending_checkpoint(ckpt_dir, step)
    if trainer.sharded:  # a collective write of every rank's shards
        save_training_state(tmp, trainer.training_parts(), sharded=True)
    weights, adapter = trainer.generator_weights()  # a collective under FSDP
    if acc.is_main_process:
        training = None if trainer.sharded else snapshot_training_state(trainer.training_parts())
        weights = {k: v.to("cpu", copy=True) for k, v in weights.items()}  # training goes on updating the originals
        adapter = {k: v.to("cpu", copy=True) for k, v in adapter.items()} if adapter is not None else None
        state = {"schedulers": trainer.scheduler_states(), "rng": rng_state(),
                 "data": real.state_dict() if real is not None else {},
                 "pairs": pairs.state_dict() if pairs is not None else {}}
        meta = {"train_seconds": train_seconds, "num_processes": acc.num_processes, "sharded": trainer.sharded}

        def write_and_commit() -> None:
            if training is not None:
                write_training_state(tmp, training)
            with writing(tmp):
                save_model(tmp / "student", weights, student, extra_weights=adapter)
                torch.save(state, tmp / "state.pt")
            commit_checkpoint(ckpt_dir, step, meta, keep_last)

        writer.submit(write_and_commit)
    acc.wait_for_everyone()
    return ckpt_dir / f"ckpt-{step:07d}"
