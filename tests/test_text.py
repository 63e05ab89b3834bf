"""The CLIP tokenizer built offline from open_clip's BPE file: the same ids as CLIP's own tokenizer."""

import pytest

from dmd2.text import FULL_VOCAB_SIZE, clip_tokenizer

pytestmark = pytest.mark.xdist_group("tokenizer")

PROMPTS = ["a photo of a cat", "A photo of a Cat, 2024! naïve café 😀", "an astronaut riding a horse on the moon",
           "  spaces\tand\nnewlines  ", "x" * 300]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return clip_tokenizer(tmp_path_factory.mktemp("clip"))


def test_full_vocabulary_matches_open_clips_tokenizer(full):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-L-14")  # open_clip's own BPE implementation, same file
    assert len(full) == FULL_VOCAB_SIZE and full.model_max_length == 77
    assert full("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    for prompt in PROMPTS:
        ours = full(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        theirs = reference([prompt])[0].tolist()
        length = ours.index(49407) + 1
        assert ours[:length] == theirs[:length], prompt
        assert ours[length:] == [49407] * (77 - length)  # Stable Diffusion pads with the end token


def test_tiny_vocabulary_fits_a_tiny_text_model_and_round_trips(tmp_path):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tiny = clip_tokenizer(tmp_path / "tiny", vocab_size=1000)
    assert len(tiny) == 1000 and (tiny.bos_token_id, tiny.eos_token_id) == (998, 999)
    batch = tiny(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (len(PROMPTS), 77) and int(batch.input_ids.max()) < 1000

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                         num_hidden_layers=2, vocab_size=1000, bos_token_id=998, eos_token_id=999,
                                         pad_token_id=999))
    assert model(batch.input_ids).last_hidden_state.shape == (len(PROMPTS), 77, 8)

    tiny.save_pretrained(tmp_path / "saved")
    again = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    assert again(PROMPTS).input_ids == tiny(PROMPTS).input_ids


def test_a_vocabulary_too_small_for_the_byte_tokens_is_refused(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        clip_tokenizer(tmp_path, vocab_size=100)
