"""Real multi-process DMD2: 2 CPU processes over gloo (accelerate launch; DDP, or FSDP2 sharding) against 1.

Every rank draws the random numbers of the whole global batch and keeps its slice (GlobalBatchRandom), so a
2-process run with the same global batch is the 1-process run up to floating-point reduction order. The
stated tolerance: relative parameter difference below 1e-4 after the run, and equal final losses to 1e-3.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY_REGRESSION, fresh_copy, run, run_dir, worker_port, write_tiny_params
from torch.distributed.checkpoint import FileSystemReader

from dmd2.checkpoint import checkpoint_step, latest_checkpoint, load_training_state

pytestmark = pytest.mark.xdist_group("distributed")  # one worker builds the module's fixtures once

PARAM_RTOL, LOSS_RTOL = 1e-4, 1e-3
TWO_PROCESSES = {"launch": {"distributed": "ddp", "processes_per_machine": 2}}


def fsdp(strategy: str = "FULL_SHARD") -> dict:
    """2 processes sharding with FSDP2; a small wrap threshold so the tiny UNet gets inner units too."""
    return {"launch": {"distributed": "fsdp", "processes_per_machine": 2,
                       "fsdp": {"sharding_strategy": strategy, "min_num_params": 2000}}}


def distill_subprocess(root: Path, stages: tuple[str, ...] = ("launch-config", "distill"),
                       env: dict[str, str] | None = None) -> str:
    """The stages as their own processes, on one thread each (`env`: more variables), rendezvousing on this test
    worker's own port (also for projects whose params write_tiny_params did not write); their output."""
    env, output = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, ""
    port = ["--set", f"launch.main_process_port={worker_port()}"]
    for stage in stages:
        proc = subprocess.run([sys.executable, "-m", "dmd2.cli", stage, "--params", str(root / "params.yaml"),
                               "--root", str(root), *port], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        output += proc.stdout + proc.stderr
    return output


def relative_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "models/mnist/student/model.safetensors"), load_file(b / "models/mnist/student/model.safetensors")
    diff = torch.sqrt(sum(((wa[k] - wb[k]) ** 2).sum() for k in wa))
    norm = torch.sqrt(sum((wa[k] ** 2).sum() for k in wa))
    return (diff / norm).item()


