"""The Slurm job each stage asks for under `snakemake --profile slurm`, as the slurm executor plugin's resources.

params.yaml's `<experiment>.slurm` block names one job per stage (config.SlurmConfig). Most stages are one task
on one node, with `gpus` GPUs. The jobs of the stages that start `launch:`'s processes (regression, distill)
follow it: on one machine one task holding every GPU, inside which `dmd2 <stage>` starts its processes with
`accelerate launch`; on several machines one launcher task per machine (`mpi`, so the command runs in the batch
script and `dmd2 <stage>` starts the tasks with its own `srun`, see dmd2.launch). The Snakefile reads these; no stage does, so no stage's code depends on
this module.
"""

from __future__ import annotations

from dmd2.config import ExperimentConfig, SlurmConfig, SlurmLaunchJob, SlurmResources

STAGES = tuple(name for name, field in SlurmConfig.model_fields.items()
               if isinstance(field.annotation, type) and issubclass(field.annotation, SlurmResources))
LAUNCHED = tuple(name for name in STAGES if SlurmConfig.model_fields[name].annotation is SlurmLaunchJob)


def snakemake_resources(exp: ExperimentConfig, stage: str) -> dict[str, int | str]:
    """The `resources:` of the stage's rule (names as the slurm executor plugin reads them)."""
    if stage not in STAGES:
        raise ValueError(f"no Slurm job for stage {stage!r}; stages: {', '.join(STAGES)}")
    slurm, launch = exp.slurm, exp.launch
    job = getattr(slurm, stage)
    resources: dict[str, int | str] = {"runtime": job.runtime_minutes, "mem_mb": job.mem_mb, "cpus_per_task": job.cpus}
    if job.partition or slurm.partition:
        resources["slurm_partition"] = job.partition or slurm.partition
    if slurm.account:
        resources["slurm_account"] = slurm.account
    gpus = launch.gpus_per_machine if stage in LAUNCHED else job.gpus
    if stage in LAUNCHED and launch.num_machines > 1:
        resources.update(nodes=job.nodes or launch.num_machines, tasks=launch.num_machines, mpi="srun")
        if gpus:
            # GPUs per node; tasks_per_gpu=0 keeps the plugin from turning `tasks` into --ntasks-per-gpu
            resources.update(gres=f"gpu:{gpus}", tasks_per_gpu=0)
    elif gpus:
        resources["gpu"] = gpus  # sbatch --gpus=N, and the same on the job step's srun
    return resources
