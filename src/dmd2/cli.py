"""`dmd2 <stage>`: one thin sub-command per pipeline stage.

Every stage reads params.yaml (`--params`), takes `--set key=value` overrides (a path relative to the selected
experiment, e.g. `--set distill.steps=100`, or absolute, e.g. `--set mnist.distill.steps=100`), and writes only
its declared outputs. Running a training stage again resumes it from its last checkpoint. Each stage is a
function `run_<stage>(ctx, **options) -> dict`; `_run_stage` below times it and writes its `stage.json`.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import functools
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from dmd2.config import (
    SHARED_KEYS,
    TRAINING_STAGES,
    ConfigError,
    ExperimentConfig,
    block_models,
    leaf_keys,
    load_params,
    stage_models,
)
from dmd2.errors import EXIT_RESUMABLE, Dmd2Error, StopRequested
from dmd2.paths import ExperimentPaths
from dmd2.stage import STAGE_PARAMS, StageContext, stage_settings


def _common(func):
    @click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path(dir_okay=False),
                  help="Parameter file.")
    @click.option("--experiment", default=None, help="Experiment block to use (default: `experiment:` in params).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a parameter, e.g. --set distill.steps=100 (repeatable; value parsed as YAML).")
    @click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False),
                  help="Directory that holds data/, models/, results/ and work/.")
    @functools.wraps(func)
    def wrapper(params_path, experiment, overrides, root, **kwargs):
        overrides = list(overrides) + kwargs.pop("extra_overrides", [])
        params = load_params(params_path, overrides, experiment)
        name = experiment or params.experiment
        params.current(name)
        return func(ctx=StageContext(params, name, ExperimentPaths(name, Path(root))), **kwargs)

    return wrapper


def _run_stage(stage: str, run: Callable[..., dict[str, Any]], ctx: StageContext, write_record: bool = True,
               lock: bool = True, **options: Any) -> dict[str, Any]:
    """Run one stage under its locks (`dmd2.locks`; `lock=False`: the caller holds them) and write its stage.json
    (wall time, hardware, and the figures the stage returns)."""
    from dmd2.locks import stage_locks
    from dmd2.tracking import write_stage_record

    started = time.time()
    with stage_locks(ctx.paths, stage) if lock else contextlib.nullcontext():
        summary = run(ctx, **options)
    record = ctx.paths.stage_record(stage)
    if write_record and record is not None:
        write_stage_record(record, stage, started, settings=stage_settings(ctx.exp, stage), **summary)
    return summary


class _Group(click.Group):
    """Expected failures (bad input, a missing or corrupt file, a held lock, a diverged run, a full disk) end
    with one `error:` line that names the file or key and the fix; DMD2_DEBUG=1 adds the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (Dmd2Error, OSError) as err:
            if os.environ.get("DMD2_DEBUG", "") not in ("", "0") or not _expected(err):
                raise
            if isinstance(err, StopRequested):  # a requested stop, not a failure
                click.echo(f"stopped: {err}", err=True)
                sys.exit(EXIT_RESUMABLE)
            click.echo(f"error: {_one_line(err)}", err=True)
            sys.exit(2 if isinstance(err, ConfigError) else 1)


def _expected(err: BaseException) -> bool:
    """Our own errors, and the operating system's about files and disks (anything else keeps its traceback)."""
    return isinstance(err, Dmd2Error) or isinstance(err, OSError) and err.errno in (
        errno.ENOSPC, errno.ENOENT, errno.EACCES, errno.EROFS, errno.EDQUOT)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and not isinstance(err, Dmd2Error):
        where = f" ({err.filename})" if err.filename else ""
        hint = "free space and rerun the same command (finished outputs and checkpoints are intact)" \
            if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check the path and its permissions"
        return f"{err.strerror or err}{where}; {hint}"
    return str(err)


