"""Launch configuration: accelerate config files from `launch:` in params.yaml, and the launcher command line.

`dmd2 launch-config` writes one accelerate config (per-node values such as the machine rank are given on the
command line, so one file serves every node). `dmd2 regression` and `dmd2 distill` use `relaunch_if_needed` to
start themselves as the configured number of processes: on one machine through `accelerate launch` (inside a
Slurm job too, where the job step already holds the machine's CPUs and GPUs); on several, inside a Slurm
allocation, through one `srun` task per launcher, each expanding its own rank, the head node's address and a
job-specific port.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from dmd2.config import LaunchConfig, SlurmLaunchJob
from dmd2.errors import LaunchError, MissingInputError

LAUNCHED_ENV = "DMD2_LAUNCHED"  # set in the children so they do not relaunch themselves


def accelerate_config(launch: LaunchConfig) -> dict[str, Any]:
    """The accelerate config for this cluster shape (machine rank 0; other nodes override it on the CLI)."""
    gpu = launch.gpus_per_machine > 0
    if launch.distributed == "no":
        kind = "NO"
    elif launch.distributed == "ddp" or not gpu:
        # accelerate's FSDP plugin needs accelerators; on CPU the DDP path runs (and FSDP2 is tested directly).
        kind = "MULTI_GPU"
    else:
        kind = "FSDP"
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": kind,
        "downcast_bf16": "no",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": launch.mixed_precision,
        "num_machines": launch.num_machines,
        "num_processes": launch.world_size,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,  # CPU runs set ACCELERATE_USE_CPU (accelerate's --cpu path is single-process only)
        "main_process_port": launch.main_process_port,
        "gpu_ids": "all",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }
    if kind == "FSDP":
        config["fsdp_config"] = fsdp_section(launch)
        if launch.fsdp.version == 2 and launch.fsdp.sharding_strategy.startswith("HYBRID"):
            # FSDP2 expresses hybrid sharding as a 2-D mesh: replicate across machines, shard within one
            config["parallelism_config"] = {"parallelism_config_dp_replicate_size": launch.num_machines,
                                            "parallelism_config_dp_shard_size": launch.processes_per_machine}
    return config


def fsdp_section(launch: LaunchConfig) -> dict[str, Any]:
    f = launch.fsdp
    section: dict[str, Any] = {
        "fsdp_version": f.version,
        "fsdp_auto_wrap_policy": f.auto_wrap_policy,
        "fsdp_state_dict_type": f.state_dict_type,
        "fsdp_cpu_ram_efficient_loading": f.cpu_ram_efficient_loading,
        "fsdp_activation_checkpointing": f.activation_checkpointing,
        "fsdp_offload_params": False,
    }
    if f.auto_wrap_policy == "SIZE_BASED_WRAP":
        section["fsdp_min_num_params"] = f.min_num_params
    if f.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        section["fsdp_transformer_layer_cls_to_wrap"] = ",".join(f.transformer_layer_cls_to_wrap)
    if f.version == 1:
        section.update(fsdp_sharding_strategy=f.sharding_strategy, fsdp_backward_prefetch="BACKWARD_PRE",
                       fsdp_forward_prefetch=False, fsdp_sync_module_states=True, fsdp_use_orig_params=True)
    else:  # FSDP2: FULL_SHARD/HYBRID_SHARD ↔ reshard after forward, the ZeRO-2 ones ↔ keep parameters gathered
        section["fsdp_reshard_after_forward"] = f.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
    return section


def write_launch_config(launch: LaunchConfig, path: Path) -> Path:
    """Write the accelerate config and prove it loads with accelerate's own reader."""
    from accelerate.commands.config.config_args import load_config_from_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.yaml")
    tmp.write_text(yaml.safe_dump(accelerate_config(launch), sort_keys=True))
    loaded = load_config_from_file(str(tmp))
    assert loaded.num_processes == launch.world_size and loaded.num_machines == launch.num_machines
    os.replace(tmp, path)
    return path


