"""The real stages on a tiny configuration: data → teacher → distill, resume equivalence and crash recovery."""

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
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny import fresh_copy, run, run_dir, write_tiny_params

from dmd2.checkpoint import _read_single_file, checkpoint_step, list_checkpoints, load_checkpoint
from dmd2.cli import main
from dmd2.data import LMDBImageDataset, write_lmdb
from dmd2.tracking import read_jsonl


def student_weights(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "models/mnist/student/model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_teacher_outputs_the_normalised_format(prepared):
    teacher = prepared / "models/mnist/teacher"
    assert {"model.safetensors", "config.json", "metrics.jsonl", "stage.json"} <= {p.name for p in teacher.iterdir()}
    # teacher training resumes too: rerunning with more steps continues from its checkpoint
    assert [p.name for p in list_checkpoints(run_dir(prepared, "teacher") / "checkpoints")][-1] == "ckpt-0000006"


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{"denoising_timesteps": [999], "ema_decay": 0.9},
                                      {"denoising_timesteps": [999, 499]}], ids=["1step-ema", "2step-backsim"])
def test_resume_is_bit_identical(prepared, tmp_path, settings):
    """The student (with `ema_decay`, the generator's weight average, which is then training state too)."""
    one_go = fresh_copy(prepared, tmp_path / "a", distill=settings)
    run(one_go, "distill")
    split = fresh_copy(prepared, tmp_path / "b", distill={**settings, "steps": 3})
    run(split, "distill")
    write_tiny_params(split, distill=settings)  # steps back to 6: resume from ckpt 3
    run(split, "distill")
    assert_identical(student_weights(one_go), student_weights(split))
    if "ema_decay" in settings:  # the student is the generator's average, not its last weights
        last = list_checkpoints(run_dir(split, "distill") / "checkpoints")[-1]
        training = _read_single_file(last / "training.safetensors")
        key = "model.conv_in.weight"
        assert torch.equal(student_weights(split)[key], training["generator_ema"]["model"][key])
        assert not torch.equal(student_weights(split)[key], training["generator"]["model"][key])
    log = (run_dir(split, "distill") / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in log] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_continues_identically(prepared, tmp_path):
    reference = fresh_copy(prepared, tmp_path / "ref", distill={"checkpoint_every": 1, "steps": 12})
    run(reference, "distill")
    victim = fresh_copy(prepared, tmp_path / "victim", distill={"checkpoint_every": 1, "steps": 12})
    cmd = [sys.executable, "-m", "dmd2.cli", "distill", "--params", str(victim / "params.yaml"), "--root", str(victim)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    runs = victim / "work/mnist/distill"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if any(p.name.startswith(".ckpt") or p.name >= "ckpt-0000004" for p in runs.glob("run-*/checkpoints/*ckpt-*")):
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (victim / "models/mnist/student").exists(), "killed too late: the run had finished"
    run(victim, "distill")  # the same command again resumes from the last complete checkpoint
    assert_identical(student_weights(reference), student_weights(victim))


def test_seed_cli_surface_config_save_every_and_wandb_offline(prepared, tmp_path):
    root = fresh_copy(prepared, tmp_path / "seed")
    (root / "my.yaml").write_text("steps: 4\nwandb:\n  project: dmd2-test\n")
    result = CliRunner().invoke(main, ["distill", "--config", str(root / "my.yaml"), "--save_every", "2",
                                       "--wandb_mode", "offline", "--wandb_dir", str(root / "wb"), "--wandb_run_name",
                                       "seed-surface", "--wandb_log_every", "1", "--params", str(root / "params.yaml"),
                                       "--root", str(root)])
    assert result.exit_code == 0, result.output
    ckpts = [p.name for p in list_checkpoints(run_dir(root, "distill") / "checkpoints")]
    assert ckpts == ["ckpt-0000002", "ckpt-0000004"]
    offline = list((root / "wb").rglob("offline-run-*"))
    assert offline, "wandb wrote no offline run"
    assert f"upload it with `wandb sync {offline[0]}`" in result.output  # where it went, and how to upload it
    recorded = next(offline[0].glob("run-*.wandb")).read_bytes()  # its config: the whole experiment, run and code
    for value in (run_dir(root, "distill").name, '{"commit":', "heldout_fraction", "p_mean", "dfake_gen_update_ratio"):
        assert value.encode() in recorded, value
    # --resume_from_checkpoint: restart from step 2, dropping the later checkpoint, and finish again
    run(root, "distill", "--config", str(root / "my.yaml"), "--resume_from_checkpoint",
        str(run_dir(root, "distill") / "checkpoints/ckpt-0000002"))
    assert (root / "models/mnist/student/model.safetensors").exists()


def test_generate_writes_per_class_grid(prepared, tmp_path):
    result = CliRunner().invoke(main, ["generate", "--model", str(prepared / "models/mnist/teacher"),
                                       "--output_dir", str(tmp_path / "g"), "--num_samples", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "g").glob("0*.png"))) == 20 and (tmp_path / "g/grid.png").exists()