class _Stage(click.Command):
    """A pipeline stage's command. Its --help epilog (`_reads`) is made when help is shown: it lists every family's
    teacher keys, and running a stage imports its own family only."""

    def __init__(self, *args, reads: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads = reads

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = _reads(self.reads)
        super().format_epilog(ctx, formatter)


def _reads(stage: str) -> str:
    """A pipeline stage's --help epilog: the params.yaml keys it reads (dmd2.stage.STAGE_PARAMS)."""
    if STAGE_PARAMS[stage] == ("",):
        return "Reads the whole experiment block of params.yaml: a change to any key rewrites the report."
    lines = ["Reads these keys of the experiment's block in params.yaml (override one with --set BLOCK.KEY=VALUE; "
             "under snakemake and dvc a change reruns this stage):"]
    for path in STAGE_PARAMS[stage]:
        lines += [f"{title}: {', '.join(leaf_keys(model))}" for title, model in block_models(path).items()]
    if stage in TRAINING_STAGES:
        lines.append("Inside a Slurm job also slurm.stop_before_limit_minutes and slurm.requeue (when to checkpoint and "
                     "stop before the time limit, and whether to requeue: not results, so a change does not rerun this stage).")
    return "\n\n".join(lines)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """DMD2 distillation pipeline: data → teacher → (regression) → distill → fid-reference → evaluate → report."""
    os.environ.setdefault("WANDB_SILENT", "true")


@main.command("prepare-data", cls=_Stage, reads="prepare_data")
@_common
def prepare_data(ctx: StageContext) -> None:
    """Build data/<exp>/train.lmdb and heldout.lmdb (records + a verified meta record)."""
    from dmd2.data import run_prepare_data

    _run_stage("prepare-data", run_prepare_data, ctx)


def _seed_surface(stage: str):
    """The minimal-DMD user surface: --config YAML, --save_every, --resume_from_checkpoint and the wandb flags."""

    def decorate(func):
        options = [
            click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                         help=f"YAML of {stage} keys, or of any params.yaml blocks (data:, launch:, wandb:, an "
                              "experiment's block, ...); --set still overrides it."),
            click.option("--save_every", type=int, help=f"Checkpoint every N iterations ({stage}.checkpoint_every)."),
            click.option("--resume_from_checkpoint", type=click.Path(exists=True, file_okay=False),
                         help="Resume from this checkpoint directory instead of the latest one in work/.  [default: latest]"),
            click.option("--wandb_mode", type=click.Choice(["disabled", "offline", "online"]), help="wandb.mode"),
            click.option("--wandb_project", help="wandb.project"),
            click.option("--wandb_run_name", help="wandb.run_name"),
            click.option("--wandb_dir", help="wandb.dir"),
            click.option("--wandb_log_every", type=int, help=f"Log scalars every N iterations ({stage}.log_every)."),
            click.option("--wandb_sample_every", type=int, help="Log a sample grid every N iterations "
                         "(distill.sample_every; grids also go to the run directory's samples/)."),
            click.option("--wandb_log_checkpoints", is_flag=True, default=None,
                         help="Upload each checkpoint as a wandb artifact (wandb.log_checkpoints)."),
        ]

        @functools.wraps(func)
        def wrapper(**kw):
            extra = _config_file_overrides(kw.pop("config_file"), stage)
            mapping = {"save_every": f"{stage}.checkpoint_every", "wandb_mode": "wandb.mode",
                       "wandb_project": "wandb.project", "wandb_run_name": "wandb.run_name", "wandb_dir": "wandb.dir",
                       "wandb_log_every": f"{stage}.log_every", "wandb_sample_every": "distill.sample_every",
                       "wandb_log_checkpoints": "wandb.log_checkpoints"}
            for flag, key in mapping.items():
                value = kw.pop(flag)
                if value is not None:
                    extra.append(f"{key}={json.dumps(value)}")
            kw["extra_overrides"] = extra
            return func(**kw)

        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def _config_file_overrides(path: str | None, stage: str) -> list[str]:
    """A `--config` YAML as overrides: keys of `stage`'s block (the seed's `steps: 4`) go to that block; params.yaml's
    own blocks (wandb, an experiment's data/teacher/distill/eval/launch, whole experiment blocks) stay as they are."""
    if not path:
        return []
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping")
    out = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append(f"{prefix}={json.dumps(node)}")

    blocks = set(SHARED_KEYS) | set(ExperimentConfig.model_fields)
    own = set().union(*(m.model_fields for m in stage_models(stage)))
    for key, value in raw.items():
        _check_config_file_key(path, stage, str(key), value, sorted(own | blocks))
        walk(f"{stage}.{key}" if key in own and key not in blocks else key, value)
    return out


def _check_config_file_key(path: str, stage: str, key: str, value: object, known: list[str]) -> None:
    """A `--config` key that is neither the stage's nor a block is a typo (a scalar can be nothing else; a mapping
    may be a whole experiment block, unless its name is one letter off a block's): name the file and the fix."""
    if key in known:
        return
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5 if not isinstance(value, dict) else 0.8)
    if isinstance(value, dict) and not close:
        return  # an experiment's block
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"--config {path}: unknown key '{key}'{hint} (it holds {stage} settings such as "
                      f"steps, and params.yaml blocks such as launch or wandb)")


@main.command(cls=_Stage, reads="teacher")
@_seed_surface("teacher")
@_common
def teacher(ctx: StageContext, resume_from_checkpoint: str | None) -> None:
    """Train the teacher (or record a pretrained one); writes models/<exp>/teacher/. Rerun to resume."""
    from dmd2.teacher import run_teacher

    _run_stage("teacher", run_teacher, ctx, resume_from=_path(resume_from_checkpoint))


