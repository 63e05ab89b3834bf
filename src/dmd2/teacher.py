"""Teacher stage: train a class-conditional EDM denoiser here and write it in the normalised format."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from dmd2.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    run_directory,
    save_checkpoint,
    set_rng_state,
)
from dmd2.config import ExperimentConfig, WandbConfig, to_dict
from dmd2.data import RandomBatches, open_split
from dmd2.edm import EMA, denoising_loss, sample_training_sigma
from dmd2.models import build_denoiser, save_model
from dmd2.networks import one_hot

# Settings that only say how far or how visibly to train: changing them resumes the same run.
TEACHER_PROGRESS_KEYS = {"steps", "checkpoint_every", "keep_last", "log_every"}


def teacher_model_config(exp: ExperimentConfig, channels: int, num_classes: int) -> dict[str, Any]:
    t = exp.teacher
    return {"family": "edm", "kind": "teacher", "in_channels": channels, "resolution": exp.data.resolution,
            "label_dim": num_classes, "sigma_data": t.sigma_data, "unet": to_dict(t.unet), "sampler": to_dict(t.sampler)}


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant LR after a linear warm-up (diffusers' `constant_with_warmup`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def train_teacher(exp: ExperimentConfig, data_dir: Path, out_dir: Path, work_dir: Path, wandb_cfg: WandbConfig,
                  experiment: str, resume_from: Path | None = None) -> dict[str, Any]:
    from dmd2.tracking import MetricsLog, Wandb

    cfg = exp.teacher
    started = time.time()
    train = open_split(data_dir, "train", exp.data.resolution)
    model_cfg = teacher_model_config(exp, train.shape[0], train.num_classes)

    torch.manual_seed(cfg.seed)
    denoiser = build_denoiser(model_cfg)
    ema = EMA(denoiser, cfg.ema_decay)
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=cfg.lr)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    batches = RandomBatches(train, cfg.batch_size, cfg.seed)

    step, elapsed = 0, 0.0
    run_dir = run_directory(work_dir, {**to_dict(cfg), "data": train.meta}, TEACHER_PROGRESS_KEYS, [])
    ckpt_dir = run_dir / "checkpoints"
    latest = resume_from or latest_checkpoint(ckpt_dir)
    if latest is not None:
        models, state, meta = load_checkpoint(latest)
        denoiser.load_state_dict(models["model"])
        ema.shadow = models["ema"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, elapsed = meta["step"], meta.get("train_seconds", 0.0)
        print(f"resuming teacher training from {latest} (step {step})")

    print(f"teacher run directory: {run_dir}")
    log = MetricsLog(run_dir / "metrics.jsonl", resume_step=step)
    tracker = Wandb(wandb_cfg, "teacher", experiment, to_dict(cfg))
    denoiser.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="teacher", dynamic_ncols=True, mininterval=2)
    t0 = time.time()
    while step < cfg.steps:
        x, y = batches.next()
        y = torch.where(torch.rand(len(y)) < cfg.label_dropout, -1, y)  # -1 → unconditional branch for CFG
        sigma = sample_training_sigma(len(x), cfg.p_mean, cfg.p_std)
        loss = denoising_loss(denoiser, x, sigma, one_hot(y, train.num_classes), torch.randn_like(x))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher loss is {loss.item()} at step {step}; the last good checkpoint "
                                     f"({latest_checkpoint(ckpt_dir)}) is intact. Lower teacher.lr and rerun.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 10.0)
        optimizer.step()
        scheduler.step()
        step += 1
        ema.update(denoiser, step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": loss.item(), "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                      "time_s": round(elapsed + time.time() - t0, 2)}
            log.write(record)
            tracker.log(record, step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "data": batches.state_dict(), "rng": rng_state()}
            save_checkpoint(ckpt_dir, step, {"model": denoiser.state_dict(), "ema": ema.shadow}, state,
                            {"train_seconds": elapsed + time.time() - t0}, cfg.keep_last)
    bar.close()
    tracker.finish()

    denoiser.load_state_dict(ema.shadow)
    source = {"type": "trained", "steps": cfg.steps, "data_sha256": train.meta["source_sha256"]}
    save_model(out_dir, denoiser, {**model_cfg, "source": source},
               extra_files={"metrics.jsonl": (run_dir / "metrics.jsonl").read_text()})
    summary = {"steps": cfg.steps, "train_seconds": round(elapsed + time.time() - t0, 1),
               "invocation_seconds": round(time.time() - started, 1)}
    return summary
