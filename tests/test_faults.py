"""Faults and bad input: nothing finished is lost, a second writer is refused, every expected failure is one clear
line, unsafe files are refused without running anything, and the properties a silent bug would break are pinned."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import fresh_copy, run, run_dir, start_stage, stop_mid_run, worker_port, write_tiny_params

from dmd2.checkpoint import list_checkpoints, load_training_state, run_lock
from dmd2.cli import main
from dmd2.config import ConfigError, load_params
from dmd2.data import DataError, LMDBImageDataset, write_lmdb
from dmd2.errors import CheckpointError, RunLockedError


def cli(root: Path, *args: str):
    """The real CLI in-process, as a user sees it (exit code and output; expected failures are one line)."""
    return CliRunner().invoke(main, [*args, "--params", str(root / "params.yaml"), "--root", str(root)])


def error_line(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output[-3000:]
    return lines[0]


def student(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "models/mnist/student/model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ one writer per run


def test_a_run_directory_has_one_writer_and_a_dead_holder_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from pathlib import Path
from dmd2.checkpoint import run_lock
with run_lock(Path({str(tmp_path)!r})):
    print("locked", flush=True)
    time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=rf"pid {holder.pid} on .*started .*command"):
        with run_lock(tmp_path):
            pass
    os.kill(holder.pid, signal.SIGKILL)  # the holder dies without cleaning up
    holder.wait()
    said = []
    with run_lock(tmp_path, said.append):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "no longer running" in said[0]


@pytest.mark.slow
def test_a_second_trainer_on_the_same_run_stops_at_once(prepared, tmp_path):
    root = fresh_copy(prepared, tmp_path / "two", distill={"steps": 400, "checkpoint_every": 400})
    command = [sys.executable, "-m", "dmd2.cli", "distill", "--params", str(root / "params.yaml"), "--root", str(root)]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(p.stat().st_size for p in root.glob("work/mnist/distill/run-*/LOCK")):
            time.sleep(0.1)
        start = time.time()
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and time.time() - start < 60
        # the stage lock refuses it first (the run directory's own lock is tested above), naming the holder
        assert f"student is in use by another running stage (`dmd2 distill`, pid {first.pid}" in second.stderr, \
            second.stderr[-2000:]
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


# ------------------------------------------------------------------------------------ steps and checkpoints


@pytest.mark.slow
def test_lowering_steps_gives_the_student_at_that_step_or_says_why(prepared, tmp_path):
    short = fresh_copy(prepared, tmp_path / "short", distill={"steps": 3})
    run(short, "distill")
    root = fresh_copy(prepared, tmp_path / "lowered")  # 6 steps, checkpoints at 3 and 6
    run(root, "distill")
    write_tiny_params(root, distill={"steps": 3})
    run(root, "distill")  # the run is past 3, and its checkpoint at 3 is kept: the student at 3
    assert_identical(student(short), student(root))
    assert json.loads((root / "models/mnist/student/config.json").read_text())["source"]["iterations"] == 3

    write_tiny_params(root, distill={"steps": 4})  # past 4, no checkpoint at 4
    before = (root / "models/mnist/student/model.safetensors").read_bytes()
    line = error_line(cli(root, "distill"))
    assert "already trained to iteration 6" in line and "[3, 6]" in line and "distill.steps" in line
    assert (root / "models/mnist/student/model.safetensors").read_bytes() == before  # nothing lost


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_and_is_kept_aside(prepared, tmp_path):
    reference = fresh_copy(prepared, tmp_path / "ref", distill={"steps": 9})
    run(reference, "distill")
    root = fresh_copy(prepared, tmp_path / "corrupt")  # checkpoints at 3 and 6
    run(root, "distill")
    checkpoints = run_dir(root, "distill") / "checkpoints"
    (checkpoints / "ckpt-0000006/state.pt").write_bytes(b"not a checkpoint")
    write_tiny_params(root, distill={"steps": 9})
    result = cli(root, "distill")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: checkpoint .*ckpt-0000006 does not load .*moved it aside", result.output)
    assert list(checkpoints.glob("corrupt-ckpt-0000006-*")), "the corrupt checkpoint is kept for inspection"
    assert "resuming distillation from" in result.output and "ckpt-0000003 (iteration 3)" in result.output
    assert_identical(student(reference), student(root))  # resumed from 3: the same as never interrupted


@pytest.mark.slow
def test_resume_from_checkpoint_resumes_from_the_named_checkpoint(prepared, tmp_path):
    root = fresh_copy(prepared, tmp_path / "named")
    run(root, "distill")
    first = (run_dir(root, "distill") / "metrics.jsonl").read_text().splitlines()
    named = run_dir(root, "distill") / "checkpoints/ckpt-0000003"
    result = cli(root, "distill", "--resume_from_checkpoint", str(named))
    assert result.exit_code == 0 and f"resuming distillation from {named} (iteration 3)" in result.output
    again = (run_dir(root, "distill") / "metrics.jsonl").read_text().splitlines()
    assert again[:3] == first[:3] and again[3:] != first[3:]  # iterations 4-6 were trained again


@pytest.mark.slow
def test_teacher_training_resumes_bit_identically(prepared, tmp_path):
    split = fresh_copy(prepared, tmp_path / "split")
    write_tiny_params(split, teacher={"steps": 3})
    run(split, "teacher")
    write_tiny_params(split)  # back to 6 steps: resumes from the checkpoint at 3
    run(split, "teacher")
    one_go = load_file(prepared / "models/mnist/teacher/model.safetensors")
    assert_identical(one_go, load_file(split / "models/mnist/teacher/model.safetensors"))


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    from dmd2 import checkpoint

    checkpoint.save_checkpoint(tmp_path, 1, {"net": {"w": torch.ones(2)}}, {}, {}, keep_last=2)

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"\.ckpt-0000002\.tmp failed \(the disk is full\); the previous "
                                              r"checkpoint is intact"):
        checkpoint.save_checkpoint(tmp_path, 2, {"net": {"w": torch.zeros(2)}}, {}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000001"]

    # safetensors' own error type (not an OSError), with the message it gives on a full disk
    from safetensors import SafetensorError

    def full_disk_safetensors(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full_disk_safetensors)
    with pytest.raises(CheckpointError, match=r"\.ckpt-0000003\.tmp failed \(the disk is full\)"):
        checkpoint.save_checkpoint(tmp_path, 3, {"net": {"w": torch.zeros(2)}}, {}, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000001"]


# ------------------------------------------------------------------------------------ bad files, one line each


def _prepared_root(prepared: Path, tmp_path: Path, name: str) -> Path:
    return fresh_copy(prepared, tmp_path / name)


def test_truncated_foreign_and_mismatched_weights_are_one_line(prepared, tmp_path):
    root = _prepared_root(prepared, tmp_path, "weights")
    weights = root / "models/mnist/teacher/model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    line = error_line(cli(root, "distill"))
    assert str(weights) in line and "cannot be read" in line and "rerun the stage" in line
    weights.write_bytes(os.urandom(4096))  # not a safetensors file at all
    assert str(weights) in error_line(cli(root, "distill"))
    weights.write_bytes(good)
    config = root / "models/mnist/teacher/config.json"
    edited = json.loads(config.read_text())
    edited["unet"]["channels"] = 16  # the config no longer describes the weights
    config.write_text(json.dumps(edited))
    line = error_line(cli(root, "distill"))
    assert str(weights) in line and "does not match" in line


def test_bad_params_and_overrides_are_one_line(prepared, tmp_path):
    root = _prepared_root(prepared, tmp_path, "params")
    result = cli(root, "distill", "--set", "distill.steps=[1,")
    assert result.exit_code == 2 and "not valid YAML" in error_line(result)
    result = cli(root, "distill", "--set", "distill.real_guidance_scale=1e30")
    assert result.exit_code == 2 and "real_guidance_scale" in result.output and "less than or equal to 100" in result.output
    result = cli(root, "distill", "--set", "launch.mixed_precision=fp16")
    assert result.exit_code == 2 and "distill.mixed_precision: bf16" in result.output


def test_shell_metacharacters_in_an_experiment_name_are_refused_before_any_shell_runs(tmp_path):
    from test_dag import project_copy

    root = project_copy(tmp_path / "inject")
    marker = root / "INJECTED"
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", f"experiment=a$(touch {marker})b"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not allowed" in proc.stdout + proc.stderr
    params = root / "params.yaml"
    params.write_text(params.read_text() + f"\n'x; touch {marker}':\n  data: {{}}\n")
    with pytest.raises(ConfigError, match="not allowed"):
        load_params(params)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- LMDB


def _lmdb(path: Path, n: int = 20) -> Path:
    images = (np.arange(n * 16) % 251).astype(np.uint8).reshape(n, 1, 4, 4)
    write_lmdb(path, images, np.arange(n) % 3, {"num_classes": 3, "source": "test", "source_sha256": "x"})
    return path


def test_a_truncated_lmdb_is_named_before_it_is_mapped(tmp_path):
    """Reading past the end of a truncated memory-mapped file is SIGBUS; the reader checks the size first. Run in
    a child process, so that a SIGBUS would show as a crash instead of killing the test run."""
    path = _lmdb(tmp_path / "t.lmdb", n=2000)
    data = path / "data.mdb"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    child = subprocess.run([sys.executable, "-c", f"""
