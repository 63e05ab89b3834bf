"""The default experiment through `snakemake --profile slurm` (the form users type) on a real local Slurm cluster.

The test starts munged + slurmctld + two slurmd on localhost (tests/slurm/local-slurm.sh: nodes n1 and n2), runs
the tiny pipeline with the distill rule as a 2-node job (one launcher task per node, one rank each, rendezvous over
gloo at the first node's address, FSDP2 hybrid sharding across them), then distils again as one task that starts 2
processes itself (the single-machine shape), and stops only the daemons it started (by pid). Its configuration stays
in a temporary directory (mounted over /etc/slurm in a private mount namespace, for the daemons and their jobs
only). Skipped, with the reason, where Slurm is not installed (or its /etc/slurm is missing), we are not root, or no
mount namespace can be made; any other failure to start the cluster fails the test.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
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
# then one launcher starting 2 processes, with a new distillation seed so that the run is new; the test moves this
# job's time limit to within slurm.stop_before_limit_minutes of now, so the run stops and requeues itself
ONE_MACHINE = {"launch": {"distributed": "ddp", "num_machines": 1, "processes_per_machine": 2},
               "slurm": {"distill": {"cpus": 2, "mem_mb": 4000, "runtime_minutes": 20}, "stop_before_limit_minutes": 2},
               "distill": {"seed": 7, "steps": 10, "checkpoint_every": 1000}}
# status every 2 s instead of Snakemake's 10: a finished job is seen sooner (the tiny stages take seconds)
SNAKEMAKE = ["timeout", "-s", "KILL", "900", "snakemake", "--profile", "slurm", "--jobs", "2",
             "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
             "--seconds-between-status-checks", "2"]

pytestmark = [
    pytest.mark.xdist_group("local_slurm"),
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("slurmctld") is None, reason="Slurm is not installed (envs/system-packages.sh)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster runs its daemons as root"),
]


@pytest.fixture
def local_slurm(monkeypatch):
    # munged wants every directory above its socket searchable by all: pytest's tmp dirs are 0700
    base = Path(tempfile.mkdtemp(prefix="dmd2-slurm-", dir="/tmp"))
    base.chmod(0o755)
    etc_before = _listing(Path("/etc/slurm"))
    started = subprocess.run([str(SCRIPT), "start", str(base)], timeout=120, capture_output=True, text=True)
    if started.returncode == 3:  # no private mount namespace for the configuration: /etc is never written
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    monkeypatch.setenv("SLURM_CONF", str(base / "etc/slurm.conf"))  # sbatch, squeue, scontrol: this cluster
    yield base
    subprocess.run([str(SCRIPT), "stop", str(base)], check=False, timeout=120)
    shutil.rmtree(base, ignore_errors=True)
    assert _listing(Path("/etc/slurm")) == etc_before  # the machine's Slurm configuration, untouched


def _listing(folder: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.lstat().st_mode, p.lstat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else []


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
    # holds the CPUs, where `dmd2 distill` starts accelerate itself (a nested srun would wait forever). Its time
    # limit comes within the stop margin: the run checkpoints, requeues its job, and Slurm's second start of the
    # job resumes it, to the student an uninterrupted run of the same settings writes (outside Slurm, alongside).
    write_tiny_params(root, **ONE_MACHINE)
    reference = root.parent / "uninterrupted"
    shutil.copytree(root, reference, ignore=shutil.ignore_patterns(".snakemake", "student"))
    # the job's ranks compute on slurm.distill.cpus threads (Snakemake sets OMP_NUM_THREADS to the rule's threads)
    threads = {**os.environ, "OMP_NUM_THREADS": str(ONE_MACHINE["slurm"]["distill"]["cpus"])}
    straight = subprocess.Popen(["bash", "-c", "dmd2 launch-config && dmd2 distill"], cwd=reference, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=threads)
    snakemake = subprocess.Popen([*SNAKEMAKE, "models/mnist/student"], cwd=root, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    restarts = _requeue_once_on_time_limit(snakemake)
    output = snakemake.communicate()[0]
    assert snakemake.returncode == 0, output[-6000:] + _logs(root)
    assert straight.wait(timeout=600) == 0, straight.communicate()[0][-3000:]
    assert restarts == 1  # the job put itself back in the queue once, and its second start finished the run
    stage = json.loads((root / "models/mnist/student/stage.json").read_text())
    assert stage["num_processes"] == 2 and stage["num_machines"] == 1 and stage["distributed"] == "ddp"
    distill_log = (root / "logs/mnist/distill.log").read_text()  # the second start's (Snakemake empties it)
    resumed = re.search(r"resuming distillation from \S+ \(iteration (\d+)\)", distill_log)
    assert resumed and 1 <= int(resumed.group(1)) < 10, distill_log[-3000:]
    assert "launching: accelerate launch" in distill_log and "srun" not in distill_log
    a = load_file(root / "models/mnist/student/model.safetensors")
    b = load_file(reference / "models/mnist/student/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # nothing lost or repeated


def _requeue_once_on_time_limit(snakemake: subprocess.Popen) -> int:
    """Move the running distill job's time limit to 2 minutes (the stop margin: its first look at the limit stops
    it); once it is back in the queue, give it 20 minutes again and let it start now instead of in Slurm's two.
    Returns the job's restart count when snakemake ends."""
    job, moved, restored = None, False, False
    while snakemake.poll() is None:
        rows = subprocess.run(["squeue", "--noheader", "--format=%i|%k"], capture_output=True, text=True).stdout
        job = job or next((r.split("|")[0] for r in rows.split() if r.endswith("|rule_distill")), None)
        if job and not moved:
            moved = subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=2"]).returncode == 0
        if moved and not restored:
            show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            if "JobState=PENDING" in show and "Restarts=1" in show:
                restored = subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=20",
                                           "StartTime=now"]).returncode == 0
        time.sleep(0.2)
    show = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    return int(re.search(r"Restarts=(\d+)", show).group(1)) if job else -1


def _logs(root: Path) -> str:
    parts = []
    for log in sorted((root / "logs").rglob("*.log")) + sorted((root / ".snakemake/slurm_logs").rglob("*.log")):
        parts.append(f"\n--- {log}\n{log.read_text()[-2000:]}")
    return "".join(parts)
