"""The default experiment through `snakemake --profile slurm` (the form users type) on a real local Slurm cluster.

The test starts munged + slurmctld + two slurmd on localhost (tests/slurm/local-slurm.sh: nodes n1 and n2), runs
the tiny pipeline with the distill rule as a 2-node job (one launcher task per node, one rank each, rendezvous over
gloo at the first node's address, FSDP2 hybrid sharding across them), then distils again as one task that starts 2
processes itself (the single-machine shape), and stops only the daemons it started (by pid). Skipped, with the reason, where Slurm is not
installed or we are not root.
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_dag import project_copy
from tiny import run_dir, write_tiny_params

from dmd2.checkpoint import latest_checkpoint

SCRIPT = REPO / "tests/slurm/local-slurm.sh"
# FSDP2 hybrid sharding over a (machines × processes per machine) mesh, the SDXL recipe's shape: a 2 × 1 mesh
# that only a multi-launcher run can build (the local tests cover FULL_SHARD, SHARD_GRAD_OP and a 1 × 2 mesh),
# one launcher on each of the two nodes
SLURM_LAUNCH = {"launch": {"distributed": "fsdp", "num_machines": 2, "processes_per_machine": 1,
                           "fsdp": {"sharding_strategy": "HYBRID_SHARD", "min_num_params": 2000}},
                "slurm": {"distill": {"cpus": 1, "mem_mb": 2000, "runtime_minutes": 20}}}
# then one launcher starting 2 processes, with a new distillation seed so that the run is new
ONE_MACHINE = {"launch": {"distributed": "ddp", "num_machines": 1, "processes_per_machine": 2},
               "slurm": {"distill": {"cpus": 2, "mem_mb": 4000, "runtime_minutes": 20}}, "distill": {"seed": 7}}
SNAKEMAKE = ["timeout", "-s", "KILL", "900", "snakemake", "--profile", "slurm", "--jobs", "2",
             "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("slurmctld") is None, reason="Slurm is not installed (envs/system-packages.sh)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster runs its daemons as root"),
]


@pytest.fixture
def local_slurm():
    # munged wants every directory above its socket searchable by all: pytest's tmp dirs are 0700
    base = Path(tempfile.mkdtemp(prefix="dmd2-slurm-", dir="/tmp"))
    base.chmod(0o755)
    started = subprocess.run([str(SCRIPT), "start", str(base)], timeout=120, capture_output=True, text=True)
    if started.returncode == 3:  # this machine has a Slurm configuration of its own: never replaced
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    yield base
    subprocess.run([str(SCRIPT), "stop", str(base)], check=False, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def test_pipeline_runs_through_the_slurm_profile_in_both_launch_shapes(local_slurm, tmp_path):
    root = project_copy(tmp_path / "slurm", **SLURM_LAUNCH)
    start = time.time()
    proc = subprocess.run(SNAKEMAKE, cwd=root, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    print(f"snakemake --profile slurm took {time.time() - start:.0f} s")
    assert proc.returncode == 0, output[-6000:] + _logs(root)
    assert (root / "results/mnist/report.html").exists() and (root / "results/mnist/metrics.json").exists()
    assert "SLURM" in output or "slurm" in output  # jobs were submitted with sbatch, not run locally
    stage = json.loads((root / "models/mnist/student/stage.json").read_text())
    assert stage["num_processes"] == 2 and stage["num_machines"] == 2 and stage["distributed"] == "fsdp"
    checkpoint = latest_checkpoint(run_dir(root, "distill") / "checkpoints")
    assert json.loads((checkpoint / "meta.json").read_text())["sharded"] is True
    assert (checkpoint / "training/.metadata").exists()
    distill_log = (root / "logs/mnist/distill.log").read_text()
    assert "FSDP2 HYBRID_SHARD over the mesh {'replicate': 2, 'shard': 1}" in distill_log
    assert "launching: srun --ntasks=2 --nodes=2 --ntasks-per-node=1" in distill_log
    assert "--machine_rank $SLURM_NODEID" in distill_log

    # the other shape: one machine, two processes (the paper's 7-GPU ImageNet run, on CPU): one task whose step
    # holds the CPUs, where `dmd2 distill` starts accelerate itself (a nested srun would wait forever)
    write_tiny_params(root, **ONE_MACHINE)
    proc = subprocess.run([*SNAKEMAKE, "models/mnist/student"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:] + _logs(root)
    stage = json.loads((root / "models/mnist/student/stage.json").read_text())
    assert stage["num_processes"] == 2 and stage["num_machines"] == 1 and stage["distributed"] == "ddp"
    distill_log = (root / "logs/mnist/distill.log").read_text()
    assert "launching: accelerate launch" in distill_log and "srun" not in distill_log


def _logs(root: Path) -> str:
    parts = []
    for log in sorted((root / "logs").rglob("*.log")) + sorted((root / ".snakemake/slurm_logs").rglob("*.log")):
        parts.append(f"\n--- {log}\n{log.read_text()[-2000:]}")
    return "".join(parts)
