"""Tiny SD1.5/SDXL-shaped pipelines (built offline, loaded by stock diffusers) and the text-to-image pieces of the
diffusers family checked against diffusers' own pipelines: prompt encoding, the unconditional branch, latents."""

import pytest
import torch
from click.testing import CliRunner

from dmd2.cli import main
from dmd2.families.stable_diffusion import LatentCodec, PromptEncoder, pipeline_kind

pytestmark = pytest.mark.xdist_group("tiny_pipelines")

PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
    """(kind, directory, the stock diffusers pipeline loaded from it)."""
    from diffusers import DiffusionPipeline

    out = tmp_path_factory.mktemp("pipelines") / request.param
    result = CliRunner().invoke(main, ["tiny-pipeline", request.param, str(out), "--resolution", "16"])
    assert result.exit_code == 0, result.output
    return request.param, out, DiffusionPipeline.from_pretrained(out)


def test_a_tiny_pipeline_loads_in_stock_diffusers_and_generates(tiny):
    kind, path, pipe = tiny
    assert type(pipe).__name__ == PIPELINE_CLASS[kind] and pipeline_kind(path) == kind
    ids = pipe.tokenizer("a photo of a cat", padding="max_length").input_ids
    assert len(ids) == 77 and ids[:9] == [998, 320, 816, 531, 539, 320, 66, 536, 999]  # CLIP's BPE, cut to 1,000
    if kind == "sdxl":
        assert pipe.tokenizer_2("a cat", padding="max_length").input_ids[-1] == pipe.tokenizer_2.convert_tokens_to_ids("!")
    images = pipe("a photo of a cat", num_inference_steps=2, height=16, width=16, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_prompt_conditions_and_their_unconditional_branch_match_the_pipeline(tiny):
    kind, path, pipe = tiny
    prompts = ["a photo of a cat", "two dogs on a beach at sunset"]
    encoder = PromptEncoder.from_pipeline(path, resolution=(16, 16))
    cond = encoder(prompts)
    if kind == "sd15":
        embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
        assert torch.equal(cond["encoder_hidden_states"], embeds)
        # the empty prompt's encoding, for every prompt of the batch
        assert torch.equal(encoder.unconditional(cond)["encoder_hidden_states"], negative)
        return
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu")
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["added_cond_kwargs"]["text_embeds"], pooled)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), pooled.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond["added_cond_kwargs"]["time_ids"], time_ids.repeat(2, 1))
    uncond = encoder.unconditional(cond)  # zeros, as force_zeros_for_empty_prompt
    assert torch.equal(uncond["encoder_hidden_states"], negative)
    assert torch.equal(uncond["added_cond_kwargs"]["text_embeds"], negative_pooled)
    # the conditions drive the UNet exactly as the pipeline's own call does
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 999])
    ours = pipe.unet(latents, t, **cond).sample
    theirs = pipe.unet(latents, t, encoder_hidden_states=embeds,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.repeat(2, 1)}).sample
    assert torch.equal(ours, theirs)


def test_latents_round_trip_through_the_vae_with_its_scaling_factor(tiny):
    _, path, pipe = tiny
    codec = LatentCodec.from_pipeline(path)
    assert codec.latent_shape(16) == (4, 8, 8) and codec.scaling_factor == pipe.vae.config.scaling_factor
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = codec.encode(images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
    expected = posterior.sample(torch.Generator().manual_seed(0)) * pipe.vae.config.scaling_factor
    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(codec.decode(latents), expected, rtol=1e-4, atol=1e-5)


def test_a_lora_student_trains_only_its_adapter_and_loads_into_a_stock_pipeline(tiny, tmp_path):
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from dmd2.families.diffusers import add_lora
    from dmd2.families.stable_diffusion import save_lora

    kind, path, _ = tiny
    unet = add_lora(UNet2DConditionModel.from_pretrained(path, subfolder="unet"), rank=4, alpha=2)
    trainable = {name for name, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert any(".time_emb_proj.lora_A" in n for n in trainable) and any(".to_q.lora_B" in n for n in trainable)
    with torch.no_grad():  # stand in for training: move every adapter weight
        for name, p in unet.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    save_lora(path, unet, tmp_path / "lora")

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.load_lora_weights(tmp_path / "lora")
    cond = PromptEncoder.from_pipeline(path, resolution=(16, 16))(["a photo of a cat"])
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([999])
    with torch.no_grad():
        ours, theirs = unet(latents, t, **cond).sample, pipe.unet(latents, t, **cond).sample
        plain = UNet2DConditionModel.from_pretrained(path, subfolder="unet")(latents, t, **cond).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, ours)  # the adapter changed the output


def test_the_cli_offers_every_tiny_pipeline_kind():
    from dmd2.cli import tiny_pipeline as command
    from dmd2.tiny_pipelines import KINDS

    assert list(command.params[0].type.choices) == list(KINDS)