def test_bf16_autocast_and_gradient_checkpointing_run(prepared, tmp_path):
    root = fresh_copy(prepared, tmp_path / "opts", distill={"mixed_precision": "bf16", "gradient_checkpointing": True,
                                                            "steps": 2})
    run(root, "distill")
    last = (run_dir(root, "distill") / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"loss_fake"' in last and "NaN" not in last


def test_a_nan_loss_stops_with_the_last_good_checkpoint_intact(prepared, tmp_path, monkeypatch):
    import dmd2.distill

    root = fresh_copy(prepared, tmp_path / "nan", distill={"steps": 6, "checkpoint_every": 1, "warmup_steps": 0})
    real_loss, calls = dmd2.distill.distribution_matching_loss, []

    def diverging(*args, **kwargs):  # the second generator turn's loss is NaN
        loss, stats = real_loss(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) >= 2 else (loss, stats)

    monkeypatch.setattr(dmd2.distill, "distribution_matching_loss", diverging)
    result = CliRunner().invoke(main, ["distill", "--params", str(root / "params.yaml"), "--root", str(root)])
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: the generator turn produced loss_generator = nan") and "intact" in line, line
    failed_at = int(re.search(r"at iteration (\d+)", line).group(1))
    checkpoints = list_checkpoints(run_dir(root, "distill") / "checkpoints")
    assert checkpoints and checkpoint_step(checkpoints[-1]) <= failed_at  # nothing written after the bad step
    load_checkpoint(checkpoints[-1])
    assert not (root / "models/mnist/student").exists()


def test_changed_settings_start_a_fresh_run_and_keep_the_old_one(prepared, tmp_path):
    root = fresh_copy(prepared, tmp_path / "fresh", distill={"steps": 2})
    run(root, "distill")
    first = run_dir(root, "distill")
    write_tiny_params(root, distill={"steps": 2, "generator_lr": 1e-5})  # a learning rate: a different run
    run(root, "distill")
    runs = sorted(p.name for p in (root / "work/mnist/distill").glob("run-*"))
    assert len(runs) == 2 and first.exists()
    write_tiny_params(root, distill={"steps": 4, "generator_lr": 1e-5})  # more steps: the same run, extended
    run(root, "distill")
    assert len(list((root / "work/mnist/distill").glob("run-*"))) == 2
    # steps lowered to a checkpoint, then raised again: the student ships its own steps' records, the run keeps all
    second = next(p for p in (root / "work/mnist/distill").glob("run-*") if p != first)
    write_tiny_params(root, distill={"steps": 3, "generator_lr": 1e-5})
    run(root, "distill")
    assert [r["step"] for r in read_jsonl(root / "models/mnist/student/metrics.jsonl")] == [1, 2, 3]
    write_tiny_params(root, distill={"steps": 4, "generator_lr": 1e-5})
    run(root, "distill")
    assert [r["step"] for r in read_jsonl(second / "metrics.jsonl")] == [1, 2, 3, 4]


def test_metrics_log_keeps_every_record_until_a_step_is_recomputed(tmp_path):
    from dmd2.tracking import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    log = MetricsLog(path)  # a run resumed at step 2 with steps lowered to 2: it writes nothing, and loses nothing
    assert path.read_text().startswith('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    assert log.text_through(2) == '{"step": 1}\n{"step": 2}\n'  # what the model written at step 2 ships
    log.write({"step": 3, "new": True})  # recomputing step 3 replaces it (and the torn line), once
    log.write({"step": 4})
    assert path.read_text().splitlines() == ['{"step": 1}', '{"step": 2}', '{"step": 3, "new": true}', '{"step": 4}']


@pytest.mark.slow
def test_sample_grids_during_training_do_not_change_what_is_trained(prepared, tmp_path):
    plain = fresh_copy(prepared, tmp_path / "plain")
    run(plain, "distill")
    grids = fresh_copy(prepared, tmp_path / "grids", distill={"sample_every": 3})
    run(grids, "distill")
    assert sorted(p.name for p in (run_dir(grids, "distill") / "samples").iterdir()) == \
        ["step-0000003.png", "step-0000006.png"]
    assert_identical(student_weights(plain), student_weights(grids))


def test_forward_noised_multistep_training_pairs_real_samples_with_their_own_labels():
    """Multi-step without backward simulation starts from noised real samples: the generator must see their
    labels, not the batch's random ones."""
    from accelerate import Accelerator
    from gmm import GaussianMixture, MixtureEDM, ResidualDenoiser

    from dmd2.config import DistillConfig
    from dmd2.distill import Batch, DMD2Trainer

    class Spy(ResidualDenoiser):
        def forward(self, x, sigma, cond=None, features_only=False):
            self.seen = cond
            return super().forward(x, sigma, cond, features_only)

    mixture = GaussianMixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], [0.3, 0.3])
    family = MixtureEDM()
    family.config["label_dim"] = 2
    cfg = DistillConfig(batch_size=4, denoising_timesteps=[999, 499], backward_simulation=False, gan={"enabled": False})
    generator = Spy(mixture)
    trainer = DMD2Trainer(family, ResidualDenoiser(mixture), generator, ResidualDenoiser(mixture), None, cfg,
                          Accelerator(cpu=True))
    real_cond = family.encode_conditions(torch.tensor([0, 0, 1, 1]), "cpu")
    random_cond = family.encode_conditions(torch.tensor([1, 1, 0, 0]), "cpu")
    trainer.train_step(1, Batch(4, cond=random_cond, real=mixture.sample(4)[0], real_cond=real_cond))
    assert torch.equal(generator.seen, real_cond)


