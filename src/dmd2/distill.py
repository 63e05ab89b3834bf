"""DMD2 distillation: the two-time-scale loop, backward simulation and resumable state.

The loop talks to the teacher family only through a `DenoiserAdapter`; the networks are anything that maps
(x_t, σ or t, cond) to an x0 prediction (the critic also returns its bottleneck features for the GAN head).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from dmd2.adapters import DenoiserAdapter, EDMAdapter
from dmd2.checkpoint import (
    begin_checkpoint,
    commit_checkpoint,
    full_state_dict,
    latest_checkpoint,
    load_training_state,
    pending_checkpoint,
    read_checkpoint,
    rng_state,
    run_directory,
    save_training_state,
    set_rng_state,
)
from dmd2.config import DistillConfig, ExperimentConfig, LaunchConfig, WandbConfig, to_dict
from dmd2.data import RandomBatches, open_split
from dmd2.losses import distribution_matching_loss, dm_step_range, gan_critic_loss, gan_generator_loss
from dmd2.models import load_model, save_model
from dmd2.networks import GANHead
from dmd2.sharding import device_mesh, shard, total_norm
from dmd2.teacher import warmup_schedule

# Settings that only say how far or how visibly to train: changing them resumes the same run.
DISTILL_PROGRESS_KEYS = {"steps", "checkpoint_every", "keep_last", "log_every", "sample_every"}


class GlobalBatchRandom:
    """Random draws made for the *global* batch on every rank, then sliced to this rank's part.

    Every rank seeds the same generator, so a run's randomness, and therefore its result up to floating-point
    reduction order, does not depend on how many processes share the batch; resuming on a different number of
    ranks continues the same stream.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def _mine(self, full: torch.Tensor, n: int, device) -> torch.Tensor:
        return full[self.rank * n : (self.rank + 1) * n].to(device)

    def randn(self, n: int, shape: tuple[int, ...], device) -> torch.Tensor:
        return self._mine(torch.randn((n * self.world, *shape)), n, device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[0], tuple(x.shape[1:]), x.device).to(x.dtype)

    def randint(self, low: int, high: int, n: int, device) -> torch.Tensor:
        return self._mine(torch.randint(low, high, (n * self.world,)), n, device)


