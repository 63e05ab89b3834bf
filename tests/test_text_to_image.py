"""Text-to-image through the real stages: tiny SD1.5- and SDXL-shaped pipelines as teachers, MNIST digits captioned
by their class as the real data. prepare-data writes the latents and prompts, the teacher stage records the
pipeline, distillation draws prompts (not labels), evaluation samples from the held-out captions."""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO
from safetensors.torch import load_file
from tiny import run

from dmd2.data import DataError, LMDBImageDataset
from dmd2.families import load_model
from dmd2.families.stable_diffusion import LatentCodec
from dmd2.latents import LatentDataset, encode_split
from dmd2.prompts import PromptDataset
from dmd2.tiny_pipelines import tiny_pipeline
from dmd2.training import GlobalBatchRandom

pytestmark = pytest.mark.xdist_group("text_to_image")

SHRINK = {"distill": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1},
          "eval": {"num_samples": 20, "batch_size": 10, "teacher_steps": [2], "grid_per_class": 2,
                   "latency_repeats": 1, "classifier": {"width": 8, "feature_dim": 16, "steps": 10, "batch_size": 32}}}


def text_project(root, experiment: str, **overrides) -> None:
    """A project whose params.yaml is the repository's with `experiment` shrunk, and its tiny pipeline built."""
    kind = "sdxl" if experiment.startswith("sdxl") else "sd15"
    tiny_pipeline(kind, root / "models" / experiment / "pipeline", resolution=32)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    block = params[experiment]
    for stage, values in {**SHRINK, **overrides}.items():
        block[stage] = {**block.get(stage, {}), **values}
    params["experiment"] = experiment
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def sd_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-tiny")
    text_project(root, "sd-tiny")
    run(root, "prepare-data")
    run(root, "teacher")
    return root


def test_the_data_stage_writes_latents_with_their_captions_and_the_prompts(sd_project):
    data = sd_project / "data" / "sd-tiny"
    train, heldout = LMDBImageDataset(data / "train.lmdb"), LMDBImageDataset(data / "heldout.lmdb")
    assert train.shape == (3, 32, 32)  # grey digits as RGB, for the VAE
    latents = LatentDataset(data / "latents.lmdb")
    assert len(latents) == len(train) and latents.shape == (4, 16, 16)
    # each latent is its own image through the pipeline's VAE, paired with its own caption
    x, captions = latents.batch(range(64))
    codec = LatentCodec.from_pipeline(sd_project / "models" / "sd-tiny" / "pipeline")
    first = LMDBImageDataset(data / "train.lmdb")
    first.meta["count"] = 64  # the first batch encode_split draws, with the same seeded posterior samples
    expected = encode_split(first, codec, seed=0)
    torch.testing.assert_close(x, expected, atol=2e-3, rtol=2e-3)  # stored as float16
    labels = train.labels()[:64]
    assert captions == [f"a handwritten digit {int(y)}" for y in labels]
    # the generator's prompts default to the training captions; evaluation's are the held-out captions in order
    assert len(PromptDataset(data / "prompts.lmdb")) == len(train)
    held_out = PromptDataset(data / "eval_prompts.lmdb")
    assert held_out.batch(range(len(held_out))) == [f"a handwritten digit {int(y)}" for y in heldout.labels()]


def test_the_family_draws_prompts_and_labels_them_for_evaluation(sd_project):
    model = load_model(sd_project / "models" / "sd-tiny" / "teacher", data_dir=sd_project / "data" / "sd-tiny")
    family = model.family
    assert family.name == "stable_diffusion" and family.latent_space and family.sample_shape == (4, 16, 16)
    assert model.config["pipeline"]["kind"] == "sd15" and model.nfe(8) == 16  # guidance 1.75: two calls per step
    torch.manual_seed(0)
    prompts = family.random_conditions(6, GlobalBatchRandom())
    assert len(prompts) == 6 and all(p.startswith("a handwritten digit ") for p in prompts)
    # evaluation cycles through the held-out captions, and knows each one's class for class accuracy
    raw, labels = family.balanced_conditions(5), family.balanced_labels(5)
    assert raw == [f"a handwritten digit {int(y)}" for y in labels]
    cond = family.encode_conditions(raw, "cpu")
    assert cond["encoder_hidden_states"].shape[:2] == (5, 77)
    grid, columns = family.grid_conditions(2)
    assert columns == 8 and grid == family.balanced_conditions(8) * 2
    images = family.decode(torch.zeros(2, 4, 16, 16))
    assert images.shape == (2, 3, 32, 32)


