"""Regression pre-training of a generator's first step on teacher ODE pairs (method notes §2.8; the SDXL one-step
recipe).

The SDXL one-step student conditions on t = 399 rather than 999, and starts not from the teacher's weights but from
a short regression: the teacher's own deterministic sampler maps noise z to a sample x = ODE(z) (with its
guidance), for `regression.num_pairs` noises; the generator G(z, t) then learns to reproduce x from z in one call,
with LPIPS between the decoded images (the original: LPIPS-VGG with average pooling, both sides decoded by the tiny
VAE). With `regression.enabled`, distillation starts its generator from the result. The pairs train the step from
pure noise, distill.denoising_timesteps[0]; a multi-step student's later steps share the weights (our extension: the
original pre-trains one-step students only).

The stage runs as `launch:`'s processes, as distillation does (`dmd2 regression` starts them), and has two
halves, each resumable by running the same command again:
  pairs   work/<exp>/regression/pairs/run-<fp>/pairs.lmdb: the samples with their conditions; each pair's noise is
          a function of (seed, index), so it is regenerated rather than stored. The pair batches are dealt out to
          the ranks in turn; each rank samples its own with a full copy of the teacher and keeps each finished
          batch as a file, so an interrupted run redoes only unfinished batches (with any number of ranks), and
          rank 0 writes the one LMDB at the end. The fingerprint covers the teacher and the pair settings only:
          changing the learning rate reuses the pairs.
  train   work/<exp>/regression/train/run-<fp>/checkpoints, as every training stage: `regression.batch_size` is
          the global batch, each rank regressing its share (cut into `regression.micro_batch` passes) under DDP,
          or sharded with FSDP2 (`launch.distributed: fsdp`); gradients are averaged once per step, so any launch
          shape trains the same generator up to floating-point reduction order.
Output: models/<exp>/regression/, the generator in the normalised format (a one-step student at distill's first
timestep, so `dmd2 generate` samples it). Disabled, `dmd2 regression` writes only a stage.json that says so.
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn

from dmd2.checkpoint import (
    TrainingParts,
    begin_checkpoint,
    checkpoint_at_or_refuse,
    commit_checkpoint,
    full_state_dict,
    latest_checkpoint,
    load_latest,
    load_training_state,
    one_writer,
    pending_checkpoint,
    read_checkpoint,
    rng_state,
    run_directory,
    save_training_state,
    set_rng_state,
    training_state_path,
    writing,
)
from dmd2.config import (
    REGRESSION_BATCH_KEYS,
    ConfigError,
    LPIPSConfig,
    RegressionConfig,
    batch_shares,
    to_dict,
)
from dmd2.data import RandomBatches
from dmd2.errors import TrainingDiverged
from dmd2.families import Family, Model, ModelError, load_model, save_model, student_config
from dmd2.latents import LatentDataset, write_latents_lmdb
from dmd2.stage import StageContext
from dmd2.stopping import stop_requests
from dmd2.tracking import progress
from dmd2.training import (
    GlobalBatchRandom,
    adamw,
    all_ranks_agree,
    clip_gradients,
    gradient_sync,
    progress_keys,
    warmup_schedule,
)

PAIRS_FILE = "pairs.lmdb"
# Settings that only say how far or how visibly to train: changing them resumes the same run.
# (and micro_batch, which cuts a batch into passes that train the same: a different memory cap resumes the run)
REGRESSION_PROGRESS_KEYS = {"steps", "checkpoint_every", "keep_last", "log_every", "micro_batch"}
PAIR_KEYS = ("num_pairs", "teacher_steps", "guidance_scale", "seed")  # what the pairs depend on (with the teacher)


def run_regression(ctx: StageContext, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """The stage, on this rank: generate the pairs (once), regress the generator onto them, write
    models/<exp>/regression/ (rank 0)."""
    cfg, paths = ctx.exp.regression, ctx.paths
    if not cfg.enabled:
        raise ConfigError("regression.enabled is false: there is nothing to pre-train")
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    # settings and weights are checked before hours of teacher sampling (the old output stays until the new one)
    timestep = regression_timestep(ctx)
    if cfg.loss == "lpips" and cfg.lpips.pretrained_backbone:
        _check_backbone_weights(cfg.lpips.net)
    if cfg.loss == "lpips" and cfg.decoder is not None:
        _decoder_folder(cfg.decoder, paths.root)
    started = time.time()
    teacher = load_model(paths.teacher, acc.device, data_dir=paths.data)
    pairs = make_pairs(ctx, teacher, acc)
    summary = train_regression(ctx, teacher, pairs, timestep, acc)
    return {"enabled": True, "pairs": str(pairs), "timestep": timestep, **summary,
            "invocation_seconds": round(time.time() - started, 1)}


def regression_timestep(ctx: StageContext) -> int:
    """The timestep of the generator's first step, the one from pure noise (distill.denoising_timesteps[0]): the pairs
    teach that step. A multi-step student's later steps share its weights, so they start from the regressed copy too
    and distillation trains them as it does from the teacher. Refused for LoRA students."""
    distill = ctx.exp.distill
    if distill.lora.enabled:
        raise ConfigError("regression.enabled changes every weight of the generator, but distill.lora trains adapters "
                          "on the teacher's weights: turn one of them off")
    return int(distill.denoising_timesteps[0])


# ------------------------------------------------------------------------------------------------------ pairs


def pair_noise(seed: int, indices, shape: tuple[int, ...]) -> torch.Tensor:
    """The unit Gaussian noise of pairs `indices`: one generator per pair, seeded from (seed, index), so any pair's
    noise is found again without storing it and whatever the batch it is drawn in."""
    out = torch.empty((len(indices), *shape))
    for row, index in enumerate(indices):
        state = np.random.SeedSequence([seed, int(index)]).generate_state(1, np.uint64)[0]
        out[row] = torch.randn(shape, generator=torch.Generator().manual_seed(int(state)))
    return out


def make_pairs(ctx: StageContext, teacher: Model | Callable[[], Model], acc: Accelerator | None = None) -> Path:
    """The pairs LMDB for these settings unless it already exists: the pair batches dealt out to the ranks in turn,
    each kept as a file in the run directory when done (so an interrupted run resumes at the next unfinished one,
    with any number of ranks), then gathered into one LMDB by rank 0. `teacher` may be a function that loads it,
    called only when there is something to sample."""
    cfg, paths = ctx.exp.regression, ctx.paths
    acc = acc or Accelerator(cpu=not torch.cuda.is_available())
    run_dir = None
    if acc.is_main_process:  # rank 0 hashes the teacher (gigabytes for SDXL) and tells the others
        settings = {k: getattr(cfg, k) for k in PAIR_KEYS}
        inputs = [f for f in (paths.teacher / "config.json", paths.teacher / "model.safetensors",
                              paths.data / "prompts.lmdb" / "data.mdb") if f.exists()]
        run_dir = run_directory(paths.work("regression") / "pairs", settings, set(), inputs)
    run_dir = broadcast_object_list([run_dir])[0] if acc.num_processes > 1 else run_dir
    lmdb_path = run_dir / PAIRS_FILE
    if (lmdb_path / "data.mdb").exists():
        acc.print(f"regression pairs: reusing {lmdb_path}")
        return lmdb_path
    teacher = teacher if isinstance(teacher, Model) else teacher()
    family = teacher.family
    steps = cfg.teacher_steps or family.default_teacher_steps
    guidance = family.default_guidance_scale if cfg.guidance_scale is None else cfg.guidance_scale
    conditions = _pair_conditions(family, cfg.num_pairs, cfg.seed)
    parts = run_dir / "batches"
    parts.mkdir(parents=True, exist_ok=True)
    starts = range(0, cfg.num_pairs, cfg.pair_batch_size)
    mine = starts[acc.process_index :: acc.num_processes]
    kept = 0
    with one_writer(run_dir, acc), progress(len(mine), 0, "teacher pairs", disable=not acc.is_main_process) as bar:
        for start in mine:
            bar.update(1)
            part = parts / f"{start:08d}.pt"
            if part.exists():  # finished by an interrupted run (by whichever rank)
                kept += 1
                continue
            index = range(start, min(start + cfg.pair_batch_size, cfg.num_pairs))
            noise = pair_noise(cfg.seed, index, family.sample_shape).to(acc.device)
            cond = family.encode_conditions(_raw(conditions, index), acc.device)
            with torch.no_grad():
                x0 = family.sample_teacher(teacher.net, noise, cond, steps, guidance)
            tmp = part.with_suffix(f".tmp{acc.process_index}")
            torch.save(x0.cpu().half(), tmp)
            tmp.replace(part)
        if kept:
            print(f"regression pairs: rank {acc.process_index} kept {kept} of its {len(mine)} batch(es), finished by an "
                  "interrupted run", flush=True)
        acc.wait_for_everyone()  # every rank's batches are on disk
        if acc.is_main_process:
            samples = torch.cat([torch.load(parts / f"{s:08d}.pt") for s in starts])
            kind = "prompts" if isinstance(conditions, list) else "labels" if conditions is not None else "none"
            texts = conditions if kind == "prompts" else [str(int(y)) for y in conditions] if kind == "labels" \
                else [""] * cfg.num_pairs
            write_latents_lmdb(lmdb_path, samples, texts, {
                "pairs": {"noise_seed": cfg.seed, "conditions": kind, "teacher_steps": steps, "guidance_scale": guidance,
                          "teacher": str(paths.teacher)}, "source": "teacher ODE pairs", "split": "regression"})
            shutil.rmtree(parts)
        acc.wait_for_everyone()
    acc.print(f"regression pairs: wrote {cfg.num_pairs} teacher samples ({steps} steps, guidance {guidance}, "
              f"{acc.num_processes} process(es)) to {lmdb_path}")
    return lmdb_path


def _pair_conditions(family: Family, n: int, seed: int):
    """Every pair's raw condition (prompts, labels or None), drawn once from `seed` as distillation draws its own."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return family.random_conditions(n, GlobalBatchRandom())