from dmd2.data import LMDBImageDataset, DataError
try:
    LMDBImageDataset({str(path)!r}).all_uint8()
except DataError as err:
    print(err)
"""], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])  # −7 would be SIGBUS
    assert f"{data} is truncated" in child.stdout and "dmd2 prepare-data" in child.stdout


def _flip(path: Path, key: bytes, position: int = 0) -> None:
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(key))
        value[position] ^= 0xFF
        txn.put(key, bytes(value))
    env.close()


def test_flipped_record_bytes_are_named_with_the_record(tmp_path):
    path = _lmdb(tmp_path / "flip.lmdb")
    _flip(path, b"image/00000007", 5)
    dataset = LMDBImageDataset(path)
    dataset[6]
    with pytest.raises(DataError, match=r"flip\.lmdb: record 7 is corrupt \(its checksum does not match\)"):
        dataset[7]
    dataset.close()
    path = _lmdb(tmp_path / "label.lmdb")
    _flip(path, b"label/00000003", 7)  # the label's top byte: a huge class index
    with pytest.raises(DataError, match="record 3 is corrupt"):
        LMDBImageDataset(path)[3]


def test_a_label_outside_the_classes_is_named(tmp_path):
    images = np.zeros((3, 1, 4, 4), np.uint8)
    write_lmdb(tmp_path / "l.lmdb", images, np.array([0, 1, 7]), {"num_classes": 3, "source": "t", "source_sha256": "x"})
    with pytest.raises(DataError, match="record 2 has label 7, outside the 3 classes"):
        LMDBImageDataset(tmp_path / "l.lmdb")[2]


def test_an_lmdb_of_another_schema_version_is_refused(tmp_path):
    path = _lmdb(tmp_path / "old.lmdb")
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        meta = json.loads(txn.get(b"__meta__"))
        txn.put(b"__meta__", json.dumps({**meta, "schema_version": 1}).encode())
    env.close()
    with pytest.raises(DataError, match="schema version 1, this code reads 2; rebuild it with `dmd2 prepare-data`"):
        LMDBImageDataset(path)


# ------------------------------------------------------------------------------------------- unsafe loads


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_training_state_index_is_refused_without_running_it(tmp_path):
    training = tmp_path / "training"
    training.mkdir()
    marker = tmp_path / "PWNED"
    (training / ".metadata").write_bytes(pickle.dumps(_Boom(str(marker))))
    net = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"refused global (posix|os)\.system"):
        load_training_state(training, {"generator": (net, torch.optim.AdamW(net.parameters()))})
    assert not marker.exists()


def test_a_training_state_index_pickled_by_an_older_python_reads_and_its_getattr_reads_only_enum_members(tmp_path):
    """Python 3.11.2 (Debian 12's) pickles an enum member as getattr(EnumClass, name), so the indexes DCP writes there
    hold builtins.getattr: read as that enum's member, and nothing else (a non-root fresh clone caught it)."""
    import enum
    import io
    import warnings

    import torch.distributed.checkpoint as dcp

    from dmd2.checkpoint import _SafeReader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": one process writes the whole index
        dcp.save({"w": torch.arange(6.0).reshape(2, 3)}, checkpoint_id=str(tmp_path))
    index = tmp_path / ".metadata"
    modern = pickle.loads(index.read_bytes())

    def rewrite(reduce_enum):
        class OldPickler(pickle.Pickler):
            def reducer_override(self, obj):
                return reduce_enum(obj) if isinstance(obj, enum.Enum) else NotImplemented

        buffer = io.BytesIO()
        OldPickler(buffer, protocol=4).dump(modern)
        assert b"getattr" in buffer.getvalue()
        index.write_bytes(buffer.getvalue())

    rewrite(lambda member: (getattr, (type(member), member.name)))
    read = _SafeReader(str(tmp_path)).read_metadata()
    assert read.state_dict_metadata == modern.state_dict_metadata
    rewrite(lambda member: (getattr, (type(member), "__init__")))  # any attribute but a member: refused
    with pytest.raises(CheckpointError, match=r"only an enum's members are read"):
        _SafeReader(str(tmp_path)).read_metadata()


def test_a_hostile_value_inside_the_training_state_is_refused(tmp_path):
    import io

    from dmd2.checkpoint import _SafeLoadPlanner

    marker = tmp_path / "PWNED"
    buffer = io.BytesIO()
    torch.save(_Boom(str(marker)), buffer)
    buffer.seek(0)

    class Item:
        class dest_index:  # noqa: N801 - the shape of DCP's ReadItem
            fqn = "generator.optim.param_groups"

    with pytest.raises(CheckpointError, match="not plain data"):
        _SafeLoadPlanner().load_bytes(Item, buffer)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ devices, RNG


def test_resume_restores_only_this_process_s_cuda_generator():
    """A checkpoint holds the CPU generator and at most this process's CUDA generator, never one per GPU, so it
    resumes on a machine with fewer GPUs; older per-GPU lists are skipped."""
    from dmd2.checkpoint import rng_state, set_rng_state

    state = rng_state()
    assert set(state) <= {"torch", "cuda"} and not isinstance(state.get("cuda"), list)
    set_rng_state({**state, "cuda": [torch.zeros(8, dtype=torch.uint8)] * 8})  # written on 8 GPUs: no error


def test_ranks_decide_to_stop_together():
    """A non-finite value on one rank stops every rank (2 real processes over gloo)."""
    script = """
import os, torch.distributed as dist
from dmd2.training import all_ranks_agree
dist.init_process_group("gloo")
rank = dist.get_rank()
print(rank, all_ranks_agree(ok=rank == 0), all_ranks_agree(ok=True), flush=True)
dist.destroy_process_group()
"""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(worker_port(31)), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script], env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              text=True) for r in range(2)]
    outputs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outputs == ["0 False True", "1 False True"]


