"""The pieces of regression pre-training (`dmd2.regression`): each pair's noise, the LPIPS loss as the recipe builds
it, and the settings it refuses. The stage itself runs in tests/test_text_to_image.py and the DAG tests."""

import pytest
import torch
from torch import nn

from dmd2.config import ConfigError, LPIPSConfig, load_params
from dmd2.families import ModelError
from dmd2.paths import ExperimentPaths
from dmd2.regression import lpips_network, pair_noise, regression_timestep, run_regression
from dmd2.stage import StageContext


def test_a_pairs_noise_depends_on_the_seed_and_its_index_only():
    shape = (4, 8, 8)
    whole = pair_noise(3, range(10), shape)
    torch.testing.assert_close(pair_noise(3, [7, 2], shape), whole[[7, 2]], rtol=0, atol=0)  # any batch, any order
    assert not torch.equal(pair_noise(4, [2], shape), whole[[2]])
    assert abs(whole.mean().item()) < 0.15 and abs(whole.std().item() - 1) < 0.1  # unit Gaussian (640 draws)


def test_lpips_uses_average_pooling_and_a_reproducible_random_backbone_when_asked():
    cfg = LPIPSConfig(net="vgg", replace_pooling=True, pretrained_backbone=False)
    first, second = lpips_network(cfg), lpips_network(cfg)
    modules = list(first.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in modules)
    assert sum(isinstance(m, nn.AvgPool2d) for m in modules) == 4  # VGG-16's four pools before relu5_3
    assert not any(p.requires_grad for p in first.parameters())

    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert first(x, x).abs().max().item() == 0  # a distance: zero on identical images
    torch.testing.assert_close(first(x, y), second(x, y))  # the same random backbone every time (resumable runs)
    x.requires_grad_(True)
    first(x, y).sum().backward()
    assert x.grad.abs().sum() > 0  # the generator's side gets a gradient through the frozen network
    with_max_pooling = lpips_network(LPIPSConfig(net="vgg", replace_pooling=False, pretrained_backbone=False))
    assert not torch.allclose(with_max_pooling(x.detach(), y), first(x.detach(), y))


def test_missing_backbone_weights_are_named_with_the_command_that_fetches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"vgg16-397923af\.pth.*IMAGENET1K_V1.*regression\.loss: mse"):
        lpips_network(LPIPSConfig(net="vgg"))


def context(tmp_path, *overrides: str) -> StageContext:
    from conftest import REPO

    params = load_params(REPO / "params.yaml", ["regression.enabled=true", *overrides], "sdxl-tiny-1step")
    return StageContext(params, "sdxl-tiny-1step", ExperimentPaths("sdxl-tiny-1step", tmp_path))


def test_regression_trains_the_first_step_and_is_refused_for_lora_before_anything_is_touched(tmp_path):
    assert regression_timestep(context(tmp_path)) == 399
    assert regression_timestep(context(tmp_path, "distill.denoising_timesteps=[999, 499]")) == 999  # from pure noise
    earlier = tmp_path / "models/sdxl-tiny-1step/regression"
    earlier.mkdir(parents=True)
    (earlier / "model.safetensors").write_text("an earlier result")
    with pytest.raises(ConfigError, match="distill.lora"):
        run_regression(context(tmp_path, "distill.lora.enabled=true"))
    assert (earlier / "model.safetensors").read_text() == "an earlier result"

