"""EDM's released teachers through the whole DAG at tiny size: a CIFAR-10 archive and an ImageNet-style zip in the
official formats, EDM-style pickles converted without running their code, then distil → evaluate → report."""

import json

import pytest
from test_dag import ALL_STAGES, SNAKEMAKE, project_copy, sh, snakemake_ran
from tiny import add_edm_experiments, run, write_tiny_params


@pytest.mark.integration
def test_snakemake_distils_converted_edm_teachers(tmp_path):
    root = project_copy(tmp_path / "edm")
    for experiment, architecture in zip(add_edm_experiments(root), ("ddpmpp", "adm"), strict=True):
        out, _ = sh(root, *SNAKEMAKE, "--config", f"experiment={experiment}")
        assert snakemake_ran(out) == ALL_STAGES, out[-3000:]
        teacher = json.loads((root / f"models/{experiment}/teacher/config.json").read_text())
        assert teacher["architecture"] == architecture and teacher["source"]["type"] == "edm_pickle"
        assert teacher["network"]["dropout"] == 0.0  # DMD2 distils with dropout off
        evaluation = json.loads((root / f"results/{experiment}/evaluation.json").read_text())
        assert [r["setting"] for r in evaluation["rows"]] == ["1 Heun step", "3 Heun steps", "1-step generator (t = 999)"]
        assert (root / f"results/{experiment}/report.html").exists()
        data = json.loads((root / f"data/{experiment}/stage.json").read_text())
        # CIFAR-10 keeps its own split (5 train batches, the test batch held out); the zip is split ~90/10 per class
        if experiment == "cifar10-tiny":
            assert (data["train"], data["heldout"]) == (200, 40)
        else:
            assert data["train"] + data["heldout"] == 120 and 6 <= data["heldout"] <= 18


def test_a_ddpmpp_teacher_trains_here_and_distils(tmp_path):
    """`teacher.source: train` with one of EDM's architectures: the teacher stage trains it with EDM's objective,
    and distillation reads its GAN features at the encoder output."""
    write_tiny_params(tmp_path)
    add_edm_experiments(tmp_path)
    network = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]}
    overrides = [f"--set=teacher={json.dumps({'family': 'edm', 'architecture': 'ddpmpp', 'network': network, 'steps': 2, 'batch_size': 4, 'sampler': {'num_steps': 2}})}",
                 "--set=distill.steps=2"]
    for stage in ("prepare-data", "teacher", "distill"):
        run(tmp_path, stage, "--experiment", "cifar10-tiny", *overrides)
    teacher = json.loads((tmp_path / "models/cifar10-tiny/teacher/config.json").read_text())
    assert teacher["architecture"] == "ddpmpp" and teacher["source"]["type"] == "trained"
    assert (tmp_path / "models/cifar10-tiny/student/config.json").exists()