@pytest.fixture(scope="module")
def sd_student(sd_project):
    run(sd_project, "distill")
    return sd_project / "models" / "sd-tiny" / "student"


def assert_exported_pipeline_reproduces_generate(student_dir, out_dir, prompts: list[str], flow: str | None = None) -> None:
    """`DiffusionPipeline.from_pretrained(exported)` called as `dmd2 export` says, from `dmd2 generate`'s noise and
    re-noising generator, makes `dmd2 generate`'s images. `flow` "sd3" or "flux": SD3's and Flux's pipelines pass
    no generator to their scheduler, so re-noising draws from torch's global generator, seeded as the export says;
    Flux's takes the noise in 2×2 patches."""
    from diffusers import DiffusionPipeline

    from dmd2.export import export_pipeline, student_call_arguments
    from dmd2.sampling import fixed_noise, sample_images, to_uint8

    export_pipeline(student_dir, out_dir)
    pipe = DiffusionPipeline.from_pretrained(out_dir)
    model = load_model(student_dir)
    ours = sample_images(model, len(prompts), seed=0, raw_cond=prompts)  # what `dmd2 generate` writes
    noise = fixed_noise(len(prompts), model.family.sample_shape, 0)
    if flow == "flux":
        noise = type(pipe)._pack_latents(noise, *noise.shape)
    if flow:
        torch.manual_seed(1)
    theirs = pipe(prompts, latents=noise,
                  generator=torch.Generator().manual_seed(1), output_type="pt", **student_call_arguments(out_dir)).images
    difference = (to_uint8(theirs * 2 - 1).int() - ours.int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01  # rounding of float32 arithmetic only


def assert_the_gan_head_trained(root: Path, student_dir: Path, family) -> None:
    """The diffusion-GAN was on and learned: every generator turn logged a finite GAN loss, and the head's weights in
    the last checkpoint moved away from their initialisation (gradients reached it through the mid-block features)."""
    from dmd2.checkpoint import _read_single_file, latest_checkpoint, training_state_path
    from dmd2.distill import new_gan_head

    records = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    gan = [r["loss_gan_generator"] for r in records if "loss_dm" in r]
    assert gan and all(math.isfinite(v) for v in gan)
    run = root / "work" / "sd-tiny" / "distill"
    checkpoint = latest_checkpoint(next(run.glob("run-*")) / "checkpoints")
    critic = _read_single_file(training_state_path(checkpoint))["critic"]["model"]
    initial = new_gan_head(family, seed=0).state_dict()
    moved = [k for k, v in initial.items() if not torch.equal(critic[f"head.{k}"].float(), v.float())]
    assert len(moved) == len(initial), f"GAN head tensors still at their initial values: {set(initial) - set(moved)}"


def test_a_text_to_image_student_is_distilled_and_evaluated(sd_project, sd_student):
    student = load_model(sd_project / "models" / "sd-tiny" / "student", data_dir=sd_project / "data" / "sd-tiny")
    assert student.is_student and student.family.name == "stable_diffusion" and student.timesteps == [999]
    assert_the_gan_head_trained(sd_project, sd_student, student.family)
    run(sd_project, "fid-reference")
    run(sd_project, "evaluate")
    record = yaml.safe_load((sd_project / "results" / "sd-tiny" / "evaluation.json").read_text())
    rows = {r["model"]: r for r in record["rows"]}
    assert record["family"] == "stable_diffusion" and set(rows) == {"teacher", "student"}
    assert rows["teacher"]["nfe"] == 4 and rows["student"]["class_accuracy"] is not None
    assert (sd_project / "results" / "sd-tiny" / "samples" / "student_nfe1.png").exists()
    assert "captions as prompts" in record["fid_protocol"]
    assert record["grid_prompts"] == load_model(sd_student, data_dir=sd_project / "data" / "sd-tiny").family.balanced_conditions(8)
    run(sd_project, "report")
    assert "each column is one prompt" in (sd_project / "results" / "sd-tiny" / "report.html").read_text()


@pytest.fixture(scope="module")
def sdxl_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-tiny")
    text_project(root, "sdxl-tiny", data={"heldout_fraction": 0.5})
    run(root, "prepare-data")
    run(root, "teacher")
    return root


def sdxl_copy(sdxl_project, dest, **overrides):
    """The sdxl-tiny project's data and teacher with other settings (merged into each stage block)."""
    import shutil

    for part in ("data/sdxl-tiny", "models/sdxl-tiny/teacher"):
        shutil.copytree(sdxl_project / part, dest / part)
    return sdxl_params(sdxl_project, dest, **overrides)


def sdxl_params(sdxl_project, dest, **overrides):
    params = yaml.safe_load((sdxl_project / "params.yaml").read_text())
    for stage, values in overrides.items():
        params["sdxl-tiny"][stage] = {**params["sdxl-tiny"].get(stage, {}), **values}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def test_an_sdxl_shaped_four_step_student_trains_with_backward_simulation(sdxl_project, tmp_path):
    sdxl_copy(sdxl_project, tmp_path)
    run(tmp_path, "distill")
    student = load_model(tmp_path / "models" / "sdxl-tiny" / "student")
    assert student.config["pipeline"]["kind"] == "sdxl" and student.timesteps == [999, 749, 499, 249]
    # four steps: the exported LCMScheduler re-noises from the pipeline's generator as `dmd2 generate` does
    assert_exported_pipeline_reproduces_generate(tmp_path / "models" / "sdxl-tiny" / "student",
                                                 tmp_path / "exported", ["a handwritten digit 3", "a red cat"])


def test_the_exported_one_step_pipeline_reproduces_dmd2_generate(sd_student, tmp_path):
    assert_exported_pipeline_reproduces_generate(sd_student, tmp_path / "exported",
                                                 ["a handwritten digit 7", "a handwritten digit 1", "a dog"])
    from dmd2.export import student_call_arguments

    assert student_call_arguments(tmp_path / "exported") == {"num_inference_steps": 1, "guidance_scale": 0.0}


def test_export_replaces_only_a_directory_it_wrote(sd_project, sd_student, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from dmd2.cli import main

    monkeypatch.chdir(sd_project)
    before = sorted(str(p) for p in Path(".").rglob("*"))
    for target in (".", "models/sd-tiny", "models/sd-tiny/student"):
        result = CliRunner().invoke(main, ["export", "--model", "models/sd-tiny/student", "--output_dir", target])
        assert result.exit_code == 1 and result.output.count("error:") == 1, result.output
        assert "not empty and was not written by `dmd2 export`" in result.output
    assert sorted(str(p) for p in Path(".").rglob("*")) == before  # nothing deleted, nothing left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    for _ in range(2):  # an empty directory, then its own earlier export
        result = CliRunner().invoke(main, ["export", "--model", "models/sd-tiny/student", "--output_dir", str(empty)])
        assert result.exit_code == 0, result.output
    assert (empty / "dmd2_student.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_export_refuses_an_empty_mount_point(sd_project, sd_student, tmp_path):
    """An empty mount point would pass the non-empty check, and the final rename onto it fails ("Device or resource
    busy") after all the work: it is refused first, in one line, and stays mounted and empty. The mount is a tmpfs
    in a private mount namespace (`unshare -rm`: no root needed, nothing mounted outside the test)."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to make a mount point")
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = (f"mount -t tmpfs none {mount} && {sys.executable} -m dmd2.cli export --model "
              f"models/sd-tiny/student --output_dir {mount}; echo exit=$?; ls -A {mount} | wc -l")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=sd_project, capture_output=True, text=True,
                          timeout=300)
    if "mount" in proc.stderr and "exit=" not in proc.stdout:
        pytest.skip(f"this machine does not allow a private mount namespace: {proc.stderr.strip()[:200]}")
    assert "exit=1" in proc.stdout and proc.stdout.strip().endswith("0"), proc.stdout + proc.stderr
    assert f"error: --output_dir {mount} is a mount point" in proc.stderr, proc.stderr


def test_only_text_to_image_students_export(sd_project, tmp_path):
    from dmd2.export import export_pipeline
    from dmd2.families import ModelError

    with pytest.raises(ModelError, match="not a student with an export format"):
        export_pipeline(sd_project / "models" / "sd-tiny" / "teacher", tmp_path / "out")


def test_bad_text_to_image_data_settings_are_named_before_anything_is_written(tmp_path):
    from click.testing import CliRunner

    from dmd2.cli import main

    def fails(**data) -> str:
        text_project(tmp_path, "sd-tiny", data=data)
        result = CliRunner().invoke(main, ["prepare-data", "--params", str(tmp_path / "params.yaml"),
                                           "--root", str(tmp_path)])
        assert result.exit_code != 0
        return result.output

    assert "set data.resolution: 32" in fails(resolution=16)
    assert "{label} and {class_name}" in fails(caption_template="a digit {name}")
    captions = tmp_path / "captions.txt"
    captions.write_text("one\ntwo\n")
    assert "holds 2 captions, but the source has 5000 images" in fails(image_captions=str(captions))
    assert "data.prompts: captions file" in fails(prompts=str(tmp_path / "missing.txt"))
    assert not (tmp_path / "data" / "sd-tiny").exists()

    def teacher_fails(pretrained: str) -> str:
        params = yaml.safe_load((tmp_path / "params.yaml").read_text())
        params["sd-tiny"]["teacher"]["pretrained"] = pretrained
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        result = CliRunner().invoke(main, ["prepare-data", "--params", str(tmp_path / "params.yaml"),
                                           "--root", str(tmp_path)])
        assert result.exit_code != 0
        return result.output

    text_project(tmp_path, "sd-tiny")
    assert "is not a diffusers pipeline directory" in teacher_fails(str(tmp_path / "models"))
    assert "is not a tiny pipeline (tiny:sd15 or tiny:sdxl or tiny:sd3 or tiny:flux)" in teacher_fails("tiny:sd4")
    assert "(SD3 and Flux pipelines: teacher.family flow_pipeline)" in teacher_fails("tiny:sd3")
    assert not (tmp_path / "data" / "sd-tiny").exists()


def test_latents_for_another_pipeline_are_refused(sd_project):
    with pytest.raises(DataError, match="latents of shape"):
        LatentDataset(sd_project / "data" / "sd-tiny" / "latents.lmdb", expect_shape=(4, 8, 8))


def lora_project(sd_project, dest, **distill) -> None:
    """A copy of the sd-tiny project's data and teacher with a LoRA generator."""
    import shutil

    for part in ("data/sd-tiny", "models/sd-tiny/teacher"):
        shutil.copytree(sd_project / part, dest / part)
    params = yaml.safe_load((sd_project / "params.yaml").read_text())
    params["sd-tiny"]["distill"].update({"lora": {"enabled": True, "rank": 4, "alpha": 4.0}, "generator_lr": 1e-2,
                                         **distill})
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_lora_student_trains_only_its_adapters_and_ships_fused_and_as_a_lora_file(sd_project, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler
    from safetensors.torch import load_file

    from dmd2.sampling import fixed_noise, sample_images, to_uint8

    lora_project(sd_project, tmp_path)
    run(tmp_path, "distill")
    folder = tmp_path / "models" / "sd-tiny" / "student"
    student, teacher = load_model(folder), load_model(tmp_path / "models" / "sd-tiny" / "teacher")
    assert student.config["generator"]["lora"] == {"rank": 4, "alpha": 4.0, "file": "lora.safetensors"}
    adapter = load_file(folder / "lora.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    fused, base = student.net.state_dict(), teacher.net.state_dict()
    assert set(fused) == set(base)  # a plain UNet: the adapters fused into the weights they adapt
    assert torch.equal(fused["conv_norm_out.weight"], base["conv_norm_out.weight"])  # not adapted: frozen
    assert not torch.equal(fused["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                           base["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    prompts = ["a handwritten digit 4", "a handwritten digit 9"]
    assert_exported_pipeline_reproduces_generate(folder, tmp_path / "exported", prompts)
    # the adapters on a stock copy of the teacher pipeline make the same images, up to the fused arithmetic
    pipe = DiffusionPipeline.from_pretrained(student.family.pipeline_path)
    pipe.scheduler = LCMScheduler.from_pretrained(tmp_path / "exported", subfolder="scheduler")
    pipe.load_lora_weights(tmp_path / "exported")
    theirs = pipe(prompts, latents=fixed_noise(2, student.family.sample_shape, 0), num_inference_steps=1,
                  guidance_scale=0, generator=torch.Generator().manual_seed(1), output_type="pt").images
    difference = (to_uint8(theirs * 2 - 1).int() - sample_images(student, 2, seed=0, raw_cond=prompts).int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.05


def test_a_lora_run_resumes_to_the_same_student(sd_project, tmp_path):
    from safetensors.torch import load_file

    whole, split = tmp_path / "whole", tmp_path / "split"
    for root in (whole, split):
        lora_project(sd_project, root)
    run(whole, "distill")
    run(split, "distill", "--set", "distill.steps=2")
    run(split, "distill")  # raising steps extends the same run from its checkpoint at 2
    a = load_file(whole / "models/sd-tiny/student/lora.safetensors")
    b = load_file(split / "models/sd-tiny/student/lora.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if ".lora_B." in k)  # the adapters moved off zero


@pytest.mark.integration
def test_a_sharded_lora_run_matches_one_process_and_resumes_across_world_sizes(sdxl_project, tmp_path):
    """The SDXL LoRA recipe's shape on 2 CPU processes with FSDP2: every network sharded (frozen base weights and
    trainable adapters in the same units), the adapters' first values broadcast from rank 0. It lands where one
    process lands, and a sharded run stopped half way resumes in one process."""
    from test_distributed import PARAM_RTOL, distill_subprocess

    from dmd2.checkpoint import latest_checkpoint

    lora = {"lora": {"enabled": True, "rank": 4, "alpha": 4.0}, "generator_lr": 1e-2}
    fsdp = {"distributed": "fsdp", "processes_per_machine": 2,
            "fsdp": {"sharding_strategy": "FULL_SHARD", "min_num_params": 2000}}
    one = sdxl_copy(sdxl_project, tmp_path / "one", distill=lora)
    run(one, "distill")
    two = sdxl_copy(sdxl_project, tmp_path / "two", distill=lora, launch=fsdp)
    distill_subprocess(two)
    shrink = sdxl_copy(sdxl_project, tmp_path / "shrink", distill={**lora, "steps": 2}, launch=fsdp)
    distill_subprocess(shrink)
    checkpoint = latest_checkpoint(next((shrink / "work/sdxl-tiny/distill").glob("run-*")) / "checkpoints")
    assert json.loads((checkpoint / "meta.json").read_text())["sharded"] is True
    sdxl_params(sdxl_project, shrink, distill=lora)  # one process, all the steps
    run(shrink, "distill")

    def adapters(root):
        return load_file(root / "models/sdxl-tiny/student/lora.safetensors")

    reference = adapters(one)
    assert any(v.abs().max() > 0 for k, v in reference.items() if ".lora_B." in k)
    for other in (two, shrink):
        weights = adapters(other)
        difference = torch.sqrt(sum(((weights[k] - reference[k]) ** 2).sum() for k in reference))
        norm = torch.sqrt(sum((reference[k] ** 2).sum() for k in reference))
        assert weights.keys() == reference.keys() and (difference / norm).item() < PARAM_RTOL, other.name


def test_bf16_keeps_the_frozen_networks_in_bf16_and_the_trained_ones_in_float32(sdxl_project, tmp_path, monkeypatch):
    import dmd2.distill as distill

    trainers = []
    original = distill.DMD2Trainer.__init__

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(distill.DMD2Trainer, "__init__", capture)
    sdxl_copy(sdxl_project, tmp_path, distill={"mixed_precision": "bf16", "steps": 2})
    run(tmp_path, "distill")
    trainer = trainers[0]
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    encoder = trainer.family.prompt_encoder("cpu")  # the text encoders too; their encodings stay float32
    assert {p.dtype for enc in encoder.text_encoders for p in enc.parameters()} == {torch.bfloat16}
    cond = trainer.family.encode_conditions(["a handwritten digit 2"], "cpu")
    assert cond["encoder_hidden_states"].dtype == cond["added_cond_kwargs"]["text_embeds"].dtype == torch.float32
    for net in (trainer.generator_module, trainer.critic_module):
        assert {p.dtype for p in net.parameters()} == {torch.float32}
    student = load_file(tmp_path / "models/sdxl-tiny/student/model.safetensors")
    assert {v.dtype for v in student.values()} == {torch.float32}


def tiny_taesd(path):
    """A tiny AutoencoderTiny (the recipe decodes the regression's images with taesdxl) for the tiny SDXL latents."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(path)
    return str(path)


def regression_settings(tmp_path, **extra):
    return {"enabled": True, "num_pairs": 6, "pair_batch_size": 4, "steps": 4, "batch_size": 3, "lr": 1e-3,
            "checkpoint_every": 2, "log_every": 1, "lpips": {"pretrained_backbone": False},
            "decoder": tiny_taesd(tmp_path / "taesd"), **extra}


@contextlib.contextmanager
def unet_training_timesteps():
    """The timesteps of every UNet call made with gradients on (training, not pair generation or sampling) while
    the block runs, through a module hook on the real network."""
    from diffusers import UNet2DConditionModel

    seen: set[int] = set()

    def record(module, args):
        if isinstance(module, UNet2DConditionModel) and torch.is_grad_enabled():
            seen.update(int(t) for t in torch.as_tensor(args[1]).flatten())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def unet_training_batch_sizes():
    """The batch sizes of every UNet call made with gradients on while the block runs."""
    from diffusers import UNet2DConditionModel

    seen: set[int] = set()

    def record(module, args):
        if isinstance(module, UNet2DConditionModel) and torch.is_grad_enabled():
            seen.add(len(args[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def test_the_sdxl_one_step_recipe_regresses_onto_teacher_pairs_distills_at_399_and_exports(sdxl_project, tmp_path):
    """SDXL's one-step recipe: teacher ODE pairs, an LPIPS regression (images decoded by a tiny VAE), then
    distillation from the regressed generator at t = 399. LCM's default for one step is 999, so the export says to
    pass timesteps=[399], and with it the pipeline makes `dmd2 generate`'s images."""
    from dmd2.export import student_call_arguments
    from dmd2.regression import PairDataset

    sdxl_copy(sdxl_project, tmp_path, distill={"denoising_timesteps": [399], "steps": 2},
              regression=regression_settings(tmp_path))
    with unet_training_timesteps() as trained_at:
        run(tmp_path, "regression")
    assert trained_at == {399}  # every training forward of the generator, not only its config, is at t = 399
    models = tmp_path / "models/sdxl-tiny"
    # each pair is the teacher's own guided sampler from that pair's noise and prompt
    teacher = load_model(models / "teacher", data_dir=tmp_path / "data/sdxl-tiny")
    pairs_file = next((tmp_path / "work/sdxl-tiny/regression/pairs").glob("run-*/pairs.lmdb"))
    pairs = PairDataset(pairs_file, teacher.family.sample_shape)
    assert len(pairs) == 6 and pairs.info["teacher_steps"] == 8 and pairs.info["guidance_scale"] == 8.0
    x0, noise, prompts = pairs.batch([4, 1])
    cond = teacher.family.encode_conditions(prompts, "cpu")
    expected = teacher.family.sample_teacher(teacher.net, noise, cond, 8, 8.0)
    torch.testing.assert_close(x0, expected, atol=2e-2, rtol=1e-2)  # stored as float16
    # the regressed generator is a one-step student that moved away from the teacher
    regressed = load_model(models / "regression")
    assert regressed.is_student and regressed.timesteps == [399]
    moved = [not torch.equal(a, b) for a, b in zip(regressed.net.state_dict().values(),
                                                    teacher.net.state_dict().values(), strict=True)]
    assert sum(moved) > len(moved) // 2
    losses = [json.loads(line)["loss"] for line in (models / "regression/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)

    run(tmp_path, "distill")
    student = models / "student"
    assert load_model(student).timesteps == [399]
    assert_exported_pipeline_reproduces_generate(student, tmp_path / "exported", ["a handwritten digit 5"])
    assert student_call_arguments(tmp_path / "exported") == {"num_inference_steps": 1, "guidance_scale": 0.0,
                                                             "timesteps": [399]}


def test_a_stop_signal_stops_the_regression_at_a_checkpoint_and_the_rerun_finishes_it(sdxl_project, tmp_path):
    from tiny import start_stage, stop_mid_run

    from dmd2.checkpoint import checkpoint_step, latest_checkpoint

    settings = regression_settings(tmp_path, loss="mse", decoder=None, steps=60, checkpoint_every=1000)
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for root in (straight, stopped):
        root.mkdir()
        sdxl_copy(sdxl_project, root, distill={"denoising_timesteps": [399]}, regression=settings)
    assert start_stage(straight, "regression").wait(timeout=300) == 0
    step = stop_mid_run(stopped, "regression", "work/sdxl-tiny/regression/train/run-*/metrics.jsonl")
    checkpoints = next((stopped / "work/sdxl-tiny/regression/train").glob("run-*")) / "checkpoints"
    assert 3 <= step < 60 and checkpoint_step(latest_checkpoint(checkpoints)) == step
    assert start_stage(stopped, "regression").wait(timeout=300) == 0  # the same command again
    a = load_file(straight / "models/sdxl-tiny/regression/model.safetensors")
    b = load_file(stopped / "models/sdxl-tiny/regression/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distillation_starts_from_the_regressed_generator_and_a_regression_run_resumes(sdxl_project, tmp_path):
    """Stopped at step 2 and run again in micro-batches, the regression reaches the same generator as a run straight
    to step 4 in whole batches; the distillation's generator starts from it (the critic from the teacher)."""
    import copy

    from dmd2.config import load_params
    from dmd2.distill import new_generator
    from dmd2.families import ModelError
    from dmd2.paths import ExperimentPaths
    from dmd2.regression import start_weights
    from dmd2.stage import StageContext

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for root in (straight, resumed):
        root.mkdir()
        sdxl_copy(sdxl_project, root, distill={"denoising_timesteps": [399]},
                  regression=regression_settings(tmp_path, loss="mse", decoder=None))
    run(straight, "regression")
    run(resumed, "regression", "--set", "regression.steps=2")
    # the same command again, with the step count back at 4 and each batch of 3 cut into micro-batches of 1
    # (regression.micro_batch: the gradients add up before each step): it resumes the same run at step 2
    with unet_training_batch_sizes() as sizes:
        run(resumed, "regression", "--set", "regression.micro_batch=1")
    assert sizes == {1} and len(list((resumed / "work/sdxl-tiny/regression/train").glob("run-*"))) == 1
    a = load_file(straight / "models/sdxl-tiny/regression/model.safetensors")
    b = load_file(resumed / "models/sdxl-tiny/regression/model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    logs = [[json.loads(line) for line in (root / "models/sdxl-tiny/regression/metrics.jsonl").read_text().splitlines()]
            for root in (straight, resumed)]
    for whole, cut in zip(*logs, strict=True):  # the batch's loss and gradient, as whole batches give them
        assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-5)
        assert cut["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)

    params = load_params(straight / "params.yaml")
    ctx = StageContext(params, "sdxl-tiny", ExperimentPaths("sdxl-tiny", straight))
    teacher = load_model(straight / "models/sdxl-tiny/teacher")
    generator = new_generator(teacher.family, copy.deepcopy(teacher.net), params.current().distill, start_weights(ctx))
    for key, value in generator.state_dict().items():
        assert torch.equal(value, a[key])
    # a multi-step student from the same first timestep starts from the same weights; another first timestep is refused
    two_step = load_params(straight / "params.yaml", ["distill.denoising_timesteps=[399, 199]"])
    weights = start_weights(StageContext(two_step, "sdxl-tiny", ExperimentPaths("sdxl-tiny", straight)))
    assert all(torch.equal(weights[k], a[k]) for k in a)
    other = load_params(straight / "params.yaml", ["distill.denoising_timesteps=[999, 499]"])
    with pytest.raises(ModelError, match=r"pre-trained at t = \[399\].*starts at 999.*dmd2 regression"):
        start_weights(StageContext(other, "sdxl-tiny", ExperimentPaths("sdxl-tiny", straight)))


def test_clip_score_rows_compare_each_sample_with_its_own_prompt(sd_project, sd_student, tmp_path):
    """eval.clip on a text-to-image experiment: each generated image against the caption it was generated from
    (a tiny random open_clip model saved as a local checkpoint stands in for ViT-g/14)."""
    import shutil

    import open_clip
    from test_clip_score import TINY, TINY_CFG

    from dmd2.clip_score import clip_score, load_clip
    from dmd2.config import CLIPConfig
    from dmd2.sampling import sample_images

    if not (sd_project / "models/sd-tiny/fid_reference").exists():
        run(sd_project, "fid-reference")
    for part in ("data/sd-tiny", "models/sd-tiny/teacher", "models/sd-tiny/student", "models/sd-tiny/fid_reference"):
        shutil.copytree(sd_project / part, tmp_path / part)
    open_clip.factory._MODEL_CONFIGS[TINY] = TINY_CFG
    try:
        torch.manual_seed(0)
        torch.save(open_clip.create_model_and_transforms(TINY, pretrained=None)[0].state_dict(), tmp_path / "clip.pt")
        clip = {"enabled": True, "model": TINY, "pretrained": str(tmp_path / "clip.pt")}
        params = yaml.safe_load((sd_project / "params.yaml").read_text())
        params["sd-tiny"]["eval"].update(clip=clip, fid_curve=False)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        run(tmp_path, "evaluate")
        rows = json.loads((tmp_path / "results/sd-tiny/evaluation.json").read_text())["rows"]
        student = load_model(tmp_path / "models/sd-tiny/student", data_dir=tmp_path / "data/sd-tiny")
        n = params["sd-tiny"]["eval"]["num_samples"]
        prompts = student.family.balanced_conditions(n)
        images = sample_images(student, n, seed=0, batch_size=params["sd-tiny"]["eval"]["batch_size"], raw_cond=prompts)
        expected = clip_score(*load_clip(CLIPConfig(**clip)), images, prompts)
        assert rows[-1]["model"] == "student" and rows[-1]["clip_score"] == pytest.approx(expected, abs=1e-4)
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(TINY, None)


def test_the_coco_protocol_matches_clean_fid_on_the_same_folders(tmp_path):
    """eval.coco: each model's FID on images generated from the captions in order against a folder of reference
    images, both centre-cropped and LANCZOS-resized, equals clean-fid's own `compute_fid` over the same images
    written to folders (a small TorchScript network stands in for the Inception weights, which are not shipped)."""
    import numpy as np
    from cleanfid import fid as cleanfid_fid
    from cleanfid.inception_torchscript import InceptionV3W
    from PIL import Image
    from test_fid import _FakeInception

    from dmd2 import fid
    from dmd2.sampling import fixed_noise, sample, to_uint8

    # a small project of its own (48 captioned images in EDM's dataset_tool layout): Inception features of every
    # image of both splits are computed, so MNIST's 5,000 would take minutes
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "00000").mkdir(parents=True)
    labels = []
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"00000/img{i:08d}.png")
        labels.append([f"00000/img{i:08d}.png", i % 4])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    text_project(tmp_path, "sd-tiny", data={"source": "image_folder", "path": str(folder), "heldout_fraction": 0.25,
                                            "caption_template": "a picture of kind {label}"})
    run(tmp_path, "prepare-data")
    run(tmp_path, "teacher")
    run(tmp_path, "distill")
    weights = tmp_path / "inception" / fid.INCEPTION_FILENAME
    weights.parent.mkdir()
    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(weights))
    reference = tmp_path / "coco" / "val"
    reference.mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 24), (30, 50), (32, 32), (64, 48)] * 3):  # not square: the crop matters
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(reference / f"{i:03d}.png")
    captions = [f"a handwritten digit {i % 10}" for i in range(9)]
    (tmp_path / "coco" / "captions.txt").write_text("\n".join(captions) + "\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["sd-tiny"]["eval"].update(
        # the student alone, and few FIDs: each takes a 2048 x 2048 matrix square root (seconds on 2 cores)
        fid_curve=False, teacher_steps=[], num_samples=12, batch_size=4,
        fid={"feature_extractor": "inception", "inception_weights": str(weights), "bootstrap": 0},
        coco={"captions": "coco/captions.txt", "images": "coco/val", "resolution": 16, "num_samples": 6,
              "patch_size": 20})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(tmp_path, "fid-reference")
    run(tmp_path, "evaluate")
    record = json.loads((tmp_path / "results/sd-tiny/evaluation.json").read_text())
    student_row = record["rows"][-1]
    assert student_row["model"] == "student" and student_row["coco_num_samples"] == 6 and record["coco_protocol"]
    run(tmp_path, "report")
    html = (tmp_path / "results/sd-tiny/report.html").read_text()
    assert "COCO protocol" in html and "Patch FID" in html

    # the same images through clean-fid's folder pipeline: batch b from seed b's noise, captions in order
    student = load_model(tmp_path / "models/sd-tiny/student")
    generated = tmp_path / "generated"
    generated.mkdir()
    renoise = torch.Generator().manual_seed(1)
    for b, start in enumerate(range(0, 6, 4)):
        prompts = captions[start : min(start + 4, 6)]
        images = to_uint8(sample(student, fixed_noise(len(prompts), student.family.sample_shape, b), prompts,
                                 generator=renoise))
        for j, image in enumerate(images):
            Image.fromarray(image.numpy().transpose(1, 2, 0)).save(generated / f"{start + j:03d}.png")

    def crop_lanczos(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = Image.fromarray(image[top : top + side, left : left + side])
        return np.asarray(square.resize((16, 16), Image.LANCZOS))

    def center_patch(image: np.ndarray) -> np.ndarray:  # patch FID: the centre 20 px, not resized
        h, w = image.shape[:2]
        top, left = (h - 20) // 2, (w - 20) // 2
        return np.ascontiguousarray(image[top : top + 20, left : left + 20])

    inception = InceptionV3W(str(weights.parent), download=False).eval()
    for key, transform in (("coco_fid", crop_lanczos), ("coco_patch_fid", center_patch)):
        expected = cleanfid_fid.compute_fid(
            str(generated), str(reference), mode="clean", num_workers=0, batch_size=4, device=torch.device("cpu"),
            custom_feat_extractor=inception, verbose=False, custom_image_tranform=transform)
        assert student_row[key] == pytest.approx(expected, rel=1e-3, abs=1e-3), key
    assert student_row["coco_patch_fid"] != student_row["coco_fid"]
