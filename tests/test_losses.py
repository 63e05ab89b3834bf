"""The DMD2 losses and the families' formulas against hand-derived values, for both families."""

import math

import pytest
import torch
import torch.nn.functional as F
from gmm import MixtureDiffusers, MixtureEDM

from dmd2.families.base import uniform_timesteps_up_to
from dmd2.losses import (
    distribution_matching_loss,
    dm_step_range,
    gan_critic_loss,
    gan_generator_loss,
)


class Linear(torch.nn.Module):
    """σ-space: x̂0 = a·x_t + b."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sigma, cond=None, features_only=False):
        return self.a * x + self.b


class EpsLinear(torch.nn.Module):
    """ε-space: ε̂ = c·x_t + d, so x̂0 = (x_t − √(1−ᾱ)·ε̂) / √ᾱ."""

    def __init__(self, c: float, d: float):
        super().__init__()
        self.c, self.d = c, d

    def forward(self, x, t, class_labels=None):
        return self.c * x + self.d


def coefficients(family, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale of x0, scale of the noise) in x_t at t, from the family's own table."""
    if isinstance(family, MixtureEDM):
        return torch.ones(len(t), 1, 1, 1, dtype=torch.float64), family.sigma(t).double().reshape(-1, 1, 1, 1)
    abar = family.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return abar.sqrt(), (1 - abar).sqrt()


CASES = {
    # family, real net, fake net, x̂0 of each as a function of (x_t, a, s)
    "edm": (MixtureEDM, Linear(0.5, 0.0), Linear(0.3, 0.1), lambda x, a, s: 0.5 * x, lambda x, a, s: 0.3 * x + 0.1),
    "diffusers": (MixtureDiffusers, EpsLinear(0.5, 0.0), EpsLinear(0.3, 0.1),
                  lambda x, a, s: (x - s * 0.5 * x) / a, lambda x, a, s: (x - s * (0.3 * x + 0.1)) / a),
}