# ----------------------------------------------------------------------------- properties a bug would break


def _tiny_trainer(**settings):
    from accelerate import Accelerator

    from dmd2.config import DistillConfig
    from dmd2.distill import DMD2Trainer, new_gan_head
    from dmd2.families import family_for, teacher_config
    from dmd2.families.edm import EDMTeacherConfig, UNetConfig

    torch.manual_seed(0)
    family = family_for(teacher_config(EDMTeacherConfig(unet=UNetConfig(channels=8, channel_mult=[1, 2])), (1, 8, 8), 3))
    teacher = family.build_network()
    import copy

    cfg = DistillConfig(**{"batch_size": 4, "dfake_gen_update_ratio": 1, "generator_lr": 1e-3, "critic_lr": 1e-3,
                           "warmup_steps": 0, **settings})
    trainer = DMD2Trainer(family, teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), new_gan_head(family, 0), cfg,
                          Accelerator(cpu=True))
    return trainer, {k: v.clone() for k, v in teacher.state_dict().items()}


def test_generator_and_critic_start_as_the_teacher_and_the_teacher_never_changes():
    from dmd2.distill import Batch

    trainer, teacher_before = _tiny_trainer()
    for net in (trainer.generator, trainer.critic_module.score):
        assert_identical(net.state_dict(), teacher_before)
    family = trainer.family
    for step in range(3):
        cond = family.encode_conditions(torch.tensor([0, 1, 2, 0]), "cpu")
        trainer.train_step(step, Batch(4, cond, torch.rand(4, 1, 8, 8) * 2 - 1, cond))
    assert_identical(trainer.teacher.state_dict(), teacher_before)
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert not all(torch.equal(a, teacher_before[k]) for k, a in trainer.generator.state_dict().items())