def final_losses(root: Path) -> dict[str, float]:
    last = json.loads((run_dir(root, "distill") / "metrics.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in last.items() if k.startswith("loss")}


def assert_matches(one: Path, other: Path, label: str) -> None:
    difference = relative_difference(one, other)
    print(f"1 process vs {label}: relative parameter difference {difference:.3e}; "
          f"final losses {final_losses(one)} vs {final_losses(other)}")
    assert difference < PARAM_RTOL
    for key, value in final_losses(one).items():
        assert abs(final_losses(other)[key] - value) <= LOSS_RTOL * max(abs(value), 1e-6), key


@pytest.fixture(scope="module")
def one(prepared, tmp_path_factory) -> Path:
    """The reference: the tiny distillation in one process."""
    root = fresh_copy(prepared, tmp_path_factory.mktemp("one") / "one")
    run(root, "distill")
    return root


@pytest.mark.integration
def test_two_processes_match_one_process_and_resume_across_world_sizes(one, prepared, tmp_path):
    two = fresh_copy(prepared, tmp_path / "two", **TWO_PROCESSES)
    distill_subprocess(two)
    stage = json.loads((two / "models/mnist/student/stage.json").read_text())
    assert stage["num_processes"] == 2
    assert_matches(one, two, "2 processes (DDP)")

    # stop a 2-process run half way, resume it with 1 process: same result as the uninterrupted run
    mixed = fresh_copy(prepared, tmp_path / "mixed", distill={"steps": 3}, **TWO_PROCESSES)
    distill_subprocess(mixed)
    write_tiny_params(mixed)  # back to 1 process and 6 steps
    run(mixed, "distill")
    assert relative_difference(one, mixed) < PARAM_RTOL


@pytest.mark.integration
def test_fsdp_shards_keeps_optimiser_state_and_resumes_across_world_sizes(one, prepared, tmp_path):
    two = fresh_copy(prepared, tmp_path / "fsdp", **fsdp())
    distill_subprocess(two)
    assert json.loads((two / "models/mnist/student/stage.json").read_text())["distributed"] == "fsdp"
    assert_matches(one, two, "2 processes (FSDP2 FULL_SHARD)")

    checkpoint = latest_checkpoint(run_dir(two, "distill") / "checkpoints")
    stored = FileSystemReader(str(checkpoint / "training")).read_metadata().state_dict_metadata
    # each rank wrote its own half of every parameter, and the optimisers' moments are in the checkpoint
    conv = stored["generator.model.model.conv_in.weight"]
    assert [tuple(c.sizes) for c in conv.chunks] == [(4, 1, 3, 3), (4, 1, 3, 3)]
    for model in ("generator", "critic"):
        assert sum(k.startswith(f"{model}.optim.state.") and k.endswith(".exp_avg_sq") for k in stored) > 10
    assert json.loads((checkpoint / "meta.json").read_text())["sharded"] is True
    assert load_file(checkpoint / "student/model.safetensors")["model.conv_in.weight"].shape == (8, 1, 3, 3)

    # a sharded run stopped half way resumes in 1 process, and a 1-process run resumes sharded over 2:
    # both land on the uninterrupted run, which they could not if the Adam moments were lost
    shrink = fresh_copy(prepared, tmp_path / "shrink", distill={"steps": 3}, **fsdp())
    distill_subprocess(shrink)
    write_tiny_params(shrink)
    run(shrink, "distill")
    assert_matches(one, shrink, "FSDP2 ×2 → 1 process resume")

    grow = fresh_copy(prepared, tmp_path / "grow", distill={"steps": 3})
    run(grow, "distill")
    write_tiny_params(grow, **fsdp())
    distill_subprocess(grow)
    assert_matches(one, grow, "1 process → FSDP2 ×2 resume")


@pytest.mark.integration
def test_the_generator_average_is_kept_per_shard(prepared, tmp_path):
    """distill.ema_decay under FSDP2: each rank averages its own shards; the gathered student is the 1-process one."""
    one_ema = fresh_copy(prepared, tmp_path / "one_ema", distill={"ema_decay": 0.9})
    run(one_ema, "distill")
    two_ema = fresh_copy(prepared, tmp_path / "two_ema", distill={"ema_decay": 0.9}, **fsdp())
    distill_subprocess(two_ema)
    assert_matches(one_ema, two_ema, "2 processes (FSDP2 FULL_SHARD) with the generator's average")


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["SHARD_GRAD_OP", "HYBRID_SHARD"])
def test_other_fsdp_strategies_match_one_process(one, prepared, tmp_path, strategy):
    """SHARD_GRAD_OP also recomputes activations and accumulates 2 micro-batches of 2 per process (global batch 8,
    as the 1-process run's), its gradients synchronised only in the second's backward."""
    settings = fsdp(strategy)
    if strategy == "SHARD_GRAD_OP":
        settings["launch"].update(micro_batch=2)
        settings["launch"]["fsdp"]["activation_checkpointing"] = True  # recomputes, same numbers
    root = fresh_copy(prepared, tmp_path / strategy, **settings)
    output = distill_subprocess(root)
    assert_matches(one, root, f"2 processes (FSDP2 {strategy})")
    assert ("× 2 micro-batch(es) of 2" in output) == (strategy == "SHARD_GRAD_OP")


# A sitecustomize for each rank: every DDP model gets a gradient communication hook (the default all-reduce) that
# counts, at exit, the backward passes whose gradients were averaged across ranks (each ends with its last bucket).
COUNT_SYNCED_BACKWARDS = """
import atexit, os
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

synced = [0]
original_init = DistributedDataParallel.__init__

def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)

    def counting(state, bucket):
        synced[0] += bucket.is_last()
        return allreduce_hook(state, bucket)

    self.register_comm_hook(None, counting)

DistributedDataParallel.__init__ = init
if "RANK" in os.environ:
    atexit.register(lambda: open(os.path.join(os.environ["COUNT_DIR"], os.environ["RANK"]), "w").write(str(synced[0])))
"""


def counting_synced_backwards(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The environment that installs COUNT_SYNCED_BACKWARDS in every process, and the folder the counts land in."""
    inject, counts = tmp_path / "inject", tmp_path / "counts"
    inject.mkdir()
    counts.mkdir()
    (inject / "sitecustomize.py").write_text(COUNT_SYNCED_BACKWARDS)
    path = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    return {"COUNT_DIR": str(counts), "PYTHONPATH": path}, counts


@pytest.mark.integration
def test_two_processes_accumulating_micro_batches_match_one_process(one, prepared, tmp_path):
    """launch.micro_batch: 2 processes × 2 micro-batches of 2 (DDP) train as 1 process on the whole batch of 8, the
    DM loss, the critic and the GAN head all on; gradients are averaged across ranks once per optimiser step (the
    first micro-batch's backward runs under no_sync), counted by a communication hook in each rank."""
    root = fresh_copy(prepared, tmp_path / "micro", launch={**TWO_PROCESSES["launch"], "micro_batch": 2})
    env, counts = counting_synced_backwards(tmp_path)
    output = distill_subprocess(root, env=env)
    assert "global batch 8: 2 process(es) × 2 micro-batch(es) of 2" in output
    assert_matches(one, root, "2 processes × 2 micro-batches (DDP)")
    steps, ratio = 6, 2  # tests/tiny.py: generator turns at iterations 0, 2, 4; a critic turn every iteration
    synced = {rank.name: int(rank.read_text()) for rank in counts.iterdir()}
    assert synced == {"0": steps + steps // ratio, "1": steps + steps // ratio}, synced


@pytest.mark.integration
def test_a_critic_per_step_sharded_over_two_processes_matches_one_process(prepared, tmp_path):
    """distill.critic_per_step, two steps: every rank calls both critics (FSDP2's collectives, each critic sharded)
    on its rows of each step, and the run is the one-process run."""
    steps = {"denoising_timesteps": [999, 499], "critic_per_step": True}
    single = fresh_copy(prepared, tmp_path / "one", distill=steps)
    run(single, "distill")
    sharded = fresh_copy(prepared, tmp_path / "fsdp", distill=steps, **fsdp())
    distill_subprocess(sharded)
    assert_matches(single, sharded, "2 processes (FSDP2), a critic per step")


@pytest.mark.integration
def test_the_resume_tolerance_catches_lost_optimiser_state(one, prepared, tmp_path, monkeypatch):
    """The resume checks above are sharp enough: restoring the weights but not the Adam moments misses them."""

    import dmd2.distill
    from dmd2.checkpoint import load_training_state

    def weights_only(path, parts):
        load_training_state(path, parts)
        for _, optimizer in parts.values():
            if optimizer is not None:  # the generator's EMA is a part without an optimiser
                optimizer.state.clear()  # the weights restored, the Adam moments lost

    root = fresh_copy(prepared, tmp_path / "lost", distill={"steps": 3})
    run(root, "distill")
    write_tiny_params(root)
    monkeypatch.setattr(dmd2.distill, "load_training_state", weights_only)
    run(root, "distill")
    difference = relative_difference(one, root)
    print(f"resumed without the optimiser state: relative parameter difference {difference:.3e}")
    assert difference > 3 * PARAM_RTOL


# Loaded at interpreter start by every process that has this folder on PYTHONPATH; it acts in rank 1 only.
POISON_RANK_1 = '''
import os

if os.environ.get("RANK") == "1":
    import torch

    calls = [0]

    def poison(module, args, output):
        # the denoiser's own calls with gradients on (generator and critic turns): NaN from the N-th one on
        if type(module).__name__ == os.environ["POISON_CLASS"] and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > int(os.environ["POISON_AFTER"]):
                return output * float("nan")

    torch.nn.modules.module.register_module_forward_hook(poison)
'''


@pytest.mark.integration
def test_a_non_finite_value_on_one_rank_stops_every_rank_at_the_same_iteration(prepared, tmp_path):
    """A NaN on rank 1 only, inside the real training loop of a 2-process run (a forward hook that a sitecustomize
    module installs in that process alone): both ranks stop at the same iteration with the divergence error, rank 0
    saying the value was on another rank; neither waits in a collective (the run ends well within the timeout); no
    student is written and the last checkpoint, from before the NaN, holds finite weights."""
    from dmd2.families import load_model

    root = fresh_copy(prepared, tmp_path / "nan", **TWO_PROCESSES)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(POISON_RANK_1)
    net_class = type(load_model(prepared / "models/mnist/teacher").net).__name__
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POISON_CLASS": net_class, "POISON_AFTER": "14",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))}
    outputs = []
    for stage in ("launch-config", "distill"):
        proc = subprocess.Popen([sys.executable, "-m", "dmd2.cli", stage, "--params", str(root / "params.yaml"),
                                 "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, start_new_session=True)
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks: one of them waits in a collective
            pytest.fail(f"`dmd2 {stage}` still running after 240 s: a rank is waiting for the other")
    assert proc.returncode != 0, outputs[-1][-3000:]
    stops = re.findall(r"error: the (generator|critic) turn produced (.+?) at iteration (\d+)", outputs[-1])
    assert len(stops) == 2, outputs[-1][-3000:]  # one line per rank
    assert {what == "a value on another rank" for _, what, _ in stops} == {True, False}
    assert any("= nan" in what for _, what, _ in stops)
    assert len({(turn, step) for turn, _, step in stops}) == 1  # the same check of the same iteration
    assert not (root / "models/mnist/student").exists()
    checkpoint = latest_checkpoint(run_dir(root, "distill") / "checkpoints")
    assert checkpoint is not None and checkpoint_step(checkpoint) <= int(stops[0][2])
    weights = load_file(checkpoint / "student/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _descendant_with(pid: int, variable: str) -> int | None:
    """The process under `pid` whose environment holds `variable` (e.g. "RANK=1"), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        try:
            if variable.encode() in (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0"):
                return child
        except OSError:
            pass
        todo += children.get(child, [])
    return None


@pytest.mark.integration
def test_a_stop_signal_to_one_rank_stops_both_at_the_same_iteration_and_the_run_resumes(prepared, tmp_path):
    """SIGUSR1 to rank 1 alone of a 2-process run: both ranks checkpoint the same iteration and stop (rank 0 because
    the decision is all-reduced), and the same command again finishes the run as an uninterrupted 2-process run."""
    root = fresh_copy(prepared, tmp_path / "stop", distill={"steps": 60, "checkpoint_every": 1000}, **TWO_PROCESSES)
    distill_subprocess(root, stages=("launch-config",))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dmd2.cli", "distill", "--params", str(root / "params.yaml"),
                             "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline, rank1 = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        logs = list((root / "work/mnist/distill").glob("run-*/metrics.jsonl"))
        rank1 = rank1 or _descendant_with(proc.pid, "RANK=1")
        if rank1 and logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert rank1, "rank 1 not found"
    os.kill(rank1, signal.SIGUSR1)
    output = proc.communicate(timeout=240)[0]
    stops = re.findall(r"stopped: (SIGUSR1|a signal or time limit on another rank) at iteration (\d+)", output)
    assert sorted(s for s, _ in stops) == ["SIGUSR1", "a signal or time limit on another rank"], output[-3000:]
    assert len({step for _, step in stops}) == 1
    assert checkpoint_step(latest_checkpoint(run_dir(root, "distill") / "checkpoints")) == int(stops[0][1])
    distill_subprocess(root, stages=("distill",))  # the same command again
    # the reference has the same launch shape: over 60 iterations 1 and 2 processes part by more than the
    # 6-iteration tolerance (1.5e-4 measured), which is reduction order, not the stop
    straight = fresh_copy(prepared, tmp_path / "straight", distill={"steps": 60, "checkpoint_every": 1000},
                          **TWO_PROCESSES)
    distill_subprocess(straight)
    assert_matches(straight, root, "2 processes stopped by a signal and resumed, against 2 uninterrupted")


# ------------------------------------------------------------------------------------ the regression stage

def regression_subprocess(root: Path, env: dict[str, str] | None = None) -> str:
    return distill_subprocess(root, ("launch-config", "regression"), env)


def pairs(root: Path) -> torch.Tensor:
    from dmd2.latents import LatentDataset

    (lmdb,) = (root / "work/mnist/regression/pairs").glob("run-*/pairs.lmdb")
    dataset = LatentDataset(lmdb)
    return dataset.batch(range(len(dataset)))[0]


# Tolerance on the update: Adam divides by the gradients' running RMS, so in 4 steps the reduction-order noise of tiny
# gradients shows in the update at ~2e-3 (1 process with micro-batches of 2 against whole batches: 2.2e-3); 2 processes
# whose gradients are never averaged differ by 0.50.
UPDATE_RTOL = 2e-2


def update_difference(one: Path, other: Path, teacher: Path) -> float:
    """|Δ_other − Δ_one| / |Δ_one|, Δ the regressed generator's change from the teacher: the training itself compared
    (the weights barely move in 4 steps, so comparing the weights would hide it)."""
    start = load_file(teacher / "models/mnist/teacher/model.safetensors")
    a = load_file(one / "models/mnist/regression/model.safetensors")
    b = load_file(other / "models/mnist/regression/model.safetensors")
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    moved = torch.sqrt(sum(((a[k] - start[k]) ** 2).sum() for k in a))
    assert moved > 1e-3 * torch.sqrt(sum((start[k] ** 2).sum() for k in a))  # the generator did learn
    return (diff / moved).item()


def regression_losses(root: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (root / "models/mnist/regression/metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def regressed_once(prepared, tmp_path_factory) -> Path:
    """The reference: the tiny regression stage in one process."""
    root = fresh_copy(prepared, tmp_path_factory.mktemp("regression") / "one", regression=TINY_REGRESSION)
    regression_subprocess(root)
    return root


@pytest.mark.integration
def test_regression_on_two_processes_shares_the_pairs_and_the_batch_and_matches_one_process(regressed_once, prepared,
                                                                                            tmp_path):
    """2 processes (DDP) × 2 micro-batches of 2: the pair batches are dealt out to the ranks (a batch an interrupted
    run finished is kept), rank 0 writes one LMDB identical to the 1-process run's, and the generator trains as in
    one process on the whole batch of 8, gradients averaged across ranks once per step (counted by a hook)."""
    root = fresh_copy(prepared, tmp_path / "two", regression={**TINY_REGRESSION, "micro_batch": 2}, **TWO_PROCESSES)
    # an interrupted run had finished rank 1's batch (pairs 4–7): its file is where that run left it
    (pairs_run,) = (regressed_once / "work/mnist/regression/pairs").glob("run-*")
    finished = root / "work/mnist/regression/pairs" / pairs_run.name / "batches" / "00000004.pt"
    finished.parent.mkdir(parents=True)
    torch.save(pairs(regressed_once)[4:8].half(), finished)
    env, counts = counting_synced_backwards(tmp_path)
    output = regression_subprocess(root, env=env)
    assert "regression pairs: rank 1 kept 1 of its 1 batch(es)" in output and "rank 0 kept" not in output
    assert "regression batch 8: 2 process(es) × 2 micro-batch(es) of 2" in output
    assert torch.equal(pairs(root), pairs(regressed_once))
    difference = update_difference(regressed_once, root, prepared)
    print(f"regression, 1 process vs 2 × 2 micro-batches (DDP): relative difference of the updates {difference:.2e}; "
          f"losses {regression_losses(regressed_once)} vs {regression_losses(root)}")
    assert difference < UPDATE_RTOL
    torch.testing.assert_close(regression_losses(root), regression_losses(regressed_once), rtol=LOSS_RTOL, atol=0)
    assert {rank.name: int(rank.read_text()) for rank in counts.iterdir()} == {"0": 4, "1": 4}  # one sync per step
    stage = json.loads((root / "models/mnist/regression/stage.json").read_text())
    assert stage["num_processes"] == 2 and stage["steps"] == 4  # the launcher kept rank 0's figures


@pytest.mark.integration
def test_a_sharded_regression_run_resumes_in_one_process_and_matches_it(regressed_once, prepared, tmp_path):
    """FSDP2 over 2 processes: each rank checkpoints its shards of the generator and of the Adam moments; stopped
    after 2 of 4 steps and finished in 1 process, the result is the uninterrupted 1-process run's."""
    root = fresh_copy(prepared, tmp_path / "fsdp", regression={**TINY_REGRESSION, "steps": 2}, **fsdp())
    regression_subprocess(root)
    (checkpoint,) = (root / "work/mnist/regression/train").glob("run-*/checkpoints/ckpt-0000002")
    stored = FileSystemReader(str(checkpoint / "training")).read_metadata().state_dict_metadata
    conv = stored["generator.model.model.conv_in.weight"]
    assert [tuple(c.sizes) for c in conv.chunks] == [(4, 1, 3, 3), (4, 1, 3, 3)]  # each rank wrote its half
    assert sum(k.startswith("generator.optim.state.") and k.endswith(".exp_avg_sq") for k in stored) > 10
    write_tiny_params(root, regression=TINY_REGRESSION)  # 1 process, 4 steps
    run(root, "regression")
    assert torch.equal(pairs(root), pairs(regressed_once))
    difference = update_difference(regressed_once, root, prepared)
    print(f"regression, 1 process vs FSDP2 ×2 → 1 process: relative difference of the updates {difference:.2e}")
    assert difference < UPDATE_RTOL


@pytest.mark.integration
def test_a_regression_checkpoint_from_before_several_processes_resumes_sharded(regressed_once, prepared, tmp_path):
    """Earlier versions kept the generator in generator.safetensors and the optimiser's own state dict (moments keyed
    by parameter position) in state.pt; such a checkpoint, written by one process, resumes sharded over 2 processes
    and ends where the uninterrupted 1-process run does."""
    from safetensors.torch import save_file

    from dmd2.families import load_model
    from dmd2.training import adamw, warmup_schedule

    root = fresh_copy(prepared, tmp_path / "old", regression={**TINY_REGRESSION, "steps": 2})
    regression_subprocess(root)
    checkpoint = latest_checkpoint(run_dir(root, "regression/train") / "checkpoints")
    generator = load_model(prepared / "models/mnist/teacher").net.requires_grad_(True)
    optimizer = adamw(generator.parameters(), lr=TINY_REGRESSION["lr"])
    warmup_schedule(optimizer, 1)  # as the stage builds it (the scheduler adds initial_lr to the optimiser's state)
    load_training_state(checkpoint / "training.safetensors", {"generator": (generator, optimizer)})
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, checkpoint / "generator.safetensors")
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    torch.save({**state, "optimizer": optimizer.state_dict()}, checkpoint / "state.pt")
    (checkpoint / "training.safetensors").unlink()  # now as the earlier version wrote it

    write_tiny_params(root, regression=TINY_REGRESSION, **fsdp())
    output = regression_subprocess(root)
    assert f"resuming regression pre-training from {checkpoint}" in output
    difference = update_difference(regressed_once, root, prepared)
    print(f"regression, 1 process vs a one-process checkpoint of the earlier format resumed on FSDP2 ×2: {difference:.2e}")
    assert difference < UPDATE_RTOL