def _raw(conditions, index):
    if conditions is None:
        return None
    return [conditions[i] for i in index] if isinstance(conditions, list) else conditions[list(index)]


class PairDataset:
    """The pairs LMDB: `batch(indices)` → (teacher samples, their noise, their raw conditions)."""

    def __init__(self, path: Path, sample_shape: tuple[int, ...]):
        self.samples = LatentDataset(path, expect_shape=sample_shape)
        self.info = self.samples.meta.get("pairs") or {}
        if "noise_seed" not in self.info:
            raise ModelError(f"{path} is not a regression pairs LMDB (no pairs record); rerun `dmd2 regression`")

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, Any]:
        x0, texts = self.samples.batch(indices)
        noise = pair_noise(self.info["noise_seed"], indices, tuple(x0.shape[1:]))
        kind = self.info["conditions"]
        raw = texts if kind == "prompts" else torch.tensor([int(t) for t in texts]) if kind == "labels" else None
        return x0, noise, raw


# ------------------------------------------------------------------------------------------------------- loss


def lpips_network(cfg: LPIPSConfig) -> nn.Module:
    """LPIPS (the `lpips` package: its calibrated linear heads ship with it) on torchvision's ImageNet backbone,
    read from torch's hub cache and never fetched at run time; `replace_pooling` swaps max for average pooling as
    the recipe does. A random backbone (`pretrained_backbone: false`) is drawn from a fixed seed."""
    import lpips

    if cfg.pretrained_backbone:
        _check_backbone_weights(cfg.net)
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore")  # torchvision's deprecation of lpips' `pretrained=` argument
        net = lpips.LPIPS(net=cfg.net, pretrained=True, pnet_rand=not cfg.pretrained_backbone, verbose=False)
    if cfg.replace_pooling:
        _average_pooling(net)
    return net.eval().requires_grad_(False)


