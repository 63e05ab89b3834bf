"""Text-to-image rectified flow through the real stages: tiny SD3- and Flux-shaped pipelines (CLIP and T5 encoders,
a 16-channel VAE with a shift factor, SD3's MM-DiT and Flux's packed transformer with embedded guidance) as
teachers, MNIST digits captioned by their class as the real data. The whole DAG of `sd3-tiny` and `flux-tiny`, and
their exports against `dmd2 generate`, run in tests/test_dag.py; here: the tokenizer, the latents' shift factor, a
LoRA student, and the published pipelines' sizes."""


import pytest
import torch
import yaml
from conftest import REPO
from test_text_to_image import SHRINK, assert_exported_pipeline_reproduces_generate
from tiny import run

from dmd2.families import load_model
from dmd2.families.stable_diffusion import LatentCodec
from dmd2.text import t5_tokenizer
from dmd2.tiny_pipelines import tiny_pipeline

KINDS = {"sd3-tiny": "sd3", "flux-tiny": "flux"}


def flow_project(root, experiment: str, **overrides) -> None:
    """A project whose params.yaml is the repository's with `experiment` shrunk, its teacher a tiny pipeline built
    into the project."""
    pipeline = root / "models" / experiment / "pipeline"
    tiny_pipeline(KINDS[experiment], pipeline, resolution=32)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    block = params[experiment]
    block["teacher"]["pretrained"] = str(pipeline)
    for stage, values in {**SHRINK, **overrides}.items():
        block[stage] = {**block.get(stage, {}), **values}
    params["experiment"] = experiment
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_tiny_t5_tokenizer_is_built_the_same_everywhere_and_spells_out_unknown_words():
    a, b = t5_tokenizer(), t5_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and len(a) == 1000
    ids = a("a photo of a zebra").input_ids
    assert ids[-1] == a.eos_token_id and a.unk_token_id not in ids  # every letter is a piece
    assert a.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁photo", "▁of"]
    assert a("x", padding="max_length", max_length=8).input_ids[2:] == [a.pad_token_id] * 6


@pytest.mark.parametrize("kind", list(KINDS.values()))
def test_latents_carry_the_vae_s_shift_factor(kind, tmp_path):
    from diffusers import AutoencoderKL

    path = tiny_pipeline(kind, tmp_path / kind)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    codec = LatentCodec.from_pipeline(path)
    assert codec.shift_factor == vae.config.shift_factor != 0 and codec.latent_shape(32) == (16, 16, 16)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = codec.encode(images, torch.Generator().manual_seed(0))
    expected = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(latents, (expected - vae.config.shift_factor) * vae.config.scaling_factor)
    # what the pipelines do before decoding: latents / scaling + shift
    torch.testing.assert_close(codec.decode(latents),
                               vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample)