class Guidance(nn.Module):
    """The trainable side of DMD2: the fake-score critic plus the GAN head on its bottleneck.

    One module with one forward per critic turn, so DDP/FSDP see a single forward before each backward.
    """

    def __init__(self, adapter: DenoiserAdapter, critic: nn.Module, head: nn.Module | None, cfg: DistillConfig,
                 draw: GlobalBatchRandom | None = None):
        super().__init__()
        self.adapter, self.critic, self.head, self.cfg = adapter, critic, head, cfg
        self.draw = draw or GlobalBatchRandom()

    def forward(self, fake: torch.Tensor, cond: Any, real: torch.Tensor | None = None, real_cond: Any = None) -> dict[str, torch.Tensor]:
        t = self.draw.randint(0, self.adapter.num_train_timesteps, fake.shape[0], fake.device)  # the full range
        out = {"loss_fake": self.adapter.fake_score_loss(self.critic, fake, t, cond, self.draw.randn_like(fake))}
        if self.head is not None and real is not None:
            logits_real = self.logits(real, real_cond)
            logits_fake = self.logits(fake, cond)
            out["loss_gan_critic"] = gan_critic_loss(logits_real, logits_fake)
            out["logit_real"], out["logit_fake"] = logits_real.detach().mean(), logits_fake.detach().mean()
        return out

    def logits(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        """Diffusion-GAN: noise at t ~ U{0..max-1}, classify the critic's bottleneck features."""
        t = self.draw.randint(0, self.cfg.gan.diffusion_max_timestep, x.shape[0], x.device)
        x_t = self.adapter.add_noise(x, self.draw.randn_like(x), t)
        _, features = self.adapter.predict_x0(self.critic, x_t, t, cond, return_bottleneck=True)
        return self.head(features)


@dataclass
class Batch:
    """What one iteration needs besides noise: its size, conditions (or None) and, with the GAN, a real batch."""

    size: int
    cond: Any = None
    real: torch.Tensor | None = None
    real_cond: Any = None


class DMD2Trainer:
    """Owns the generator, the guidance module, both optimisers and schedulers, and one iteration of DMD2.

    With `launch.distributed: fsdp` (and more than one process) every network is sharded with FSDP2 (see
    `dmd2.sharding`); otherwise accelerate prepares the two trained models (DDP, or nothing on one process).
    """

    def __init__(self, adapter: DenoiserAdapter, teacher: nn.Module, generator: nn.Module, guidance: Guidance,
                 cfg: DistillConfig, sample_shape: tuple[int, ...], accelerator: Accelerator,
                 launch: LaunchConfig | None = None):
        self.adapter, self.cfg, self.shape, self.acc = adapter, cfg, sample_shape, accelerator
        self.draw = guidance.draw = GlobalBatchRandom(accelerator.process_index, accelerator.num_processes)
        # NO_SHARD replicates every parameter: that is DDP, so it takes accelerate's DDP path.
        self.sharded = (launch is not None and launch.distributed == "fsdp" and accelerator.num_processes > 1
                        and launch.fsdp.sharding_strategy != "NO_SHARD")
        self.teacher = teacher.requires_grad_(False).eval().to(accelerator.device)
        # fsdp.activation_checkpointing asks for the same thing as distill.gradient_checkpointing: honour either
        if cfg.gradient_checkpointing or (self.sharded and launch.fsdp.activation_checkpointing):
            for net in (generator, guidance.critic):
                if hasattr(net, "net"):
                    net.net.gradient_checkpointing = True
        if self.sharded:
            # Shard before building the optimisers, so that they hold (and checkpoint) only this rank's shards.
            mesh = device_mesh(launch, accelerator.num_processes, accelerator.device.type)
            for net in (generator, guidance.critic, guidance.head, self.teacher):
                if net is not None:
                    shard(net.to(accelerator.device), launch.fsdp, mesh)
            accelerator.print(f"FSDP2 {launch.fsdp.sharding_strategy} over the mesh "
                              f"{dict(zip(mesh.mesh_dim_names, mesh.shape, strict=True))}")
        opt = dict(weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas))
        opt_g = torch.optim.AdamW(generator.parameters(), lr=cfg.generator_lr, **opt)
        opt_d = torch.optim.AdamW(guidance.parameters(), lr=cfg.guidance_lr, **opt)
        if self.sharded:
            self.generator, self.guidance, self.opt_g, self.opt_d = generator, guidance, opt_g, opt_d
        else:
            # accelerate's rule for several models: prepare models before/with their optimisers, in the same order
            self.generator, self.guidance, self.opt_g, self.opt_d = accelerator.prepare(generator, guidance, opt_g, opt_d)
        self.sched_g = warmup_schedule(self.opt_g, cfg.warmup_steps)
        self.sched_d = warmup_schedule(self.opt_d, cfg.warmup_steps)
        self.dm_range = dm_step_range(adapter.num_train_timesteps, cfg.min_step_percent, cfg.max_step_percent)

    # ---------------------------------------------------------------------------------------------- pieces

    @property
    def guidance_module(self) -> Guidance:
        return self.acc.unwrap_model(self.guidance)

    def _autocast(self):
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16, enabled=self.cfg.mixed_precision == "bf16")

    def _same_on_all_ranks(self, value: int) -> int:
        """Rank 0's value everywhere: every rank must run the same number of generator passes (FSDP collectives)."""
        tensor = torch.tensor([value], device=self.acc.device)
        if self.acc.num_processes > 1:
            tensor = broadcast(tensor, from_process=0)
        return int(tensor.item())

    def _clip(self, model: nn.Module) -> float:
        """Clip the gradient norm to `max_grad_norm`; returns the norm before clipping."""
        if self.sharded:
            return total_norm(torch.nn.utils.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm))
        return float(self.acc.clip_grad_norm_(model.parameters(), self.cfg.max_grad_norm))

    def _full(self, n: int, t: int) -> torch.Tensor:
        return torch.full((n,), t, dtype=torch.long, device=self.acc.device)

    def generator_input(self, n: int, cond: Any, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x_t, t) the generator is trained on this iteration."""
        steps = self.cfg.denoising_timesteps
        z = self.draw.randn(n, self.shape, self.acc.device)
        if len(steps) == 1:
            t = self._full(n, steps[0])
            return self.adapter.generator_input(z, t), t
        if self.cfg.backward_simulation:
            # Backward simulation: roll the current student out for k steps from pure noise (no grad) and train at
            # step k, so training inputs come from the student's own distribution, as at inference.
            k = self._same_on_all_ranks(int(torch.randint(len(steps), (1,))))
            x_t = self.adapter.generator_input(z, self._full(n, steps[0]))
            with torch.no_grad(), self._autocast():
                for i in range(k):
                    x0 = self.adapter.predict_x0(self.generator, x_t, self._full(n, steps[i]), cond).float()
                    x_t = self.adapter.add_noise(x0, self.draw.randn_like(x0), self._full(n, steps[i + 1]))
            return x_t, self._full(n, steps[k])
        if real is None:
            raise ValueError("multi-step training without backward_simulation forward-noises real data: "
                             "enable distill.gan (which loads real batches) or set distill.backward_simulation: true")
        t = torch.tensor(steps, device=self.acc.device)[self.draw.randint(0, len(steps), n, self.acc.device)]
        x_t = self.adapter.add_noise(real, self.draw.randn_like(real), t)
        pure = (t == steps[0]).reshape(-1, *[1] * len(self.shape))
        return torch.where(pure, self.adapter.generator_input(z, t), x_t), t

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None) -> torch.Tensor:
        """Few-step generation as at inference: denoise, re-noise with fresh noise to the next timestep, repeat."""
        steps = self.cfg.denoising_timesteps
        x_t = self.adapter.generator_input(torch.randn((n, *self.shape), device=self.acc.device), self._full(n, steps[0]))
        for i, t in enumerate(steps):
            x0 = self.adapter.predict_x0(self.generator, x_t, self._full(n, t), cond).float()
            if i + 1 < len(steps):
                x_t = self.adapter.add_noise(x0, torch.randn_like(x0), self._full(n, steps[i + 1]))
        return x0

    # ---------------------------------------------------------------------------------------------- the step

    def train_step(self, step: int, batch: Batch) -> dict[str, float]:
        cfg, metrics = self.cfg, {}
        n = batch.size
        compute_generator = step % cfg.dfake_gen_update_ratio == 0
        x_in, t_in = self.generator_input(n, batch.cond, batch.real)

        with torch.set_grad_enabled(compute_generator), self._autocast():
            x = self.adapter.predict_x0(self.generator, x_in, t_in, batch.cond).float()

        if compute_generator:
            guidance = self.guidance_module
            guidance.requires_grad_(False)  # only the critic and head; the teacher stays frozen throughout
            t_dm = self.draw.randint(self.dm_range[0], self.dm_range[1] + 1, n, x.device)
            with self._autocast():
                loss_dm, dm_stats = distribution_matching_loss(self.adapter, self.teacher, guidance.critic, x, batch.cond,
                                                               t_dm, self.draw.randn_like(x), cfg.real_guidance_scale)
                loss_g = cfg.dm_loss_weight * loss_dm
                if guidance.head is not None:
                    loss_gan_g = gan_generator_loss(guidance.logits(x, batch.cond))
                    loss_g = loss_g + cfg.gan.gen_weight * loss_gan_g
                    metrics["loss_gan_generator"] = loss_gan_g.item()
            self._check_finite(loss_g, "generator", step)
            self.acc.backward(loss_g)
            metrics["grad_norm_generator"] = self._clip(self.generator)
            self.opt_g.step()
            self.opt_g.zero_grad(set_to_none=True)
            self.opt_d.zero_grad(set_to_none=True)
            guidance.critic.requires_grad_(True)
            if guidance.head is not None:
                guidance.head.requires_grad_(True)
            metrics.update(loss_dm=loss_dm.item(), loss_generator=loss_g.item(), **dm_stats)
        self.sched_g.step()  # every iteration, as in the original: warm-up counts iterations

        # Critic turn, on the same (detached) generator samples.
        with self._autocast():
            out = self.guidance(x.detach(), batch.cond, batch.real, batch.real_cond)
            loss_d = out["loss_fake"] + (cfg.gan.guidance_weight * out["loss_gan_critic"] if "loss_gan_critic" in out else 0)
        self._check_finite(loss_d, "guidance", step)
        self.acc.backward(loss_d)
        metrics["grad_norm_guidance"] = self._clip(self.guidance)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        self.sched_d.step()
        metrics.update({k: v.item() for k, v in out.items()}, loss_guidance=loss_d.item(),
                       lr_generator=self.sched_g.get_last_lr()[0], lr_guidance=self.sched_d.get_last_lr()[0])
        return metrics

    def _check_finite(self, loss: torch.Tensor, which: str, step: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the {which} loss is {loss.item()} at iteration {step}; stopping before any "
                                     "checkpoint is written, so the last good checkpoint is intact. Lower the learning "
                                     "rates (distill.generator_lr / distill.guidance_lr) and rerun to resume.")

    # ---------------------------------------------------------------------------------------------- state

    def training_parts(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """What `save_training_state` writes: each trained model with its optimiser."""
        return {"generator": (self.acc.unwrap_model(self.generator), self.opt_g),
                "guidance": (self.guidance_module, self.opt_d)}

    def scheduler_states(self) -> dict[str, Any]:
        return {"sched_g": self.sched_g.state_dict(), "sched_d": self.sched_d.state_dict()}

    def load_scheduler_states(self, states: dict[str, Any]) -> None:
        self.sched_g.load_state_dict(states["sched_g"])
        self.sched_d.load_state_dict(states["sched_d"])

    def generator_weights(self) -> dict[str, torch.Tensor]:
        """The generator's full weights on rank 0 (a collective under FSDP; other ranks get {})."""
        return full_state_dict(self.acc.unwrap_model(self.generator), self.sharded)


