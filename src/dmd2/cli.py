"""`dmd2 <stage>`: one thin sub-command per pipeline stage.

Every stage reads params.yaml (`--params`), takes `--set key=value` overrides (a path relative to the current
experiment, e.g. `--set distill.steps=100`, or absolute, e.g. `--set mnist.distill.steps=100`), and writes only
its declared outputs. Running a training stage again resumes it from its last checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import click
import yaml

from dmd2.config import ConfigError, Params, load_params
from dmd2.paths import ExperimentPaths


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
        params = load_params(params_path, overrides)
        name = experiment or params.experiment
        params.current(name)
        return func(params=params, name=name, paths=ExperimentPaths(name, Path(root)), **kwargs)

    return wrapper


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """DMD2 distillation pipeline: data → teacher → distill → fid-reference → evaluate → report."""
    os.environ.setdefault("WANDB_SILENT", "true")


@main.command("prepare-data")
@_common
def prepare_data(params: Params, name: str, paths: ExperimentPaths) -> None:
    """Build data/<exp>/train.lmdb and heldout.lmdb (records + a verified meta record)."""
    from dmd2.data import prepare_mnist
    from dmd2.tracking import write_stage_record

    started, cfg = time.time(), params.current(name).data
    summary = prepare_mnist(paths.data, cfg.resolution, cfg.heldout_fraction, cfg.seed)
    write_stage_record(paths.data / "stage.json", "prepare-data", started, **summary)
    click.echo(f"wrote {paths.data}/train.lmdb ({summary['train']}) and heldout.lmdb ({summary['heldout']})")


def _seed_surface(stage: str):
    """The minimal-DMD user surface: --config YAML, --save_every, --resume_from_checkpoint and the wandb flags."""

    def decorate(func):
        options = [
            click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
                         help=f"YAML of {stage} keys (or a params-style file); --set still overrides it."),
            click.option("--save_every", type=int, help=f"Checkpoint every N iterations ({stage}.checkpoint_every)."),
            click.option("--resume_from_checkpoint", type=click.Path(exists=True, file_okay=False),
                         help="Resume from this checkpoint directory instead of the latest one in work/.  [default: latest]"),
            click.option("--wandb_mode", type=click.Choice(["disabled", "offline", "online"]), help="wandb.mode"),
            click.option("--wandb_project", help="wandb.project"),
            click.option("--wandb_run_name", help="wandb.run_name"),
            click.option("--wandb_dir", help="wandb.dir"),
            click.option("--wandb_log_every", type=int, help=f"Log scalars every N iterations ({stage}.log_every)."),
            click.option("--wandb_sample_every", type=int, help="Log a sample grid every N iterations (distill.sample_every)."),
            click.option("--wandb_log_checkpoints", is_flag=True, default=None, help="Upload checkpoints as artifacts."),
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
    if not path:
        return []
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping")
    out = []

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out.append(f"{prefix}={json.dumps(node)}")

    for key, value in raw.items():
        top = key if key in ("wandb", "data", "teacher", "distill", "eval") else f"{stage}.{key}"
        walk(top, value)
    return out


@main.command()
@_seed_surface("teacher")
@_common
def teacher(params: Params, name: str, paths: ExperimentPaths, resume_from_checkpoint: str | None) -> None:
    """Train the EDM teacher; writes models/<exp>/teacher/ (safetensors + config.json). Rerun to resume."""
    from dmd2.teacher import train_teacher
    from dmd2.tracking import write_stage_record

    started = time.time()
    summary = train_teacher(params.current(name), paths.data, paths.teacher, paths.work("teacher"), params.wandb, name,
                            resume_from=_path(resume_from_checkpoint))
    write_stage_record(paths.teacher / "stage.json", "teacher", started, **summary)


@main.command()
@_seed_surface("distill")
@_common
def distill(params: Params, name: str, paths: ExperimentPaths, resume_from_checkpoint: str | None) -> None:
    """Run DMD2; writes models/<exp>/student/. Checkpoints roll in work/<exp>/distill/; rerun to resume."""
    from accelerate import Accelerator

    from dmd2.distill import run_distill
    from dmd2.launch import relaunch_if_needed
    from dmd2.tracking import write_stage_record

    started = time.time()
    launch = params.current(name).launch
    if relaunch_if_needed(launch, paths.launch_config, sys.argv[1:]):
        write_stage_record(paths.student / "stage.json", "distill", started, num_processes=launch.world_size,
                           num_machines=launch.num_machines, distributed=launch.distributed)
        return
    acc = Accelerator(cpu=not _cuda())
    summary = run_distill(params.current(name), paths.data, paths.teacher, paths.student, paths.work("distill"),
                          params.wandb, name, acc, resume_from=_path(resume_from_checkpoint))
    if acc.is_main_process:
        write_stage_record(paths.student / "stage.json", "distill", started, num_processes=acc.num_processes, **summary)


@main.command("launch-config")
@_common
def launch_config(params: Params, name: str, paths: ExperimentPaths) -> None:
    """Write configs/<exp>/accelerate.yaml for the cluster shape in `launch:` (validated by accelerate)."""
    from dmd2.launch import write_launch_config

    click.echo(f"wrote {write_launch_config(params.current(name).launch, paths.launch_config)}")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@main.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A teacher or student directory (normalised format).")
@click.option("--output_dir", required=True, type=click.Path(file_okay=False), help="Where the images and grid go.")
@click.option("--num_samples", default=8, show_default=True, help="Samples per class.")
@click.option("--steps", default=None, type=int, help="Teacher Heun steps (default: its full sampler).")
@click.option("--seed", default=0, show_default=True)
def generate(model_dir: str, output_dir: str, num_samples: int, steps: int | None, seed: int) -> None:
    """N samples per class from any teacher or student checkpoint: PNGs plus grid.png."""
    from dmd2.sampling import generate_folder

    path = generate_folder(Path(model_dir), Path(output_dir), num_samples, steps, seed)
    click.echo(f"wrote {path}")


@main.command("fid-reference")
@_common
def fid_reference(params: Params, name: str, paths: ExperimentPaths) -> None:
    """Train the proxy-FID feature classifier and cache FID reference statistics in models/<exp>/fid_reference/."""
    from dmd2.fid import run_fid_reference

    run_fid_reference(params.current(name), paths)


@main.command()
@_common
def evaluate(params: Params, name: str, paths: ExperimentPaths) -> None:
    """Score teacher and student on the same seeds; writes results/<exp>/metrics.json and sample grids."""
    from dmd2.evaluate import run_evaluate

    run_evaluate(params.current(name), paths)


@main.command("evaluate-folder")
@click.option("--folder", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to watch.")
@click.option("--output", "output_file", default=None, help="JSON-lines file (default: fid_curve.jsonl beside the folder).")
@click.option("--watch/--once", default=False, show_default=True, help="Keep waiting for new checkpoints.")
@click.option("--poll_seconds", default=30.0, show_default=True, help="Wait between scans when watching.")
@_common
def evaluate_folder(params: Params, name: str, paths: ExperimentPaths, folder: str, output_file: str | None,
                    watch: bool, poll_seconds: float) -> None:
    """Score each new distillation checkpoint once and append it to a FID-versus-step file."""
    from dmd2.evaluate import evaluate_checkpoint_folder

    evaluate_checkpoint_folder(params.current(name), paths, Path(folder), output_file, watch, poll_seconds)


@main.command()
@_common
def report(params: Params, name: str, paths: ExperimentPaths) -> None:
    """Write the self-contained results/<exp>/report.html."""
    from dmd2.report import run_report

    click.echo(f"wrote {run_report(params, name, paths)}")


if __name__ == "__main__":
    main()
