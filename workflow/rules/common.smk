# Shared helpers: params.yaml validated by dmd2's own code, the experiment it picks, and its per-stage blocks.
from snakemake.exceptions import WorkflowError

from dmd2.config import ConfigError, check_experiment_name, parse_params
from dmd2.stage import stage_code

# The same validation and messages as `dmd2 <stage>`, before any job runs or any output is touched: a typo in
# params.yaml (or in --config) stops `snakemake -n` with the key path and the closest valid key.
try:
    PARAMS = parse_params(dict(config), "params.yaml (with snakemake --config)")
    EXP = check_experiment_name(config["experiment"], "--config experiment")
    PARAMS.current(EXP)
except ConfigError as err:
    raise WorkflowError(f"\n{err}") from None


def block(stage):
    """The params.yaml block of one stage of the current experiment (a rerun trigger via `params:`)."""
    return config[EXP].get(stage, {})


def code(stage):
    """The package files a stage runs: inputs, so that editing e.g. the losses reruns distillation
    (dmd2.stage.stage_code follows the stage's imports; dvc.yaml lists the same files, tests/test_dag.py checks)."""
    return stage_code(stage, workflow.basedir)


def distill_resources():
    """Slurm resources of the distill job, from `launch:` in params.yaml (ignored by local runs)."""
    launch = PARAMS.current(EXP).launch
    slurm = launch.slurm
    resources = {
        "nodes": slurm.nodes or launch.num_machines,
        "tasks": launch.num_machines,  # one launcher task per machine; each starts processes_per_machine ranks
        "mpi": "srun",
        "runtime": slurm.runtime_minutes,
        "mem_mb": slurm.mem_mb,
        "cpus_per_task": slurm.cpus_per_task,
    }
    if launch.gpus_per_machine:
        resources.update(gres=f"gpu:{launch.gpus_per_machine}", tasks_per_gpu=0)
    if slurm.partition:
        resources["slurm_partition"] = slurm.partition
    if slurm.account:
        resources["slurm_account"] = slurm.account
    return resources


def heavy_threads():
    """Torch stages take every core of a local run (two side by side oversubscribe the cores and thrash);
    a cluster job gets launch.slurm.cpus_per_task, the same number on the submit host and inside the job."""
    if workflow.non_local_exec or workflow.remote_exec:
        return PARAMS.current(EXP).launch.slurm.cpus_per_task
    try:
        return workflow.cores
    except WorkflowError:  # a dry run without --cores
        return 1