def test_the_configured_adam_betas_reach_both_optimisers():
    trainer, _ = _tiny_trainer(adam_betas=(0.0, 0.95))
    for optimiser in (trainer.opt_g, trainer.opt_c):
        assert [tuple(group["betas"]) for group in optimiser.param_groups] == [(0.0, 0.95)]


def test_multi_step_training_without_backward_simulation_noises_real_samples_to_the_drawn_step():
    trainer, _ = _tiny_trainer(denoising_timesteps=[999, 499], backward_simulation=False)
    family, real = trainer.family, torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(3)
    x_in, t = trainer.generator_input(4, None, real)
    torch.manual_seed(3)  # the same draws, in the same order: the noise, the steps, the forward noising
    z = trainer.draw.randn(4, (1, 8, 8), "cpu")
    steps = torch.tensor([999, 499])[trainer.draw.randint(0, 2, 4, "cpu")]
    noised_real = family.add_noise(real, trainer.draw.randn_like(real), steps)
    assert torch.equal(t, steps) and set(t.tolist()) == {999, 499}  # both kinds in this batch
    for i, step in enumerate(t.tolist()):
        expected = family.generator_input(z[i:i + 1], t[i:i + 1]) if step == 999 else noised_real[i:i + 1]
        assert torch.equal(x_in[i:i + 1], expected)  # pure noise at the top step, the real sample noised below it