@pytest.mark.parametrize("name", CASES)
def test_dm_surrogate_gradient_is_normalised_score_difference(name):
    make, real, fake, real_x0, fake_x0 = CASES[name]
    family = make()
    torch.manual_seed(0)
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    t = torch.tensor([20, 500, 980])
    noise = torch.randn_like(x)

    loss, _ = distribution_matching_loss(family, real, fake, x, None, t, noise)
    loss.backward()

    a, s = coefficients(family, t)
    x_t = a * x.detach().double() + s * noise.double()
    pred_real, pred_fake = real_x0(x_t, a, s), fake_x0(x_t, a, s)
    w = (x.detach().double() - pred_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (pred_fake - pred_real) / (w * x.numel())
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-4, atol=1e-8)
    # and the monitored value is ½·mean(grad²)
    torch.testing.assert_close(loss.double(), 0.5 * ((pred_fake - pred_real) / w).pow(2).mean(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_dm_gradient_is_zero_when_critic_equals_teacher(name):
    make, real, _, _, _ = CASES[name]
    x = torch.randn(2, 1, 2, 2, requires_grad=True)
    loss, _ = distribution_matching_loss(make(), real, real, x, None, torch.tensor([100, 900]), torch.randn_like(x))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_a_sample_with_a_zero_normaliser_gets_no_gradient_and_leaves_the_others_alone():
    # x̂_real == x exactly makes w = 0 for the first sample (x = 0, the teacher predicts 0): no usable direction, so
    # its gradient is exactly zero, not the float-max that nan_to_num's defaults would give. The second sample
    # (x = 1, w = 1, the critic predicts 1) keeps its own: (x̂_fake − x̂_real)/w = 1, over N = 8 elements.
    x = torch.cat([torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)]).requires_grad_()
    loss, _ = distribution_matching_loss(MixtureEDM(), Linear(0.0, 0.0), Linear(0.0, 1.0), x, None,
                                         torch.tensor([500, 500]), torch.zeros_like(x))
    loss.backward()
    assert torch.equal(x.grad[0], torch.zeros(1, 2, 2))
    torch.testing.assert_close(x.grad[1], torch.full((1, 2, 2), 1 / 8))
    torch.testing.assert_close(loss, torch.tensor(0.25))  # ½·mean(grad²) = ½·(4·1 + 4·0)/8


def test_guidance_scale_extrapolates_the_conditional_prediction_in_both_families():
    class CondNet(torch.nn.Module):
        def forward(self, x, sigma, cond):
            return x * 0 + cond.sum(dim=1).reshape(-1, 1, 1, 1)  # x̂0 = 1 when conditioned, 0 unconditional

    edm = MixtureEDM()
    edm.config["label_dim"] = 2
    x = torch.zeros(2, 1, 1, 1)
    cond = edm.encode_conditions(torch.tensor([0, 1]), "cpu")
    out = edm.predict_x0(CondNet(), x, torch.tensor([10, 10]), cond, guidance_scale=3.0)
    assert torch.equal(out, torch.full_like(x, 3.0))  # 0 + 3·(1 − 0)

    class LabelEps(torch.nn.Module):
        def forward(self, x, t, class_labels):
            return x * 0 + (class_labels != 2).float().reshape(-1, 1, 1, 1)  # ε̂ = 1 conditioned, 0 for the null class

    vp = MixtureDiffusers()
    vp.config.update(num_classes=2, null_class=2)
    t = torch.tensor([500, 500])
    cond = vp.encode_conditions(torch.tensor([0, -1]), "cpu")  # −1: the unconditional branch
    assert cond["class_labels"].tolist() == [0, 2]
    a, s = coefficients(vp, t)
    x_t = torch.ones(2, 1, 1, 1)
    out = vp.predict_x0(LabelEps(), x_t, t, vp.encode_conditions(torch.tensor([0, 1]), "cpu"), guidance_scale=3.0)
    expected = (x_t / a) + 3.0 * ((x_t - s) / a - x_t / a)  # x̂_u + 3·(x̂_c − x̂_u)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_gan_losses_match_softplus_formulas():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert math.isclose(gan_generator_loss(fake).item(), (sp(-0.5) + sp(3.0)) / 2, rel_tol=1e-6)
    expected = (sp(0.5) + sp(-3.0)) / 2 + (sp(-2.0) + sp(1.0)) / 2
    assert math.isclose(gan_critic_loss(real, fake).item(), expected, rel_tol=1e-6)
    # the non-saturating generator loss is −log σ(ℓ)
    assert torch.allclose(gan_generator_loss(fake), -F.logsigmoid(fake).mean())


def test_dm_step_range_matches_original_defaults():
    assert dm_step_range(1000, 0.02, 0.98) == (20, 980)


def test_edm_fake_score_loss_is_edm_weighted_x0_regression():
    family = MixtureEDM()
    family.sigma_data = 0.5
    x0 = torch.ones(1, 1, 1, 1)
    loss = family.fake_score_loss(Linear(0.0, 0.0), x0, torch.tensor([999]), None, torch.zeros_like(x0))  # σ = 80
    weight = (80.0**2 + 0.25) / (80.0 * 0.5) ** 2
    assert math.isclose(loss.item(), weight * 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_fake_score_loss_is_unweighted_eps_or_v_mse(prediction_type):
    family = MixtureDiffusers(prediction_type)
    x0, noise = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([999, 250])
    loss = family.fake_score_loss(EpsLinear(0.0, 0.0), x0, t, None, noise)  # the network outputs 0
    a, s = coefficients(family, t)
    target = noise.double() if prediction_type == "epsilon" else a * noise.double() - s * x0.double()
    assert math.isclose(loss.item(), (target**2).mean().item(), rel_tol=1e-5)
    # the schedule is Stable Diffusion's: ᾱ_999 = 0.0047 (method notes §8)
    assert abs(family.alphas_cumprod[999].item() - 0.0047) < 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_x0_conversion_inverts_the_forward_process(prediction_type):
    """An oracle that outputs the true ε (or v) gets x0 back exactly, at every t (float64 conversion)."""
    family = MixtureDiffusers(prediction_type)
    x0, noise = torch.randn(1000, 2), torch.randn(1000, 2)
    t = torch.arange(1000)
    x_t = family.add_noise(x0, noise, t)
    target = family._target(x0, noise, t)

    class Oracle(torch.nn.Module):
        def forward(self, x, timestep, class_labels=None):
            return target

    torch.testing.assert_close(family.predict_x0(Oracle(), x_t, t, None), x0, rtol=0, atol=2e-4)


def test_weight_average_update_matches_the_formula_and_warms_up():
    from dmd2.training import ema_update_, warmed_up_decay

    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0): the first update nearly replaces
    assert warmed_up_decay(0.999, 90) == pytest.approx(91 / 100)
    assert warmed_up_decay(0.9, 10_000) == 0.9
    average = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    ema_update_(average, {"w": torch.tensor([3.0, -2.0]), "steps": torch.tensor(7)}, decay=0.75)
    assert torch.allclose(average["w"], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))
    assert average["steps"].item() == 7  # integers are copied, not averaged


def test_gradients_are_clipped_to_the_norm_over_all_trained_tensors_and_left_alone_below_it():
    from dmd2.training import clip_gradients

    a, b, frozen = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimizer = torch.optim.AdamW([a, b], lr=0.1)
    a.grad, b.grad, frozen.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]), torch.tensor([100.0, 0.0])
    assert clip_gradients(optimizer, 10.0) == pytest.approx(5.0)  # sqrt(3² + 4²); `frozen` is not trained
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0])) and torch.equal(b.grad, torch.tensor([0.0, 4.0]))
    assert clip_gradients(optimizer, 1.0) == pytest.approx(5.0)  # the norm before clipping
    torch.testing.assert_close(torch.cat([a.grad, b.grad]), torch.tensor([0.6, 0.0, 0.0, 0.8]), rtol=1e-5, atol=1e-6)
    assert torch.equal(frozen.grad, torch.tensor([100.0, 0.0]))