@pytest.mark.slow
def test_a_lora_student_of_an_sd3_shaped_teacher_adapts_only_the_transformer_s_projections(tmp_path):
    """LoRA through peft on the transformer's attention and feed-forward projections: only the adapters train, the
    student ships fused, and the adapters alone on a stock copy of the teacher pipeline make the same images."""
    from diffusers import DiffusionPipeline, FlowMatchLCMScheduler
    from safetensors.torch import load_file

    from dmd2.export import student_call_arguments
    from dmd2.sampling import fixed_noise, sample_images, to_uint8

    flow_project(tmp_path, "sd3-tiny", distill={**SHRINK["distill"], "denoising_timesteps": [999],
                                                 "backward_simulation": False, "generator_lr": 1e-2,
                                                 "lora": {"enabled": True, "rank": 4, "alpha": 4.0}})
    for stage in ("prepare-data", "teacher", "distill"):
        run(tmp_path, stage)
    folder = tmp_path / "models" / "sd3-tiny" / "student"
    student, teacher = load_model(folder), load_model(tmp_path / "models" / "sd3-tiny" / "teacher")
    adapter = load_file(folder / "lora.safetensors")
    adapted = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter}
    assert adapted >= {"to_q", "to_k", "to_v", "add_q_proj", "to_add_out"} and "proj_out" not in adapted
    fused, base = student.net.state_dict(), teacher.net.state_dict()
    assert set(fused) == set(base)
    assert torch.equal(fused["proj_out.weight"], base["proj_out.weight"])  # the output layer: not adapted, frozen
    assert not torch.equal(fused["transformer_blocks.0.attn.to_q.weight"], base["transformer_blocks.0.attn.to_q.weight"])
    exported = tmp_path / "exported"
    prompts = ["a handwritten digit 4", "a handwritten digit 9"]
    assert_exported_pipeline_reproduces_generate(folder, exported, prompts, flow="sd3")
    pipe = DiffusionPipeline.from_pretrained(student.family.pipeline_path)
    pipe.scheduler = FlowMatchLCMScheduler.from_pretrained(exported, subfolder="scheduler")
    pipe.load_lora_weights(exported)
    theirs = pipe(prompts, latents=fixed_noise(2, student.family.sample_shape, 0), output_type="pt",
                  **student_call_arguments(exported)).images
    difference = (to_uint8(theirs * 2 - 1).int() - sample_images(student, 2, seed=0, raw_cond=prompts).int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.05


@pytest.mark.parametrize("experiment, transformer, t5", [("sd35", 8_056_627_520, "text_encoder_3"),
                                                          ("flux", 11_901_408_320, "text_encoder_2")])
def test_the_published_flow_pipelines_are_sized_from_their_configs_on_the_meta_device(experiment, transformer, t5):
    """`dmd2 memory` sizes SD3.5 Large and FLUX.1-dev from the configs in src/dmd2/architectures (no download): the
    transformers' and T5-XXL's parameter counts are the published models' (8.1 B, 11.9 B; 4.76 B)."""
    from pathlib import Path

    from dmd2.config import load_params
    from dmd2.families import family_for
    from dmd2.memory import teacher_config

    exp = load_params(REPO / "params.yaml", [], experiment).current(experiment)
    family = family_for(teacher_config(exp, Path("/nonexistent"), REPO))
    with torch.device("meta"):
        net = family.build_network()
    frozen = family.frozen_networks()
    assert sum(p.numel() for p in net.parameters()) == transformer
    assert sum(p.numel() for p in frozen[t5].parameters()) == 4_762_310_656
    assert family.sample_shape == (16, exp.data.resolution // 8, exp.data.resolution // 8)


@pytest.mark.integration
def test_a_sharded_run_with_the_early_exit_gan_head_matches_one_process(tmp_path):
    """The flow recipes' shape on 2 CPU processes: FSDP2 shards the transformer block by block, with gradient
    checkpointing, while the GAN head's features end the critic's forward inside it (`exit_after_block`); generator,
    critic and head all trained. The student lands where one process lands."""
    import shutil

    from safetensors.torch import load_file
    from test_distributed import PARAM_RTOL, distill_subprocess, fsdp

    distill = {**SHRINK["distill"], "denoising_timesteps": [999], "backward_simulation": False,
               "gradient_checkpointing": True}
    one = tmp_path / "one"
    flow_project(one, "sd3-tiny", distill=distill)
    for stage in ("prepare-data", "teacher", "distill"):
        run(one, stage)
    two = tmp_path / "two"
    shutil.copytree(one / "data", two / "data")
    flow_project(two, "sd3-tiny", distill=distill, launch=fsdp()["launch"])
    run(two, "teacher")
    distill_subprocess(two)

    def student(root):
        return load_file(root / "models/sd3-tiny/student/model.safetensors")

    a, b = student(one), student(two)
    difference = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)) / torch.sqrt(sum((a[k] ** 2).sum() for k in a))
    assert difference < PARAM_RTOL, f"sharded student differs from one process's by {difference:.2e}"
    teacher = load_model(one / "models/sd3-tiny/teacher").net.state_dict()
    assert any(not torch.equal(a[k], teacher[k]) for k in a)  # it trained