def build_guidance(adapter: DenoiserAdapter, teacher: nn.Module, cfg: DistillConfig, spatial: int) -> Guidance:
    """Critic initialised from the teacher's (EMA) weights; the GAN head is new, seeded identically on every rank."""
    critic = copy.deepcopy(teacher).train().requires_grad_(True)
    head = None
    if cfg.gan.enabled:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            head = GANHead(critic.bottleneck_channels, spatial)
    return Guidance(adapter, critic, head, cfg)


# -------------------------------------------------------------------------------------------------- the stage


def run_distill(exp: ExperimentConfig, data_dir: Path, teacher_dir: Path, out_dir: Path, work_dir: Path,
                wandb_cfg: WandbConfig, experiment: str, accelerator: Accelerator | None = None,
                resume_from: Path | None = None) -> dict[str, Any]:
    """Distil `teacher_dir` into a student in `out_dir`; rerunning the same command resumes from the run's
    directory under `work_dir` (see `run_directory`), or from `resume_from`, a checkpoint directory."""
    from dmd2.tracking import MetricsLog, Wandb

    cfg = exp.distill
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    if cfg.batch_size % acc.num_processes:
        raise ValueError(f"distill.batch_size={cfg.batch_size} must be divisible by the {acc.num_processes} processes")
    per_rank = cfg.batch_size // acc.num_processes
    teacher, tcfg = load_model(teacher_dir)
    adapter = EDMAdapter.from_model_config(tcfg, cfg.num_train_timesteps)
    shape = (tcfg["in_channels"], tcfg["resolution"], tcfg["resolution"])
    real = None
    if cfg.gan.enabled or (len(cfg.denoising_timesteps) > 1 and not cfg.backward_simulation):
        real = RandomBatches(open_split(data_dir, "train", exp.data.resolution), cfg.batch_size, cfg.seed,
                             rank=acc.process_index, world=acc.num_processes)

    torch.manual_seed(cfg.seed)  # the same on every rank: see GlobalBatchRandom
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    spatial = tcfg["resolution"] // 2 ** (len(tcfg["unet"]["channel_mult"]) - 1)
    guidance = build_guidance(adapter, teacher, cfg, spatial)
    trainer = DMD2Trainer(adapter, teacher, generator, guidance, cfg, shape, acc, exp.launch)

    run_dir = None
    if acc.is_main_process:  # rank 0 hashes the teacher (gigabytes for SDXL) and tells the others
        run_dir = run_directory(work_dir, to_dict(cfg), DISTILL_PROGRESS_KEYS, [teacher_dir / "model.safetensors"])
    run_dir = broadcast_object_list([run_dir])[0]
    ckpt_dir, step, elapsed = run_dir / "checkpoints", 0, 0.0
    latest = resume_from or latest_checkpoint(ckpt_dir)
    if latest is not None:
        state, meta = read_checkpoint(latest)
        load_training_state(latest / "training", trainer.training_parts())  # reshards to this run's ranks
        trainer.load_scheduler_states(state["schedulers"])
        set_rng_state(state["rng"])  # one stream for all ranks (GlobalBatchRandom), whatever their number
        if real is not None:
            real.load_state_dict(state["data"])
        step, elapsed = meta["step"], meta.get("train_seconds", 0.0)
        acc.print(f"resuming distillation from {latest} (iteration {step})")

    main = acc.is_main_process
    acc.print(f"distillation run directory: {run_dir}")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step, enabled=main)
    tracker = Wandb(wandb_cfg, "distill", experiment, to_dict(cfg), enabled=main)
    num_classes = tcfg["label_dim"]
    bar = tqdm(total=cfg.steps, initial=step, desc="distill", dynamic_ncols=True, mininterval=2, disable=not main)
    t0, last_generator = time.time(), {}
    while step < cfg.steps:
        labels = trainer.draw.randint(0, num_classes, per_rank, acc.device) if num_classes else None
        batch = Batch(per_rank, adapter.encode_conditions(labels))
        if real is not None:
            x_real, y_real = real.next()
            batch.real, batch.real_cond = x_real.to(acc.device), adapter.encode_conditions(y_real.to(acc.device))
        metrics = trainer.train_step(step, batch)
        if "loss_dm" in metrics:  # generator turns are every N-th iteration; log their latest values
            last_generator = {k: v for k, v in metrics.items() if k not in ("loss_fake", "loss_guidance")}
        metrics = {**last_generator, **metrics}
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, **_mean_over_ranks(metrics, acc), "time_s": round(elapsed + time.time() - t0, 2)}
            log.write(record)
            tracker.log(record, step)
            bar.set_postfix(dm=f"{metrics.get('loss_dm', float('nan')):.3g}", fake=f"{metrics['loss_fake']:.3g}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save(trainer, acc, ckpt_dir, step, real, elapsed + time.time() - t0, cfg.keep_last)
    bar.close()
    tracker.finish()

    summary = {"steps": cfg.steps, "train_seconds": round(elapsed + time.time() - t0, 1)}
    weights = trainer.generator_weights()
    if main:
        student_cfg = {**student_model_config(tcfg, cfg),
                       "source": {"type": "dmd2", "teacher": str(teacher_dir), "iterations": cfg.steps, "run": run_dir.name}}
        save_model(out_dir, weights, student_cfg,
                   extra_files={"metrics.jsonl": (run_dir / "metrics.jsonl").read_text()})
    acc.wait_for_everyone()
    return summary


def student_model_config(teacher_config: dict[str, Any], cfg: DistillConfig) -> dict[str, Any]:
    """The student's model config: the teacher's, plus the generator's timesteps and their σ."""
    adapter = EDMAdapter.from_model_config(teacher_config, cfg.num_train_timesteps)
    sigmas = adapter.sigma(torch.tensor(cfg.denoising_timesteps)).tolist()
    return {**teacher_config, "kind": "student", "generator": {"timesteps": list(cfg.denoising_timesteps), "sigmas": sigmas}}


def _mean_over_ranks(metrics: dict[str, float], acc: Accelerator) -> dict[str, float]:
    """Per-rank batch means → global batch means (equal per-rank batches), so logs do not depend on the world size."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = acc.reduce(torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=acc.device), "mean")
    return dict(zip(keys, values.tolist(), strict=True))


def _save(trainer: DMD2Trainer, acc: Accelerator, ckpt_dir: Path, step: int, real: RandomBatches | None,
          train_seconds: float, keep_last: int) -> None:
    """Every rank writes its shards of the models and optimisers; rank 0 adds the full generator (for
    evaluation) and the rest, which every rank holds identically (RNG, data position, schedulers), and commits."""
    if acc.is_main_process:
        begin_checkpoint(ckpt_dir, step)
    acc.wait_for_everyone()
    tmp = pending_checkpoint(ckpt_dir, step)
    save_training_state(tmp / "training", trainer.training_parts())
    weights = trainer.generator_weights()
    if acc.is_main_process:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "generator.safetensors")
        torch.save({"schedulers": trainer.scheduler_states(), "rng": rng_state(),
                    "data": real.state_dict() if real is not None else {}}, tmp / "state.pt")
        commit_checkpoint(ckpt_dir, step, {"train_seconds": train_seconds, "num_processes": acc.num_processes,
                                           "sharded": trainer.sharded}, keep_last)
    acc.wait_for_everyone()