def test_the_critic_in_the_dm_loss_can_run_in_float32_under_bf16():
    """`fake_in_fp32` (the text-to-image recipes): the critic's call inside the DM loss sees autocast off and float32
    inputs, whatever the caller autocasts to; the teacher's call keeps the caller's precision."""
    seen = {}

    class Recording(Linear):
        def __init__(self, name: str):
            super().__init__(0.5, 0.0)
            self.name = name

        def forward(self, x, sigma, cond=None, features_only=False):
            seen[self.name] = (torch.is_autocast_enabled("cpu"), x.dtype)
            return super().forward(x, sigma)

    family, x = MixtureEDM(), torch.randn(2, 1, 4, 4)
    t, noise = torch.tensor([20, 900]), torch.randn_like(x)
    for fp32, expected in ((True, (False, torch.float32)), (False, (True, torch.float32))):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            distribution_matching_loss(family, Recording("real"), Recording("fake"), x, None, t, noise,
                                       fake_in_fp32=fp32)
        assert seen["fake"] == expected and seen["real"][0] is True


@pytest.mark.parametrize("channels, size, halvings", [(768, 8, 1), (1280, 32, 3)], ids=["imagenet-sd15", "sdxl"])
def test_the_gan_head_is_the_originals_stack(channels, size, halvings):
    """[conv 4×4 stride 2 → GroupNorm(32) → SiLU] down to 4×4, conv 4×4 stride 4 → GroupNorm(32) → SiLU, conv 1×1 to
    one logit: 8×8 features (ImageNet-64, SD1.5) take one halving, SDXL's 32×32 three."""
    from dmd2.critic import GANHead

    with torch.device("meta"):
        head = GANHead(channels, size)
    layers = list(head.layers)
    convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in layers if isinstance(m, torch.nn.GroupNorm)]
    assert [(c.kernel_size, c.stride) for c in convs] == [((4, 4), (2, 2))] * halvings + [((4, 4), (4, 4)), ((1, 1), (1, 1))]
    assert [n.num_groups for n in norms] == [32] * (halvings + 1) and convs[-1].out_channels == 1
    assert head(torch.zeros(2, channels, size, size, device="meta")).shape == (2,)


def test_a_narrow_gan_head_keeps_at_least_four_channels_per_group():
    """32 groups of one channel would normalise the head's 1×1 map to zero (a constant logit): narrow heads, such as
    the embedded experiments' 32-channel ones, take fewer groups, and their logits still depend on the input."""
    from dmd2.critic import GANHead

    torch.manual_seed(0)
    head = GANHead(32, 4)
    assert [m.num_groups for m in head.layers if isinstance(m, torch.nn.GroupNorm)] == [8]
    logits = head(torch.randn(8, 32, 4, 4))
    assert logits.std() > 1e-3


def test_timesteps_up_to_a_per_sample_bound():
    u = torch.tensor([0.0, 0.5, 0.999, 0.3, 0.7])
    high = torch.tensor([20, 39, 249, 980, 10])
    # low + ⌊u·(high − low + 1)⌋: 20, 20 + ⌊0.5·20⌋, 20 + ⌊0.999·230⌋, 20 + ⌊0.3·961⌋; a bound below low gives low
    assert uniform_timesteps_up_to(u, 20, high).tolist() == [20, 30, 249, 308, 20]
    draws = uniform_timesteps_up_to(torch.rand(20000, generator=torch.Generator().manual_seed(0)), 20,
                                    torch.full((20000,), 29))
    counts = torch.bincount(draws - 20, minlength=10)
    assert len(counts) == 10 and counts.min() > 1800  # all ten values, each about 2000 times


def test_token_features_get_a_token_head():
    """(L, D) features (a transformer's image tokens) get a head that normalises and maps each token, averages over
    tokens and gives one logit per sample; trained, it tells apart two token distributions that differ by a
    direction in feature space."""
    from dmd2.critic import GANHead, TokenGANHead, gan_head

    assert isinstance(gan_head((16, 4, 4)), GANHead) and isinstance(gan_head((64, 24)), TokenGANHead)
    torch.manual_seed(0)
    head = gan_head((64, 24))
    direction = torch.randn(24)
    real, fake = torch.randn(32, 64, 24) + 0.3 * direction, torch.randn(32, 64, 24) - 0.3 * direction
    assert head(real).shape == (32,)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(50):
        loss = gan_critic_loss(head(real), head(fake))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (head(real) > 0).all() and (head(fake) < 0).all()