def test_backward_simulation_draws_one_step_per_batch_or_one_per_sample():
    """distill.step_per_sample: each sample's input is the student's own roll-out to the step it drew (the batch
    rolled out through every step with the same draws); off, the whole batch shares one step."""
    from dmd2.sampling import few_step_sample

    steps = [999, 499, 249]
    trainer, _ = _tiny_trainer(denoising_timesteps=steps, step_per_sample=True)
    family, net, n = trainer.family, trainer.generator, 8
    calls, predict, drawn = [], family.predict_x0, set()
    family.predict_x0 = lambda *args, **kwargs: calls.append(1) or predict(*args, **kwargs)
    for seed in range(10):  # one sample a batch: some batches draw only the first step, some only the last
        torch.manual_seed(seed)
        drawn.add(int(trainer.generator_input(1, None)[1]))
        assert len(calls) == len(steps) - 1  # every step rolled out, whatever the draws: the same calls on every rank
        calls.clear()
    family.predict_x0 = predict
    assert drawn == set(steps)
    torch.manual_seed(3)
    x_in, t = trainer.generator_input(n, None)
    torch.manual_seed(3)  # the same draws, in the same order: the noise, the steps, each roll-out's re-noising
    z = trainer.draw.randn(n, (1, 8, 8), "cpu")
    k = trainer.draw.randint(0, len(steps), n, "cpu")
    renoise = [trainer.draw.randn(n, (1, 8, 8), "cpu") for _ in steps[1:]]
    assert torch.equal(t, torch.tensor(steps)[k]) and len(set(t.tolist())) == 3  # all three steps in one batch
    with torch.no_grad():
        for i, step in enumerate(k.tolist()):
            if step == 0:
                expected = family.generator_input(z[i:i + 1], t[i:i + 1])
            else:
                draws = iter([r[i:i + 1] for r in renoise])
                x0 = few_step_sample(family, net, z[i:i + 1], None, steps[:step], lambda x, d=draws: next(d))
                expected = family.add_noise(x0, renoise[step - 1][i:i + 1], t[i:i + 1])
            torch.testing.assert_close(x_in[i:i + 1], expected, rtol=1e-5, atol=1e-5)

    shared, _ = _tiny_trainer(denoising_timesteps=steps)
    for seed in range(4):
        torch.manual_seed(seed)
        assert len(set(shared.generator_input(n, None)[1].tolist())) == 1