def test_progress_in_a_log_file_is_plain_periodic_lines():
    import io

    from dmd2.tracking import LogLines

    out = io.StringIO()
    with LogLines(4, 1, "distill", every=0, file=out) as bar:  # resumed at step 1
        for _ in range(3):
            bar.set_postfix(dm="0.21", fake="0.49")
            bar.update(1)
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 3  # one per update here (every=0), none repeated at close
    assert re.fullmatch(r"distill 2/4 \(50%\) [\d.e+]+ it/s elapsed 0m00s ETA \dm\d\ds dm=0.21 fake=0.49", lines[0])
    assert lines[-1].startswith("distill 4/4 (100%)") and "ETA" not in lines[-1]


def test_the_teacher_sampler_changes_the_teacher_record_not_its_training(prepared, tmp_path):
    import shutil

    root = fresh_copy(prepared, tmp_path / "sampler")
    shutil.copytree(prepared / "work", root / "work")
    weights = (root / "models/mnist/teacher/model.safetensors").read_bytes()
    write_tiny_params(root, teacher={"sampler": {"num_steps": 5}})
    result = CliRunner().invoke(main, ["teacher", "--params", str(root / "params.yaml"), "--root", str(root)])
    assert result.exit_code == 0 and "resuming teacher training" in result.output, result.output
    assert len(list((root / "work/mnist/teacher").glob("run-*"))) == 1
    assert (root / "models/mnist/teacher/model.safetensors").read_bytes() == weights
    assert json.loads((root / "models/mnist/teacher/config.json").read_text())["sampler"]["num_steps"] == 5


