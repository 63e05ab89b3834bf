"""Launch configs: every cluster shape writes an accelerate config that accelerate itself loads."""

import pytest
import yaml

from dmd2.config import LaunchConfig, SlurmLaunchJob
from dmd2.launch import launcher_command, write_launch_config

STRATEGIES = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD", "HYBRID_SHARD_ZERO2"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fsdp1_configs_load_in_accelerate(tmp_path, strategy):
    launch = LaunchConfig(distributed="fsdp", num_machines=8, processes_per_machine=8, gpus_per_machine=8,
                          fsdp={"version": 1, "sharding_strategy": strategy})
    path = write_launch_config(launch, tmp_path / "accelerate.yaml")
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] == "FSDP" and data["num_processes"] == 64 and data["num_machines"] == 8
    assert data["fsdp_config"]["fsdp_sharding_strategy"] == strategy
    assert data["fsdp_config"]["fsdp_version"] == 1


@pytest.mark.parametrize("strategy,reshard", [("FULL_SHARD", True), ("SHARD_GRAD_OP", False)])
def test_fsdp2_configs_map_strategies_to_reshard_after_forward(tmp_path, strategy, reshard):
    launch = LaunchConfig(distributed="fsdp", num_machines=2, processes_per_machine=4, gpus_per_machine=4,
                          fsdp={"version": 2, "sharding_strategy": strategy, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                "transformer_layer_cls_to_wrap": ["BasicTransformerBlock", "ResnetBlock2D"]})
    data = yaml.safe_load(write_launch_config(launch, tmp_path / "a.yaml").read_text())["fsdp_config"]
    assert data["fsdp_version"] == 2 and data["fsdp_reshard_after_forward"] is reshard
    assert data["fsdp_transformer_layer_cls_to_wrap"] == "BasicTransformerBlock,ResnetBlock2D"


@pytest.mark.parametrize("strategy,reshard", [("HYBRID_SHARD", True), ("HYBRID_SHARD_ZERO2", False)])
def test_fsdp2_hybrid_configs_carry_the_two_dimensional_mesh(tmp_path, strategy, reshard):
    launch = LaunchConfig(distributed="fsdp", num_machines=8, processes_per_machine=8, gpus_per_machine=8,
                          fsdp={"version": 2, "sharding_strategy": strategy})
    data = yaml.safe_load(write_launch_config(launch, tmp_path / "a.yaml").read_text())
    assert data["fsdp_config"]["fsdp_reshard_after_forward"] is reshard
    assert data["parallelism_config"] == {"parallelism_config_dp_replicate_size": 8,
                                          "parallelism_config_dp_shard_size": 8}


def test_invalid_shapes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="use distributed: ddp"):
        LaunchConfig(distributed="fsdp", fsdp={"version": 2, "sharding_strategy": "NO_SHARD"})
    with pytest.raises(ValueError, match="ddp or fsdp"):
        LaunchConfig(processes_per_machine=2)


def test_slurm_launcher_expands_rank_address_and_port_inside_each_task(tmp_path):
    launch = LaunchConfig(distributed="fsdp", num_machines=8, processes_per_machine=8, gpus_per_machine=8,
                          fsdp={"version": 1, "sharding_strategy": "HYBRID_SHARD"})
    cmd = launcher_command(launch, SlurmLaunchJob(cpus=96), tmp_path / "a.yaml", ["distill"], slurm_job_id="4242")
    # each task asks for its CPUs and GPUs itself: srun does not inherit the batch job's --cpus-per-task
    assert cmd[:7] == ["srun", "--ntasks=8", "--nodes=8", "--ntasks-per-node=1", "--cpus-per-task=96", "--gres=gpu:8",
                       "--kill-on-bad-exit=1"]
    assert cmd[7:9] == ["bash", "-c"]
    script = cmd[9]
    # expanded by each task's shell, not by the batch script: a single-quoted `bash -c` body
    assert "--machine_rank $SLURM_NODEID" in script and "--num_processes 64" in script
    assert "scontrol show hostnames" in script and "$((29500 + SLURM_JOB_ID % 1000))" in script
    # two launchers on one node (the CI cluster): told apart by their task id
    shared = LaunchConfig(distributed="ddp", num_machines=2)
    cmd = launcher_command(shared, SlurmLaunchJob(nodes=1, cpus=1), tmp_path / "a.yaml", ["distill"], "7")
    assert cmd[:4] == ["srun", "--ntasks=2", "--cpus-per-task=1", "--kill-on-bad-exit=1"]
    assert "--machine_rank $SLURM_PROCID" in cmd[6]
    with pytest.raises(RuntimeError, match="one launcher per machine"):
        launcher_command(shared, SlurmLaunchJob(), tmp_path / "a.yaml", ["distill"], slurm_job_id=None)


def test_one_machine_launches_accelerate_directly_inside_slurm_too(tmp_path):
    """A single-machine job's step already holds the node's CPUs and GPUs: a nested srun would wait for them
    forever. Its port moves with the job id, so two such jobs on one node do not collide."""
    seven = LaunchConfig(distributed="ddp", processes_per_machine=7, gpus_per_machine=7)
    local = launcher_command(seven, SlurmLaunchJob(), tmp_path / "a.yaml", ["distill"], slurm_job_id=None)
    assert local[:2] == ["accelerate", "launch"] and "--multi_gpu" in local
    assert local[local.index("--main_process_port") + 1] == "29500"
    in_job = launcher_command(seven, SlurmLaunchJob(), tmp_path / "a.yaml", ["distill"], slurm_job_id="123457")
    assert in_job[:2] == ["accelerate", "launch"] and in_job[in_job.index("--num_processes") + 1] == "7"
    assert in_job[in_job.index("--main_process_port") + 1] == str(29500 + 457)


def test_size_based_wrap_claims_parameters_bottom_up_and_skips_containers():
    from torch import nn

    from dmd2.config import FSDPConfig
    from dmd2.sharding import wrap_units

    big = nn.Linear(10, 10)                                     # 110 parameters: its own unit
    pair = nn.ModuleList([nn.Linear(7, 7), nn.Linear(7, 7)])    # 56 + 56: neither alone, the list cannot be hooked
    small = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))     # 20 + 20 = 40: stays with its parent
    block = nn.Sequential(small, nn.Linear(8, 8))               # 40 + 72 = 112 unclaimed: a unit
    model = nn.ModuleDict({"big": big, "pair": pair, "block": block})
    assert wrap_units(model, FSDPConfig(min_num_params=100)) == [big, block]
    assert wrap_units(model, FSDPConfig(auto_wrap_policy="NO_WRAP")) == []
    by_name = FSDPConfig(auto_wrap_policy="TRANSFORMER_BASED_WRAP", transformer_layer_cls_to_wrap=["Linear"])
    assert len(wrap_units(model, by_name)) == 6