def launcher_command(launch: LaunchConfig, job: SlurmLaunchJob, config_file: Path, stage_args: list[str],
                     slurm_job_id: str | None) -> list[str]:
    """The command that starts `launch.world_size` processes of `dmd2 <stage_args>` (`job`: the stage's
    Slurm resources; `slurm_job_id`: the job we run in, or None outside Slurm)."""
    inner = ["accelerate", "launch", "--config_file", str(config_file), "--num_machines", str(launch.num_machines),
             "--num_processes", str(launch.world_size), "--mixed_precision", launch.mixed_precision,
             "--dynamo_backend", "no"]
    if launch.distributed != "no":
        # accelerate only starts the processes and the process group (gloo with ACCELERATE_USE_CPU); under
        # fsdp dmd2 shards the models itself with FSDP2 (dmd2.sharding), so the launcher never applies a plugin.
        inner.append("--multi_gpu")
    tail = ["-m", "dmd2.cli", *stage_args]
    if launch.num_machines == 1:
        # two single-machine jobs may share a node: each its own port
        port = launch.main_process_port + (int(slurm_job_id) % 1000 if slurm_job_id else 0)
        return [*inner, "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                *tail]
    if slurm_job_id is None:
        raise LaunchError(f"launch.num_machines={launch.num_machines} needs one launcher per machine: run "
                          "inside a Slurm allocation (snakemake --profile workflow/profiles/slurm), or on each "
                          f"machine i: accelerate launch --config_file {config_file} --machine_rank i ...")
    # One srun task (launcher) per machine; every task's own shell expands its rank, the first host's address
    # and the job's port. With one launcher per node the machine rank is the node id; where several launchers
    # share a node (a 1-node test cluster with slurm.distill.nodes: 1), the task id tells them apart instead.
    nodes = job.nodes or launch.num_machines
    one_per_node = nodes == launch.num_machines
    rank = "$SLURM_NODEID" if one_per_node else "$SLURM_PROCID"
    # the head's address as Slurm reaches it (NodeAddr: the node's name unless the cluster says otherwise)
    head = ("$(scontrol show node \"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1)\""
            " | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)")
    script = (f"{shlex.join(inner)} --machine_rank {rank} --main_process_ip {head}"
              f" --main_process_port $(({launch.main_process_port} + SLURM_JOB_ID % 1000)) {shlex.join(tail)}")
    placement = [f"--nodes={nodes}", "--ntasks-per-node=1"] if one_per_node else []
    # srun may not inherit the batch job's --cpus-per-task (Slurm 22.05 on): each task asks for its own
    resources = [f"--cpus-per-task={job.cpus}"]
    if launch.gpus_per_machine:
        resources.append(f"--gres=gpu:{launch.gpus_per_machine}")
    return ["srun", f"--ntasks={launch.num_machines}", *placement, *resources, "--kill-on-bad-exit=1",
            "bash", "-c", script]


def relaunch_if_needed(launch: LaunchConfig, job: SlurmLaunchJob, config_file: Path, stage_args: list[str]) -> bool:
    """Start the configured processes and wait for them; False when this process should just do the work."""
    if launch.world_size == 1 or os.environ.get(LAUNCHED_ENV) or "LOCAL_RANK" in os.environ:
        return False
    if not config_file.exists():
        raise MissingInputError(f"{config_file} is missing; run `dmd2 launch-config` first")
    env = {**os.environ, LAUNCHED_ENV: "1"}
    if launch.gpus_per_machine == 0:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    command = launcher_command(launch, job, config_file, stage_args, os.environ.get("SLURM_JOB_ID"))
    print("launching:", shlex.join(command), flush=True)
    # A stop signal is for the ranks (dmd2.stopping): ignored here, and so by the launcher processes, which inherit
    # the setting (SIGUSR1's default action would end them under the ranks); the ranks install their own handler.
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        result = subprocess.run(command, env=env)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    if result.returncode != 0:
        sys.exit(result.returncode)
    return True
