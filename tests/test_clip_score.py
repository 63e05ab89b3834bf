"""CLIP score on a tiny, random-initialised open_clip model built offline from an in-memory config."""

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dmd2.clip_score import center_crop_resize, clip_score, clip_similarities, load_clip
from dmd2.config import CLIPConfig

pytestmark = pytest.mark.xdist_group("tiny_clip")

TINY = "dmd2-tiny-clip-test"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREFIX = "A photo depicts "


@pytest.fixture(scope="module")
def tiny_clip():
    open_clip.factory._MODEL_CONFIGS[TINY] = TINY_CFG
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=None)
    yield model.eval(), preprocess, open_clip.get_tokenizer(TINY)
    open_clip.factory._MODEL_CONFIGS.pop(TINY, None)


def images_and_prompts():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (3, 40, 24), dtype=np.uint8),  # portrait, RGB, C×H×W
              rng.integers(0, 256, (1, 16, 16), dtype=np.uint8),  # grey, like the mnist experiment
              rng.integers(0, 256, (3, 30, 50), dtype=np.uint8)]  # landscape
    return images, ["a red bicycle", "the digit seven", "two cats on a sofa"]


def hand_pil(image: np.ndarray) -> Image.Image:
    """Independent of the module: grey→RGB, square centre crop, LANCZOS to 256."""
    hwc = np.repeat(image, 3, axis=0).transpose(1, 2, 0) if image.shape[0] == 1 else image.transpose(1, 2, 0)
    h, w = hwc.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return Image.fromarray(np.ascontiguousarray(hwc[top : top + s, left : left + s])).resize((256, 256), Image.LANCZOS)


def test_score_is_mean_raw_cosine_with_prefix(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images, prompts = images_and_prompts()
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            img = model.encode_image(preprocess(hand_pil(image))[None]).double().numpy()[0]
            txt = model.encode_text(tokenizer([PREFIX + prompt])).double().numpy()[0]
            expected.append(img @ txt / (np.linalg.norm(img) * np.linalg.norm(txt)))
    per_pair = clip_similarities(model, preprocess, tokenizer, images, prompts, batch_size=2)
    np.testing.assert_allclose(per_pair, expected, rtol=1e-5, atol=1e-6)
    # no x100, no clamp: a random model gives small values of either sign, reported as they are
    assert clip_score(model, preprocess, tokenizer, images, prompts) == pytest.approx(np.mean(expected), abs=1e-6)
    assert np.abs(per_pair).max() <= 1.0


def test_prefix_is_really_inserted(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    images, prompts = images_and_prompts()
    seen = []

    def spy(texts):
        seen.extend(texts)
        return tokenizer(texts)

    with_prefix = clip_score(model, preprocess, spy, images, prompts)
    assert seen == [PREFIX + p for p in prompts]
    without = clip_score(model, preprocess, tokenizer, images, prompts, prefix="")
    assert with_prefix != pytest.approx(without, abs=1e-9)
    # the prefix lands right after the start-of-text token
    ids = tokenizer([PREFIX + prompts[0]])[0].tolist()
    prefix_ids = tokenizer([PREFIX.strip()])[0].tolist()
    n = prefix_ids.index(tokenizer.eot_token_id) - 1
    assert ids[: n + 1] == prefix_ids[: n + 1] and ids[0] == tokenizer.sot_token_id


def test_center_crop_resize_keeps_the_middle():
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle square
    out = center_crop_resize(image, 64)
    assert out.size == (64, 64) and np.asarray(out).min() > 200


def test_load_clip_from_local_weights(tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded, loaded_preprocess, loaded_tokenizer = load_clip(CLIPConfig(model=TINY, pretrained=str(path)))
    images, prompts = images_and_prompts()
    assert clip_score(loaded, loaded_preprocess, loaded_tokenizer, images, prompts) == pytest.approx(
        clip_score(model, preprocess, tokenizer, images, prompts), abs=1e-6)