def test_distillation_starts_the_generator_as_the_teacher_and_leaves_the_teacher_untouched(prepared, tmp_path,
                                                                                            monkeypatch):
    import dmd2.distill

    root = fresh_copy(prepared, tmp_path / "start", distill={"steps": 2})
    teacher_file = root / "models/mnist/teacher/model.safetensors"
    before, seen = teacher_file.read_bytes(), {}
    build = dmd2.distill.new_generator

    def watched(family, teacher, cfg, start=None):
        generator = build(family, teacher, cfg, start)
        seen.update(generator={k: v.clone() for k, v in generator.state_dict().items()}, teacher=teacher)
        return generator

    monkeypatch.setattr(dmd2.distill, "new_generator", watched)
    run(root, "distill")
    weights = load_file(teacher_file)
    assert_identical(seen["generator"], weights)  # the generator started as the teacher, single process
    assert_identical(dict(seen["teacher"].state_dict()), weights)  # the teacher in memory, after training
    assert teacher_file.read_bytes() == before


def test_the_gan_head_sees_real_as_real_and_fake_as_fake():
    """Logits that say 'real' for the real batch and 'fake' for the generated one give a near-zero critic loss;
    swapped inputs would give a large one."""
    from gmm import MixtureEDM

    from dmd2.critic import Critic
    from dmd2.training import GlobalBatchRandom

    class Identity(torch.nn.Module):
        def forward(self, x, sigma, cond=None, features_only=False):
            return x  # the features are the (barely noised) input itself

    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 1, bias=False), torch.nn.Flatten(0))
    with torch.no_grad():
        head[1].weight.fill_(10.0)
    critic = Critic(MixtureEDM(), Identity(), head, gan_max_timestep=1, draw=GlobalBatchRandom())
    real, fake = torch.ones(16, 2), -torch.ones(16, 2)
    out = critic(fake, None, real, None)
    assert out["logit_real"] > 10 and out["logit_fake"] < -10
    assert out["loss_gan_critic"] < 1e-6


def test_edm_preconditioning_far_from_sigma_one():
    from dmd2.families.edm_networks import Preconditioned

    class Spy(torch.nn.Module):
        def forward(self, x, c_noise, labels, features_only=False):
            self.x, self.c_noise = x, c_noise
            return torch.full_like(x, 2.0)

    spy = Spy()
    x = torch.full((2, 1, 1, 1), 3.0)
    sigma = torch.tensor([80.0, 0.002])
    out = Preconditioned(spy, "edm", sigma_data=0.5)(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25) ** 0.5, 1 / (s**2 + 0.25) ** 0.5
        assert abs(out[i].item() - (c_skip * 3.0 + c_out * 2.0)) < 1e-5 * max(1.0, abs(out[i].item()))
        assert abs(spy.x[i].item() - c_in * 3.0) < 1e-6 and abs(spy.c_noise[i].item() - np.log(s) / 4) < 1e-6