BACKBONE_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def _check_backbone_weights(net: str) -> None:
    import torchvision

    weights = getattr(torchvision.models, BACKBONE_WEIGHTS[net]).IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.exists():
        builder = {"vgg": "vgg16", "alex": "alexnet", "squeeze": "squeezenet1_1"}[net]
        raise ModelError(f"LPIPS needs torchvision's ImageNet {builder} weights at {path} (not found; nothing is "
                         f"downloaded at run time): on a connected machine run `python -c \"import torchvision; "
                         f"torchvision.models.{builder}(weights='IMAGENET1K_V1')\"` and copy {path.name} there (or set "
                         "TORCH_HOME), or set regression.loss: mse")


def _average_pooling(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode))
        else:
            _average_pooling(child)


def _decoder_folder(decoder: str, root: Path) -> Path:
    from dmd2.paths import input_path

    folder = input_path(decoder, root)
    if not (folder / "config.json").exists():
        raise ModelError(f"regression.decoder: {folder} is not an AutoencoderTiny directory (no config.json); on a "
                         "connected machine run `hf download madebyollin/taesdxl --local-dir DIR` and set DIR")
    return folder


def loss_function(cfg: RegressionConfig, family: Family, dev: torch.device,
                  root: Path = Path(".")) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(generator samples, teacher samples) → the batch's mean loss: MSE on the samples, or LPIPS on both decoded
    to pixels (grey images as RGB), the gradient flowing through the generator's side only."""
    if cfg.loss == "mse":
        return lambda x, target: F.mse_loss(x.float(), target.float())
    lpips_net = lpips_network(cfg.lpips).to(dev)
    decode = pixel_decoder(cfg, family, dev, root)

    def loss(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_images = decode(target)
        images = decode(x)
        if images.shape[1] == 1:
            images, target_images = images.expand(-1, 3, -1, -1), target_images.expand(-1, 3, -1, -1)
        return lpips_net(images, target_images).mean()

    return loss


def pixel_decoder(cfg: RegressionConfig, family: Family, dev: torch.device,
                  root: Path = Path(".")) -> Callable[[torch.Tensor], torch.Tensor]:
    """Samples → images in [−1, 1], differentiable: pixel families' samples as they are; latents through
    `regression.decoder` (an AutoencoderTiny, the recipe's taesdxl) or the pipeline's VAE, in float32."""
    if not family.latent_space or cfg.decoder is None:
        return family.pixel_decoder(dev)
    from diffusers import AutoencoderTiny

    folder = _decoder_folder(cfg.decoder, root)
    vae = AutoencoderTiny.from_pretrained(folder, torch_dtype=torch.float32).to(dev)
    scaling, shift = float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)
    if vae.config.latent_channels != family.sample_shape[0]:
        raise ModelError(f"regression.decoder {folder} decodes {vae.config.latent_channels}-channel latents, but "
                         f"the teacher's have {family.sample_shape[0]}: use the tiny VAE made for this pipeline")
    vae.requires_grad_(False).eval()
    return lambda x: vae.decode(x.float() / scaling + shift).sample  # as the pipelines undo their latents' scaling