def test_the_distillation_run_covers_the_prompts_and_the_real_data(prepared, tmp_path):
    from dmd2.config import DistillConfig
    from dmd2.distill import distill_run_directory
    from dmd2.paths import ExperimentPaths
    from dmd2.prompts import write_prompts_lmdb

    root = fresh_copy(prepared, tmp_path / "inputs")
    paths, cfg = ExperimentPaths("mnist", root), DistillConfig()
    first = distill_run_directory(paths, cfg, regressed=False)
    assert distill_run_directory(paths, cfg, regressed=False) == first  # the same inputs: the same run
    # a setting added later, at its default, leaves the fingerprint as it was before the key existed (old runs
    # resume); set, it is a new run
    from dmd2.checkpoint import run_directory
    from dmd2.config import to_dict
    from dmd2.data import read_meta
    from dmd2.distill import DISTILL_PROGRESS_KEYS, KEYS_ADDED_LATER
    from dmd2.training import progress_keys

    before = {k: v for k, v in to_dict(cfg).items() if k not in KEYS_ADDED_LATER}
    inputs = [f for f in (paths.teacher / "config.json", paths.teacher / "model.safetensors") if f.exists()]
    assert first == run_directory(paths.work("distill"), {**before, "data": read_meta(paths.data / "train.lmdb")},
                                  progress_keys(DISTILL_PROGRESS_KEYS, cfg.lr_scheduler), inputs)
    assert distill_run_directory(paths, DistillConfig(dm_noise_below_input=True), regressed=False) != first
    write_prompts_lmdb(paths.data / "prompts.lmdb", ["a handwritten digit 1"], {})
    with_prompts = distill_run_directory(paths, cfg, regressed=False)
    write_prompts_lmdb(paths.data / "prompts.lmdb", ["a handwritten digit 2"], {})
    assert len({first, with_prompts, distill_run_directory(paths, cfg, regressed=False)}) == 3
    train = LMDBImageDataset(paths.data / "train.lmdb")
    images, labels = train.all_uint8()
    write_lmdb(paths.data / "train.lmdb", images, labels, {**train.meta, "source_sha256": "another source"})
    assert distill_run_directory(paths, cfg, regressed=False) not in {first, with_prompts}


@pytest.mark.slow
def test_the_regression_term_is_the_mse_to_the_teachers_pairs_and_resumes_identically(prepared, tmp_path):
    """`distill.regression_weight` (DMD's regression loss): on each generator turn the first step's output from a
    batch of pairs' noise, against the teacher's samples from that noise; its logged value at the first turn is the
    MSE computed here by hand from the untrained generator (the teacher), and a run split at a checkpoint draws the
    same pair batches (their position is training state) and ends with the same student."""
    from dmd2.data import RandomBatches
    from dmd2.families import load_model
    from dmd2.regression import PairDataset

    settings = {"regression_weight": 0.5}
    pairs = {"num_pairs": 12, "pair_batch_size": 4, "teacher_steps": 2, "loss": "mse"}
    one_go = fresh_copy(prepared, tmp_path / "a", distill=settings, regression=pairs)
    run(one_go, "distill")
    log = read_jsonl(run_dir(one_go, "distill") / "metrics.jsonl")
    assert all("loss_regression" in record for record in log)

    (lmdb,) = (one_go / "work/mnist/regression/pairs").glob("run-*/pairs.lmdb")
    teacher = load_model(one_go / "models/mnist/teacher")
    family = teacher.family
    target, noise, labels = RandomBatches(PairDataset(lmdb, family.sample_shape), 8, seed=0).next()  # distill.seed
    t = torch.full((8,), 999)
    with torch.no_grad():
        x = family.predict_x0(teacher.net, family.generator_input(noise, t), t, family.encode_conditions(labels, "cpu"))
    expected = torch.nn.functional.mse_loss(x, target.float()).item()
    assert log[0]["loss_regression"] == pytest.approx(expected, rel=1e-4)
    assert log[0]["loss_generator"] == pytest.approx(log[0]["loss_dm"] + 0.5 * expected, rel=1e-4)

    split = fresh_copy(prepared, tmp_path / "b", distill={**settings, "steps": 3}, regression=pairs)
    run(split, "distill")
    write_tiny_params(split, distill=settings, regression=pairs)  # steps back to 6: resume from ckpt 3
    run(split, "distill")
    assert_identical(student_weights(one_go), student_weights(split))