def test_edm_critic_loss_with_nonzero_noise():
    from gmm import MixtureEDM

    class Affine(torch.nn.Module):
        def forward(self, x, sigma, cond=None, features_only=False):
            return 0.5 * x + 0.1

    family = MixtureEDM()
    family.sigma_data = 0.5
    x0, noise, t = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -1.5), torch.tensor([500])
    sigma = family.sigma(t).item()
    pred = 0.5 * (0.3 + sigma * -1.5) + 0.1
    expected = (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (pred - 0.3) ** 2
    assert abs(family.fake_score_loss(Affine(), x0, t, None, noise).item() - expected) < 1e-5 * expected


def test_each_evaluation_row_is_computed_from_its_own_model_and_step_count(tmp_path_factory):
    """Recompute every row of the tiny evaluation from scratch (its model, its step count) and compare."""
    from eval_helpers import eval_pipeline

    from dmd2.evaluate import score_images
    from dmd2.families import load_model
    from dmd2.fid import FIDReference
    from dmd2.paths import ExperimentPaths
    from dmd2.sampling import sample_images

    root = eval_pipeline(tmp_path_factory)
    exp = load_params(root / "params.yaml").current("mnist")
    paths = ExperimentPaths("mnist", root)
    ref = FIDReference(exp, paths)
    rows = json.loads((root / "results/mnist/evaluation.json").read_text())["rows"]
    models = {"teacher": load_model(paths.teacher), "student": load_model(paths.student)}
    fids = set()
    for row in rows:
        model = models[row["model"]]
        steps = row["steps"] if row["model"] == "teacher" else None
        cond = model.family.balanced_conditions(exp.eval.num_samples)
        images = sample_images(model, exp.eval.num_samples, exp.eval.seed, exp.eval.batch_size, steps, cond)
        assert score_images(ref, images, cond)["fid"] == row["fid"], row
        assert row["nfe"] == model.nfe(steps)
        fids.add(row["fid"])
    assert len(fids) == len(rows)  # three different models or step counts: three different numbers


def test_sample_counts_and_output_paths_are_checked_by_the_cli(tmp_path):
    for count in ("0", "-3"):
        result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path), "--output_dir", str(tmp_path / "g"),
                                           "--num_samples", count])
        assert result.exit_code == 2 and "Invalid value for '--num_samples'" in result.output, result.output
    result = CliRunner().invoke(main, ["evaluate-folder", "--folder", str(tmp_path), "--output", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for '--output'" in result.output and "directory" in result.output


def test_a_caption_template_with_an_attribute_and_a_model_index_that_is_a_list_are_one_line(tmp_path):
    from dmd2.families import ModelError
    from dmd2.families.stable_diffusion import pipeline_kind
    from dmd2.latents import image_captions

    with pytest.raises(DataError, match=r"caption_template 'a {label.foo}' cannot be filled \(AttributeError"):
        image_captions(np.array([1, 2]), "a {label.foo}", None)
    (tmp_path / "model_index.json").write_text('["StableDiffusionPipeline"]')
    with pytest.raises(ModelError, match="model_index.json cannot be read .*is not a diffusers pipeline directory"):
        pipeline_kind(tmp_path)


def test_a_stage_run_too_early_or_on_a_launch_it_cannot_start_is_one_line(tmp_path):
    write_tiny_params(tmp_path)
    assert "run `dmd2 evaluate` first" in error_line(cli(tmp_path, "report"))
    two_processes = ["--set", "launch.distributed=ddp", "--set", "launch.processes_per_machine=2"]
    assert "run `dmd2 launch-config` first" in error_line(cli(tmp_path, "distill", *two_processes))
    assert cli(tmp_path, "launch-config", *two_processes, "--set", "launch.num_machines=2").exit_code == 0
    line = error_line(cli(tmp_path, "distill", *two_processes, "--set", "launch.num_machines=2"))
    assert "needs one launcher per machine" in line


def test_a_stage_never_rewrites_what_a_running_stage_reads_or_writes(prepared, tmp_path):
    """Whichever front-end started them (Snakemake, DVC, a shell): `dvc repro` rebuilding the data under a running
    distillation stops at once, naming the holder; readers share."""
    from dmd2.locks import stage_locks
    from dmd2.paths import ExperimentPaths

    root = fresh_copy(prepared, tmp_path / "locks")
    paths = ExperimentPaths("mnist", root)
    train = (root / "data/mnist/train.lmdb/data.mdb").read_bytes()
    with stage_locks(paths, "distill"):  # a distillation running (reads data and teacher, writes the student)
        line = error_line(cli(root, "prepare-data"))
        assert f"{paths.data} is in use by another running stage" in line and "Let it finish" in line
        line = error_line(cli(root, "teacher"))
        assert f"{paths.teacher} is in use by another running stage" in line
        with stage_locks(paths, "fid-reference"):  # another reader of the data: fine
            pass
    assert (root / "data/mnist/train.lmdb/data.mdb").read_bytes() == train
    with stage_locks(paths, "teacher"):  # a writer names itself
        line = error_line(cli(root, "distill"))
        assert "(`dmd2 teacher`, pid" in line
    assert cli(root, "prepare-data").exit_code == 0  # nothing held: runs
    assert (root / "work/mnist/locks/data.lock").exists()


@pytest.mark.integration
@pytest.mark.parametrize("stage, model", [("distill", "student"), ("teacher", "teacher")])
def test_a_stop_signal_checkpoints_where_it_is_and_the_rerun_ends_as_if_uninterrupted(prepared, tmp_path, stage,
                                                                                         model):
    """SIGUSR1 mid-run (`kill -USR1`; preemption sends SIGTERM, which does the same): the run finishes the iteration it is in,
    writes a checkpoint there, and ends with one `stopped:` line and exit status 75; the same command again resumes
    from that checkpoint, and the model is bit for bit the one an uninterrupted run writes."""
    from dmd2.checkpoint import checkpoint_step, latest_checkpoint

    settings = {stage: {"steps": 150, "checkpoint_every": 1000, "log_every": 1}}  # seconds even on a fast CPU
    straight = fresh_copy(prepared, tmp_path / "straight", **settings)
    assert start_stage(straight, stage).wait(timeout=240) == 0
    stopped = fresh_copy(prepared, tmp_path / "stopped", **settings)
    step = stop_mid_run(stopped, stage, f"work/mnist/{stage}/run-*/metrics.jsonl")
    assert 3 <= step < 150 and checkpoint_step(latest_checkpoint(run_dir(stopped, stage) / "checkpoints")) == step
    assert start_stage(stopped, stage).wait(timeout=240) == 0  # the same command again
    a = load_file(straight / "models/mnist" / model / "model.safetensors")
    b = load_file(stopped / "models/mnist" / model / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("text, seconds", [("59:58", 3598), ("1:02:03", 3723), ("2-00:00:10", 172810), ("0:05", 5),
                                            ("UNLIMITED", None), ("NOT_SET", None), ("INVALID", None), ("", None)])
def test_a_slurm_jobs_time_left_is_read_in_seconds(text, seconds):
    """`squeue -o %L` as Slurm prints it ([days-][hours:]minutes:seconds); no limit or nonsense is None."""
    from dmd2.stopping import parse_time_left

    assert parse_time_left(text + "\n") == seconds


def test_a_critic_per_step_trains_on_and_judges_only_its_steps_rows():
    """distill.critic_per_step: row i of the global batch is step i mod N (every micro-batch holds each step alike);
    the rows of step j train critic j alone, and only critic j scores them in the generator's losses."""
    from dmd2.config import ConfigError, DistillConfig
    from dmd2.distill import _check_micro_batch_holds_every_step

    steps = [999, 499]
    trainer, _ = _tiny_trainer(denoising_timesteps=steps, critic_per_step=True)
    critics = trainer.critic_module.critics
    assert len(critics) == 2 and critics[0].score is not critics[1].score and critics[0].head is not critics[1].head
    _, t = trainer.generator_input(4, None)
    assert t.tolist() == [999, 499, 999, 499]
    with trainer.draw.micro_batch(1, 2):  # the second of two micro-batches of 2: global rows 2 and 3
        assert trainer.generator_input(2, None)[1].tolist() == [999, 499]
    rows = trainer.step_of(t)
    family = trainer.family
    cond = family.encode_conditions(torch.tensor([0, 1, 2, 0]), "cpu")
    real, x = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1

    def critic_grads(fake: torch.Tensor) -> list[torch.Tensor]:
        trainer.critic_module.zero_grad()
        torch.manual_seed(0)
        out = trainer.critic_module(fake, cond, real, cond, rows)
        (out["loss_fake"] + out["loss_gan_critic"]).backward()
        return [torch.cat([p.grad.flatten() for p in c.parameters()]) for c in critics]

    before = critic_grads(x)
    after = critic_grads(torch.where((rows == 1).reshape(-1, 1, 1, 1), -x, x))  # step 1's rows changed
    assert torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])

    def generator_grads() -> torch.Tensor:
        sample = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        loss_dm, _, loss_gan = trainer._generator_losses(sample, cond, t, rows)
        (loss_dm + loss_gan).backward()
        return sample.grad

    before = generator_grads()
    with torch.no_grad():
        for p in critics[1].parameters():
            p.add_(0.1 * torch.randn_like(p))  # step 1's critic changed
    after = generator_grads()
    assert torch.equal(before[rows == 0], after[rows == 0]) and not torch.equal(before[rows == 1], after[rows == 1])

    with pytest.raises(ValueError, match="critic_per_step is for multi-step"):
        DistillConfig(critic_per_step=True)
    with pytest.raises(ValueError, match="repeats one"):
        DistillConfig(critic_per_step=True, denoising_timesteps=[999, 999, 499])
    with pytest.raises(ValueError, match="set step_per_sample: false"):
        DistillConfig(critic_per_step=True, denoising_timesteps=steps, step_per_sample=True)
    with pytest.raises(ConfigError, match="multiple of 2"):
        _check_micro_batch_holds_every_step(trainer.cfg, 3)
    _check_micro_batch_holds_every_step(trainer.cfg, 4)