@main.command(cls=_Stage, reads="regression")
@_common
def regression(ctx: StageContext) -> None:
    """Pre-train the generator's first step on teacher ODE pairs (regression.enabled; the SDXL one-step recipe); writes
    models/<exp>/regression/. Pairs and checkpoints are kept in work/<exp>/regression/; rerun to resume."""
    if not ctx.exp.regression.enabled:  # the usual case: a record that says so, without importing torch
        folder = ctx.paths.regression
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        record = {"stage": "regression", "enabled": False, "settings": stage_settings(ctx.exp, "regression")}
        (folder / "stage.json").write_text(json.dumps(record, indent=2) + "\n")
        click.echo("regression pre-training is off for this experiment (regression.enabled: false): nothing to do")
        return
    from dmd2.regression import run_regression

    _run_launched("regression", run_regression, ctx)


@main.command(cls=_Stage, reads="distill")
@_seed_surface("distill")
@_common
def distill(ctx: StageContext, resume_from_checkpoint: str | None) -> None:
    """Run DMD2; writes models/<exp>/student/. Checkpoints roll in work/<exp>/distill/; rerun to resume."""
    from dmd2.distill import run_distill

    _run_launched("distill", run_distill, ctx, resume_from=_path(resume_from_checkpoint))


def _run_launched(stage: str, run: Callable[..., dict[str, Any]], ctx: StageContext, **options: Any) -> None:
    """A stage that runs as `launch:`'s processes (regression, distill): this process starts them (`accelerate
    launch`, or srun across machines) and waits, or, started as one of them or with one process, does the work."""
    from accelerate import Accelerator

    from dmd2.launch import relaunch_if_needed
    from dmd2.locks import stage_locks
    from dmd2.tracking import write_stage_record

    started = time.time()
    launch, record = ctx.exp.launch, ctx.paths.stage_record(stage)
    with stage_locks(ctx.paths, stage):  # held by the launcher while its ranks run (they take none)
        if relaunch_if_needed(launch, getattr(ctx.exp.slurm, stage), ctx.paths.launch_config, sys.argv[1:]):
            # rank 0's record (the stage's figures), with the launcher's wall time and the launch shape
            figures = {k: v for k, v in json.loads(record.read_text()).items()
                       if k not in ("stage", "wall_s", "finished_unix", "hardware")} if record.exists() else {}
            write_stage_record(record, stage, started, **{**figures, "settings": stage_settings(ctx.exp, stage),
                               "num_processes": launch.world_size, "num_machines": launch.num_machines,
                               "distributed": launch.distributed})
            return
        acc = Accelerator(cpu=not _cuda())

        def run_rank(c: StageContext, **kwargs: Any) -> dict[str, Any]:
            return {"num_processes": acc.num_processes, **run(c, accelerator=acc, **kwargs)}

        _run_stage(stage, run_rank, ctx, write_record=acc.is_main_process, lock=False, **options)


@main.command("launch-config", cls=_Stage, reads="launch_config")
@_common
def launch_config(ctx: StageContext) -> None:
    """Write configs/<exp>/accelerate.yaml for the cluster shape in `launch:` (validated by accelerate)."""
    from dmd2.launch import write_launch_config

    click.echo(f"wrote {write_launch_config(ctx.exp.launch, ctx.paths.launch_config)}")


@main.command("code-manifests")
@_common
def code_manifests(ctx: StageContext) -> None:
    """Write configs/<exp>/code/<stage>.json: the hashes of the package files each stage runs for this experiment's
    family. DVC's `code` stage; the other stages depend on their own manifest, so editing another family's module
    reruns this command alone and nothing else of the experiment."""
    from dmd2.stage import write_code_manifests

    written = write_code_manifests(ctx.paths, ctx.exp.teacher.family)
    click.echo(f"wrote {len(written)} code manifests under {written[0].parent}")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A teacher or student directory (normalised format).")
@click.option("--output_dir", required=True, type=click.Path(file_okay=False), help="Where the images and grid go.")
@click.option("--num_samples", default=8, show_default=True, type=click.IntRange(min=1),
              help="Samples per class.")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Teacher sampler steps (default: its full sampler).")
@click.option("--seed", default=0, show_default=True)
@click.option("--prompt", "prompts", multiple=True, help="Text-to-image models: a prompt (repeat for several); "
              "--num_samples images of each.")
def generate(model_dir: str, output_dir: str, num_samples: int, steps: int | None, seed: int,
             prompts: tuple[str, ...]) -> None:
    """N samples per class (or per prompt) from any teacher or student checkpoint: PNGs plus grid.png."""
    from dmd2.sampling import generate_folder

    try:
        path = generate_folder(Path(model_dir), Path(output_dir), num_samples, steps, seed, list(prompts))
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    click.echo(f"wrote {path}")


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A text-to-image student directory (models/<exp>/student).")
@click.option("--output_dir", required=True, type=click.Path(file_okay=False),
              help="The diffusers pipeline directory to write: new, empty, or an earlier export (replaced); "
                   "any other directory is refused.")
