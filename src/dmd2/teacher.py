"""Teacher stage: train a teacher here with its family's own objective, or record a pretrained one, and write it in
the normalised format (`dmd2.families`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dmd2.checkpoint import (
    checkpoint_at_or_refuse,
    latest_checkpoint,
    load_checkpoint,
    load_latest,
    rng_state,
    run_directory,
    run_lock,
    save_checkpoint,
    set_rng_state,
)
from dmd2.config import to_dict
from dmd2.data import RandomBatches, open_split
from dmd2.errors import TrainingDiverged
from dmd2.families import Family, family_for, import_teacher, save_model, teacher_config
from dmd2.stage import StageContext
from dmd2.stopping import stop_requests
from dmd2.training import EMA, adamw, clip_gradients, device, progress_keys, warmup_schedule

# Settings that only say how far or how visibly to train: changing them resumes the same run.
TEACHER_PROGRESS_KEYS = {"steps", "checkpoint_every", "keep_last", "log_every"}
EVALUATION_KEYS = {"sampler"}  # how the teacher samples (evaluation, the distillation timestep table), not trains


def run_teacher(ctx: StageContext, resume_from: Path | None = None) -> dict[str, Any]:
    """`teacher.source: train` trains here (rerun to resume); any other source (a pretrained diffusers model, an
    EDM checkpoint) is imported by its family: recorded by reference or converted."""
    cfg = ctx.exp.teacher
    if cfg.source != "train":
        train = open_split(ctx.paths.data, "train", ctx.exp.data.resolution)
        config, weights = import_teacher(cfg, train.shape, train.num_classes, ctx.paths.root)
        save_model(ctx.paths.teacher, weights, config)
        return {"source": cfg.source, "imported": config["source"]}
    return train_teacher(ctx, resume_from)


def train_teacher(ctx: StageContext, resume_from: Path | None = None) -> dict[str, Any]:
    """Train the family's network with its own objective; rerunning resumes from the run's newest checkpoint."""
    exp, paths = ctx.exp, ctx.paths
    cfg = exp.teacher
    started = time.time()
    train = open_split(paths.data, "train", exp.data.resolution)
    model_cfg = teacher_config(cfg, train.shape, train.num_classes)
    family = family_for(model_cfg)

    torch.manual_seed(cfg.seed)
    net = family.build_network().to(device())
    optimizer = adamw(net.parameters(), lr=cfg.lr)
    schedule = warmup_schedule(optimizer, cfg.warmup_steps, cfg.lr_scheduler, cfg.steps)
    run = TeacherRun(family, net, EMA(net, cfg.ema_decay), optimizer, schedule,
                     RandomBatches(train, cfg.batch_size, cfg.seed), model_cfg)

    run_dir = run_directory(paths.work("teacher"), {**to_dict(cfg), "data": train.meta},
                            progress_keys(TEACHER_PROGRESS_KEYS, cfg.lr_scheduler) | EVALUATION_KEYS, [])
    ckpt_dir = run_dir / "checkpoints"
    with run_lock(run_dir):
        step, elapsed = 0, 0.0
        resume_from = resume_from or checkpoint_at_or_refuse(ckpt_dir, cfg.steps, "teacher.steps")
        found = (resume_from, run.load(resume_from)) if resume_from else load_latest(ckpt_dir, run.load)
        if found is not None:
            step, elapsed = found[1]
            print(f"resuming teacher training from {found[0]} (step {step})")
        return _train(ctx, run, run_dir, step, elapsed, started)


@dataclass
class TeacherRun:
    """What teacher training holds and checkpoints."""

    family: Family
    net: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: RandomBatches
    model_config: dict[str, Any]

    def load(self, checkpoint: Path) -> tuple[int, float]:
        """Restore everything from a checkpoint; returns (step, training seconds so far)."""
        models, state, meta = load_checkpoint(checkpoint)
        self.net.load_state_dict(models["model"])
        on = next(self.net.parameters()).device
        self.ema.shadow = {k: v.to(on) for k, v in models["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return meta["step"], meta.get("train_seconds", 0.0)

    def save(self, ckpt_dir: Path, step: int, train_seconds: float, keep_last: int) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "data": self.batches.state_dict(), "rng": rng_state()}
        save_checkpoint(ckpt_dir, step, {"model": self.net.state_dict(), "ema": self.ema.shadow}, state,
                        {"train_seconds": train_seconds}, keep_last)


def _train(ctx: StageContext, run: TeacherRun, run_dir: Path, step: int, elapsed: float,
           started: float) -> dict[str, Any]:
    from dmd2.tracking import MetricsLog, Wandb, progress, tracking_config

    cfg, paths, ckpt_dir = ctx.exp.teacher, ctx.paths, run_dir / "checkpoints"
    family, net, optimizer, scheduler = run.family, run.net, run.optimizer, run.scheduler
    dev = next(net.parameters()).device
    print(f"teacher run directory: {run_dir}")
    log = MetricsLog(run_dir / "metrics.jsonl")
    tracker = Wandb(ctx.params.wandb, "teacher", ctx.experiment,
                    tracking_config(ctx.params, ctx.experiment, "teacher", run_dir))
    net.train()
    bar = progress(cfg.steps, step, "teacher")
    with bar, stop_requests(ctx.exp.slurm) as stop:  # the bar is closed on errors too, so an error line never lands on its line
        t0 = time.time()
        while step < cfg.steps:
            x, y = run.batches.next()
            y = torch.where(torch.rand(len(y)) < cfg.label_dropout, -1, y)  # −1: the unconditional branch for CFG
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
                loss = family.teacher_loss(net, x.to(dev), family.encode_conditions(y, dev))
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"teacher loss is {loss.item()} at step {step}; the last good checkpoint "
                                       f"({latest_checkpoint(ckpt_dir)}) is intact. Lower teacher.lr and rerun to resume.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(optimizer, 10.0)
            optimizer.step()
            scheduler.step()
            step += 1
            run.ema.update(net, step)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                          "time_s": round(elapsed + time.time() - t0, 2)}
                log.write(record)
                tracker.log(record, step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            stopping = step < cfg.steps and stop.requested()  # a time limit or preemption is coming
            if stopping or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                run.save(ckpt_dir, step, elapsed + time.time() - t0, cfg.keep_last)
            if stopping:
                raise stop.stop(step, latest_checkpoint(ckpt_dir))
    tracker.finish()

    net.load_state_dict(run.ema.shadow)
    source = {"type": "trained", "steps": cfg.steps, "data_sha256": run.batches.dataset.meta["source_sha256"]}
    save_model(paths.teacher, net, {**run.model_config, "source": source},
               extra_files={"metrics.jsonl": log.text_through(cfg.steps)})
    return {"steps": cfg.steps, "train_seconds": round(elapsed + time.time() - t0, 1),
            "invocation_seconds": round(time.time() - started, 1)}
