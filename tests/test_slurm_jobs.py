"""What `snakemake --profile slurm` submits for each recipe, recorded by an `sbatch` on PATH (no Slurm needed).

The recorder writes its command line and fails, so each run submits exactly one job: the stage forced with `-f`,
its inputs made to exist beforehand. The lines are checked against the recipe's `slurm:` and `launch:` blocks in
params.yaml. tests/test_slurm.py runs the whole pipeline on a real local Slurm cluster.
"""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from test_dag import project_copy, snakemake_stages

from dmd2.config import load_params
from dmd2.launch import launcher_command

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("slurm_jobs")]

# the cluster a new user meets: sbatch records and refuses; sinfo lists a default partition; no accounting (sacct)
STUBS = {
    "sbatch": """printf '%s\\n' "$*" >> "$SBATCH_RECORD"; echo "sbatch: error: recorded, not submitted" >&2; exit 1""",
    "sinfo": """printf 'PARTITION\\ndebug*\\ngpu\\n'""",
    "sacct": """echo "sacct: error: no accounting storage" >&2; exit 1""",
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = project_copy(tmp_path_factory.mktemp("slurm-jobs"))
    bin_dir = root / "stub-bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return root


def submitted(root: Path, experiment: str, stage: str) -> list[str]:
    """The sbatch arguments `snakemake --profile slurm` uses for `stage` of `experiment` (upstream outputs exist)."""
    # every output exists and is newer than what it is made from (the rules are defined in the DAG's order, and
    # the package files may have been edited a moment ago)
    for order, rule in enumerate(snakemake_stages(root, experiment).values()):
        for out in rule["outs"]:
            path = root / out
            if Path(out).suffix in (".json", ".html", ".yaml"):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:
                path.mkdir(parents=True, exist_ok=True)
            stamp = time.time() + 10 + order
            os.utime(path, (stamp, stamp))
    record = root / f"sbatch-{experiment}-{stage}.txt"
    env = {**os.environ, "PATH": f"{root / 'stub-bin'}:{os.environ['PATH']}", "SBATCH_RECORD": str(record)}
    proc = subprocess.run(["snakemake", "--profile", "slurm", "--config", f"experiment={experiment}", "-f", stage,
                           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"],
                          cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert record.exists(), f"no sbatch call for {experiment}/{stage}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    lines = record.read_text().splitlines()
    assert len(lines) == 1, lines
    return shlex.split(lines[0].split(" --wrap=")[0])


def option(args: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` (short options too) in an sbatch argument list."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return args[i + 1]
    return None


def test_mnist_jobs_are_one_cpu_task_each_with_the_recipe_resources(project):
    exp = load_params(project / "params.yaml").current("mnist")
    for stage in ("prepare_data", "distill", "report"):
        job = getattr(exp.slurm, stage)
        args = submitted(project, "mnist", stage)
        assert option(args, "--ntasks") == "1" and option(args, "--cpus-per-task") == str(job.cpus)
        assert option(args, "--mem") == str(job.mem_mb) and option(args, "-t") == str(job.runtime_minutes)
        assert option(args, "--nodes") is None and option(args, "--gpus") is None and option(args, "--gres") is None
        assert "--requeue" in args  # a training stage requeues its own job before the time limit


def test_imagenet64_distills_on_one_node_with_all_seven_gpus_in_one_task(project):
    """The paper's 7-GPU shape: one task holding the node's GPUs, where `dmd2 distill` starts accelerate itself
    (it used to be refused at submission: an `mpi` job needs more than one task)."""
    params = load_params(project / "params.yaml").current("imagenet64")
    args = submitted(project, "imagenet64", "distill")
    assert option(args, "--gpus") == "7" and option(args, "--cpus-per-task") == str(params.slurm.distill.cpus)
    assert option(args, "--ntasks") is None and option(args, "--ntasks-per-gpu") is None
    assert option(args, "-p") == params.slurm.partition == "gpu"
    launched = launcher_command(params.launch, params.slurm.distill, Path("a.yaml"), ["distill"], slurm_job_id="1")
    assert launched[:2] == ["accelerate", "launch"]  # no nested srun inside the job step
    evaluate = submitted(project, "imagenet64", "evaluate")
    assert option(evaluate, "--gpus") == "1" and option(evaluate, "-t") == str(params.slurm.evaluate.runtime_minutes)


def test_sdxl_distills_across_eight_nodes_one_launcher_task_each(project):
    params = load_params(project / "params.yaml").current("sdxl")
    job = params.slurm.distill
    args = submitted(project, "sdxl", "distill")
    assert option(args, "--nodes") == "8" and option(args, "--ntasks") == "8" and option(args, "--gres") == "gpu:8"
    assert option(args, "--cpus-per-task") == str(job.cpus) and option(args, "--mem") == str(job.mem_mb)
    assert option(args, "-p") == "gpu" and option(args, "--ntasks-per-gpu") is None
    srun = launcher_command(params.launch, job, Path("a.yaml"), ["distill"], slurm_job_id="1")
    assert srun[:7] == ["srun", "--ntasks=8", "--nodes=8", "--ntasks-per-node=1", f"--cpus-per-task={job.cpus}",
                        "--gres=gpu:8", "--kill-on-bad-exit=1"]
    # the other heavy stages get a GPU and their own limits
    for stage in ("prepare_data", "evaluate"):
        args = submitted(project, "sdxl", stage)
        assert option(args, "--gpus") == str(getattr(params.slurm, stage).gpus) == "1"
        assert option(args, "-t") == str(getattr(params.slurm, stage).runtime_minutes)
    # the one-step recipe's regression runs in distillation's launch shape: one launcher per node, 8 × 8 GPUs
    one_step = load_params(project / "params.yaml").current("sdxl-1step")
    regression = submitted(project, "sdxl-1step", "regression")
    assert option(regression, "--nodes") == "8" and option(regression, "--ntasks") == "8"
    assert option(regression, "--gres") == "gpu:8" and option(regression, "--gpus") is None
    assert option(regression, "--cpus-per-task") == str(one_step.slurm.regression.cpus)
    assert option(regression, "-t") == str(one_step.slurm.regression.runtime_minutes)
    srun = launcher_command(one_step.launch, one_step.slurm.regression, Path("a.yaml"), ["regression"], "1")
    assert srun[:2] == ["srun", "--ntasks=8"] and srun[-1].endswith("-m dmd2.cli regression")