def export(model_dir: str, output_dir: str) -> None:
    """Write a text-to-image student as a diffusers pipeline directory (the teacher's VAE and text encoders, the
    student's UNet, an LCMScheduler on the student's timesteps): DiffusionPipeline.from_pretrained loads it."""
    from dmd2.export import export_pipeline, student_call_arguments

    path = export_pipeline(Path(model_dir), Path(output_dir))
    call = ", ".join(f"{k}={v!r}" for k, v in student_call_arguments(path).items())
    click.echo(f"wrote {path}; sample it with DiffusionPipeline.from_pretrained({str(path)!r})(prompt, {call})")


@main.command("fid-reference", cls=_Stage, reads="fid_reference")
@_common
def fid_reference(ctx: StageContext) -> None:
    """Train the proxy-FID feature classifier and cache FID reference statistics in models/<exp>/fid_reference/."""
    from dmd2.fid import run_fid_reference

    _run_stage("fid-reference", run_fid_reference, ctx)


@main.command(cls=_Stage, reads="evaluate")
@_common
def evaluate(ctx: StageContext) -> None:
    """Score teacher and student on the same seeds; writes results/<exp>/evaluation.json, metrics.json and grids."""
    from dmd2.evaluate import run_evaluate

    _run_stage("evaluate", run_evaluate, ctx)


@main.command("evaluate-folder")
@click.option("--folder", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to watch.")
@click.option("--output", "output_file", default=None, type=click.Path(dir_okay=False),
              help="JSON-lines file (default: fid_curve.jsonl beside the folder).")
@click.option("--watch/--once", default=False, show_default=True, help="Keep waiting for new checkpoints.")
@click.option("--poll_seconds", default=30.0, show_default=True, help="Wait between scans when watching.")
@_common
def evaluate_folder(ctx: StageContext, folder: str, output_file: str | None, watch: bool, poll_seconds: float) -> None:
    """Score each new distillation checkpoint once and append it to a FID-versus-step file."""
    from dmd2.evaluate import evaluate_checkpoint_folder

    _run_stage("evaluate-folder", evaluate_checkpoint_folder, ctx, folder=Path(folder), output_file=output_file,
               watch=watch, poll_seconds=poll_seconds)


@main.command(cls=_Stage, reads="report")
@_common
def report(ctx: StageContext) -> None:
    """Write the self-contained results/<exp>/report.html."""
    from dmd2.report import run_report

    _run_stage("report", run_report, ctx)


@main.command()
@click.option("--gpus", default=None, type=click.IntRange(min=1), help="Processes (one per GPU) to estimate for "
              "(default: the launch shape's).")
@click.option("--gpu_memory", default=80.0, show_default=True, help="GiB per GPU: says whether it fits, and the "
              "largest launch.micro_batch that does.")
@_common
def memory(ctx: StageContext, gpus: int | None, gpu_memory: float) -> None:
    """Estimate the per-GPU peak memory of `dmd2 distill` for the experiment and launch shape (README "Memory"):
    weights, gradients and optimiser states from the networks' shapes, activations from a fake-tensor pass of each
    turn at the recipe's resolution and micro-batch. Reads no weights; about two minutes for SDXL."""
    from dmd2.memory import describe, estimate, teacher_config

    exp = ctx.exp
    config = teacher_config(exp, ctx.paths.teacher, ctx.paths.root)
    result = estimate(exp, config, processes=gpus)
    processes = gpus or exp.launch.num_machines * exp.launch.processes_per_machine
    click.echo(f"{ctx.experiment}: {processes} GPU(s), global batch {exp.distill.batch_size}, micro-batch "
               f"{result.micro_batch}, distill.mixed_precision {exp.distill.mixed_precision}")
    click.echo(describe(result, gpu_memory))


@main.command("tiny-pipeline")
@click.argument("kind", type=click.Choice(["sd15", "sdxl", "sd3", "flux"]))  # dmd2.tiny_pipelines.KINDS
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--resolution", default=32, show_default=True, help="Image size in pixels (latents are half of it).")
@click.option("--seed", default=0, show_default=True)
def tiny_pipeline(kind: str, output_dir: str, resolution: int, seed: int) -> None:
    """Write a tiny random SD1.5-, SDXL-, SD3- or Flux-shaped diffusers pipeline (offline): a stand-in teacher for
    trying the text-to-image path without the real weights."""
    from dmd2.tiny_pipelines import tiny_pipeline as build

    click.echo(f"{kind} tiny pipeline written to {build(kind, output_dir, resolution, seed)}")


if __name__ == "__main__":
    main()
