"""Launch configs: every cluster shape writes an accelerate config that accelerate itself loads."""

import pytest
import yaml

from dmd2.config import LaunchConfig
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


def test_invalid_shapes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="fsdp.version: 1"):
        LaunchConfig(distributed="fsdp", fsdp={"version": 2, "sharding_strategy": "HYBRID_SHARD"})
    with pytest.raises(ValueError, match="ddp or fsdp"):
        LaunchConfig(processes_per_machine=2)


def test_slurm_launcher_expands_rank_address_and_port_inside_each_task(tmp_path):
    launch = LaunchConfig(distributed="fsdp", num_machines=8, processes_per_machine=8, gpus_per_machine=8,
                          fsdp={"version": 1, "sharding_strategy": "HYBRID_SHARD"})
    cmd = launcher_command(launch, tmp_path / "a.yaml", ["distill"], in_slurm=True)
    assert cmd[:3] == ["srun", "--ntasks=8", "--kill-on-bad-exit=1"] and cmd[3:5] == ["bash", "-c"]
    script = cmd[5]
    # expanded by each task's shell, not by the batch script: a single-quoted `bash -c` body
    assert "--machine_rank $SLURM_PROCID" in script and "--num_processes 64" in script
    assert "scontrol show hostnames" in script and "$((29500 + SLURM_JOB_ID % 1000))" in script
    local = launcher_command(LaunchConfig(distributed="ddp", processes_per_machine=2), tmp_path / "a.yaml",
                             ["distill"], in_slurm=False)
    assert local[:2] == ["accelerate", "launch"] and "--multi_gpu" in local
    with pytest.raises(RuntimeError, match="one launcher per machine"):
        launcher_command(LaunchConfig(distributed="ddp", num_machines=2), tmp_path / "a.yaml", ["distill"], False)