# ---------------------------------------------------------------------------------------------------- training


def train_regression(ctx: StageContext, teacher: Model, pairs_path: Path, timestep: int,
                     acc: Accelerator | None = None) -> dict[str, Any]:
    """Regress a copy of the teacher onto the pairs at `timestep`, this rank on its share of every batch; rerunning
    resumes from the newest checkpoint (with any number of ranks)."""
    from dmd2.sharding import device_mesh, shard, shards
    from dmd2.tracking import MetricsLog

    cfg, paths, family = ctx.exp.regression, ctx.paths, teacher.family
    acc = acc or Accelerator(cpu=not torch.cuda.is_available())
    dev, main = acc.device, acc.is_main_process
    per_rank, accumulation = batch_shares(cfg.batch_size, acc.num_processes, cfg.micro_batch, REGRESSION_BATCH_KEYS)
    acc.print(f"regression batch {cfg.batch_size}: {acc.num_processes} process(es) × {accumulation} micro-batch(es) "
              f"of {per_rank // accumulation}")
    pairs = PairDataset(pairs_path, family.sample_shape)
    torch.manual_seed(cfg.seed)
    generator = teacher.net.train().requires_grad_(True)  # the teacher's own copy: it is not needed any more
    if cfg.gradient_checkpointing:
        family.enable_gradient_checkpointing(generator)
    sharded = shards(ctx.exp.launch, acc.num_processes)
    if sharded:  # before the optimiser, so that it holds (and checkpoints) only this rank's shards
        shard(generator, ctx.exp.launch.fsdp, device_mesh(ctx.exp.launch, acc.num_processes, dev.type))
    optimizer = adamw(generator.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_schedule(optimizer, cfg.warmup_steps)
    module = generator  # the bare generator: what is checkpointed and saved
    if not sharded:
        generator = acc.prepare(generator)  # DDP across processes (one process: the module itself)
    batches = RandomBatches(pairs, cfg.batch_size, cfg.seed, rank=acc.process_index, world=acc.num_processes)
    loss_fn = loss_function(cfg, family, dev, paths.root)
    run_dir = None
    if main:
        settings = {**to_dict(cfg), "pairs": pairs_path.parent.name, "timestep": timestep}
        run_dir = run_directory(paths.work("regression") / "train", settings,
                                progress_keys(REGRESSION_PROGRESS_KEYS, "constant"), [])
    run_dir = broadcast_object_list([run_dir])[0] if acc.num_processes > 1 else run_dir
    ckpt_dir = run_dir / "checkpoints"
    parts: TrainingParts = {"generator": (module, optimizer)}

    def load(checkpoint: Path) -> tuple[int, float]:
        state, meta = read_checkpoint(checkpoint)
        if (checkpoint / "generator.safetensors").exists():
            _load_one_process_checkpoint(checkpoint, state, module, optimizer)
        else:
            load_training_state(training_state_path(checkpoint), parts)  # reshards to this run's ranks
        if "scheduler" in state:  # checkpoints from before the warm-up had none: it was always 1 then
            scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        return meta["step"], meta.get("train_seconds", 0.0)

    def save(step: int, train_seconds: float) -> None:
        if main:
            begin_checkpoint(ckpt_dir, step)
        acc.wait_for_everyone()
        tmp = pending_checkpoint(ckpt_dir, step)
        save_training_state(tmp, parts, sharded)  # sharded: every rank writes its shards; otherwise rank 0
        if main:
            with writing(tmp):
                torch.save({"scheduler": scheduler.state_dict(), "data": batches.state_dict(), "rng": rng_state()},
                           tmp / "state.pt")
            commit_checkpoint(ckpt_dir, step, {"train_seconds": train_seconds, "num_processes": acc.num_processes,
                                               "sharded": sharded}, cfg.keep_last)
        acc.wait_for_everyone()

    with one_writer(run_dir, acc):
        step, elapsed = 0, 0.0
        resume_from = checkpoint_at_or_refuse(ckpt_dir, cfg.steps, "regression.steps")
        found = (resume_from, load(resume_from)) if resume_from else \
            load_latest(ckpt_dir, load, acc.print, lambda ok: all_ranks_agree(ok, dev))
        if found is not None:
            step, elapsed = found[1]
            acc.print(f"resuming regression pre-training from {found[0]} (step {step})")
        acc.print(f"regression run directory: {run_dir}")
        log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
        t = torch.full((per_rank,), timestep, dtype=torch.long, device=dev)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        t0 = time.time()
        with progress(cfg.steps, step, "regression", disable=not main) as bar, stop_requests(ctx.exp.slurm) as stop:
            while step < cfg.steps:
                target, noise, raw = batches.next()  # this rank's share of the batch
                optimizer.zero_grad(set_to_none=True)
                micro = _micro_batches(per_rank // accumulation, target, noise, raw)
                losses = []
                for i, (target_i, noise_i, raw_i) in enumerate(micro):  # gradients add up: one step per batch
                    target_i, noise_i, t_i = target_i.to(dev), noise_i.to(dev), t[: len(noise_i)]
                    cond = family.encode_conditions(raw_i, dev)
                    with gradient_sync(generator, sync=i == len(micro) - 1):  # averaged across ranks once
                        with autocast:
                            x = family.predict_x0(generator, family.generator_input(noise_i, t_i), t_i, cond)
                        loss = loss_fn(x.float(), target_i)  # in float32: the SDXL VAE overflows in half precision
                        (loss if len(micro) == 1 else loss / len(micro)).backward()
                    losses.append(loss.item())
                batch_loss = sum(losses) / len(losses)  # this rank's share's mean (micro-batches are equal in size)
                if not all_ranks_agree(all(map(math.isfinite, losses)), dev):
                    raise TrainingDiverged(f"regression loss is {batch_loss} at step {step} (or not finite on another "
                                           f"rank); the last good checkpoint ({latest_checkpoint(ckpt_dir)}) is "
                                           "intact. Lower regression.lr and rerun.")
                grad_norm = clip_gradients(optimizer, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    if acc.num_processes > 1:  # the global batch's mean (equal shares)
                        batch_loss = acc.reduce(torch.tensor(batch_loss, dtype=torch.float64, device=dev), "mean").item()
                    log.write({"step": step, "loss": batch_loss, "grad_norm": grad_norm,
                               "time_s": round(elapsed + time.time() - t0, 2)})
                    bar.set_postfix(loss=f"{batch_loss:.4f}")
                stopping = step < cfg.steps and stop.requested(dev)  # a time limit or preemption is coming
                if stopping or step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    save(step, elapsed + time.time() - t0)
                if stopping:
                    raise stop.stop(step, latest_checkpoint(ckpt_dir))
        weights = full_state_dict(module, sharded)  # rank 0: every weight (a collective under FSDP)
        if main:
            source = {"type": "regression", "teacher": str(paths.teacher), "pairs": len(pairs), "steps": cfg.steps,
                      "loss": cfg.loss, "run": run_dir.name}
            save_model(paths.regression, weights, student_config(teacher.config, [timestep], source),
                       extra_files={"metrics.jsonl": log.text_through(cfg.steps)})
        acc.wait_for_everyone()
    return {"steps": cfg.steps, "train_seconds": round(elapsed + time.time() - t0, 1)}


def _load_one_process_checkpoint(checkpoint: Path, state: dict[str, Any], module: nn.Module,
                                 optimizer: torch.optim.Optimizer) -> None:
    """A checkpoint written before the stage ran on several processes (the generator's weights in one file, the
    optimiser's own state dict, keyed by parameter position, in state.pt), loaded as a training state is: the
    optimiser state keyed by parameter name, so it loads into any number of ranks, sharded or not."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = [name for name, _ in module.named_parameters()]  # the order the optimiser was given them in
    raw = state["optimizer"]
    optim = {"state": {names[i]: moments for i, moments in raw["state"].items()},
             "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in raw["param_groups"]]}
    set_state_dict(module, [optimizer], model_state_dict=load_file(checkpoint / "generator.safetensors"),
                   optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))


def _micro_batches(size: int, target: torch.Tensor, noise: torch.Tensor, raw: Any) -> list[tuple]:
    """The batch cut into passes of `size` samples, in order (one pass: the batch itself)."""
    if size >= len(target):
        return [(target, noise, raw)]
    return [(target[i : i + size], noise[i : i + size], raw if raw is None else raw[i : i + size])
            for i in range(0, len(target), size)]


def start_weights(ctx: StageContext) -> dict[str, torch.Tensor] | None:
    """The weights distillation starts its generator from: the regression stage's (regression.enabled), else None
    (the teacher's)."""
    if not ctx.exp.regression.enabled:
        return None
    first = regression_timestep(ctx)
    folder = ctx.paths.regression
    if not (folder / "model.safetensors").exists():
        raise ModelError(f"regression.enabled, but {folder} holds no pre-trained generator: run `dmd2 regression` "
                         "first (snakemake and dvc do this for you)")
    model = load_model(folder)
    if model.timesteps != [first]:
        raise ModelError(f"{folder} was pre-trained at t = {model.timesteps}, but distill.denoising_timesteps starts at "
                         f"{first}: rerun `dmd2 regression`")
    return model.net.state_dict()
