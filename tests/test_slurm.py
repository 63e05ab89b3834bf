"""The default experiment through `snakemake --profile slurm` (the form users type) on a real local Slurm cluster.

The test starts munged + slurmctld + slurmd on localhost (tests/slurm/local-slurm.sh), runs the tiny pipeline
with the distill rule as a 2-task job (2 launcher tasks, one rank each, rendezvous over gloo, FSDP2 hybrid
sharding across them), and stops only the daemons it started (by pid). Skipped, with the reason, where Slurm is not
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
from tiny import run_dir

from dmd2.checkpoint import latest_checkpoint

SCRIPT = REPO / "tests/slurm/local-slurm.sh"
# FSDP2 hybrid sharding over a (machines × processes per machine) mesh, the SDXL recipe's shape: a 2 × 1 mesh
# that only a multi-launcher run can build (the local tests cover FULL_SHARD, SHARD_GRAD_OP and a 1 × 2 mesh)
SLURM_LAUNCH = {"launch": {"distributed": "fsdp", "num_machines": 2, "processes_per_machine": 1,
                           "fsdp": {"sharding_strategy": "HYBRID_SHARD", "min_num_params": 2000},
                           "slurm": {"nodes": 1, "cpus_per_task": 1, "mem_mb": 2000, "runtime_minutes": 20}}}

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
    subprocess.run([str(SCRIPT), "start", str(base)], check=True, timeout=120)
    yield base
    subprocess.run([str(SCRIPT), "stop", str(base)], check=False, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def test_pipeline_runs_through_the_slurm_profile(local_slurm, tmp_path):
    root = project_copy(tmp_path / "slurm", **SLURM_LAUNCH)
    start = time.time()
    proc = subprocess.run(
        ["timeout", "-s", "KILL", "900", "snakemake", "--profile", "slurm", "--jobs", "2",
         "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"],
        cwd=root, capture_output=True, text=True)
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
    assert "launching: srun --ntasks=2" in distill_log and "--machine_rank $SLURM_PROCID" in distill_log


def _logs(root: Path) -> str:
    parts = []
    for log in sorted((root / "logs").rglob("*.log")) + sorted((root / ".snakemake/slurm_logs").rglob("*.log")):
        parts.append(f"\n--- {log}\n{log.read_text()[-2000:]}")
    return "".join(parts)
