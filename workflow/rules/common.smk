# Shared helpers: the experiment picked by `experiment:` in params.yaml and its per-stage blocks.
from snakemake.exceptions import WorkflowError


EXP = config["experiment"]


def block(stage):
    """The params.yaml block of one stage of the current experiment (a rerun trigger via `params:`)."""
    return config[EXP].get(stage, {})


def distill_resources():
    """Slurm resources of the distill job, from `launch:` in params.yaml (ignored by local runs)."""
    launch = block("launch")
    slurm = launch.get("slurm", {})
    machines = launch.get("num_machines", 1)
    resources = {
        "nodes": slurm.get("nodes") or machines,
        "tasks": machines,  # one launcher task per machine; each starts processes_per_machine ranks
        "mpi": "srun",
        "runtime": slurm.get("runtime_minutes", 60),
        "mem_mb": slurm.get("mem_mb", 8000),
        "cpus_per_task": slurm.get("cpus_per_task", 2),
    }
    if launch.get("gpus_per_machine", 0):
        resources.update(gres=f"gpu:{launch['gpus_per_machine']}", tasks_per_gpu=0)
    if slurm.get("partition"):
        resources["slurm_partition"] = slurm["partition"]
    if slurm.get("account"):
        resources["slurm_account"] = slurm["account"]
    return resources


def heavy_threads():
    """Torch stages take every core of a local run (two side by side oversubscribe the cores and thrash);
    a cluster job gets launch.slurm.cpus_per_task, the same number on the submit host and inside the job."""
    if workflow.non_local_exec or workflow.remote_exec:
        return block("launch").get("slurm", {}).get("cpus_per_task", 2)
    try:
        return workflow.cores
    except WorkflowError:  # a dry run without --cores
        return 1
