"""The DMD2 losses against hand-derived values."""

import math

import torch
import torch.nn.functional as F

from dmd2.adapters import EDMAdapter
from dmd2.losses import distribution_matching_loss, dm_step_range, gan_critic_loss, gan_generator_loss


class Linear(torch.nn.Module):
    """x0̂ = a·x_t + b: simple enough to compute the DM gradient by hand."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, sigma, cond=None, return_bottleneck=False):
        return self.a * x + self.b


def test_dm_surrogate_gradient_is_normalised_score_difference():
    torch.manual_seed(0)
    adapter = EDMAdapter()
    x = torch.randn(3, 1, 4, 4, requires_grad=True)
    t = torch.tensor([20, 500, 980])
    noise = torch.randn_like(x)
    real, fake = Linear(0.5, 0.0), Linear(0.3, 0.1)

    loss, _ = distribution_matching_loss(adapter, real, fake, x, None, t, noise)
    loss.backward()

    x_t = x.detach() + adapter.sigma(t).reshape(-1, 1, 1, 1) * noise
    pred_real, pred_fake = 0.5 * x_t, 0.3 * x_t + 0.1
    w = (x.detach() - pred_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (pred_fake - pred_real) / (w * x.numel())
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-8)
    # and the monitored value is ½·mean(grad²)
    torch.testing.assert_close(loss, 0.5 * ((pred_fake - pred_real) / w).pow(2).mean(), rtol=1e-5, atol=0)


def test_dm_gradient_is_zero_when_critic_equals_teacher_and_finite_when_degenerate():
    adapter = EDMAdapter()
    x = torch.randn(2, 1, 2, 2, requires_grad=True)
    t = torch.tensor([100, 900])
    loss, _ = distribution_matching_loss(adapter, Linear(0.5, 0), Linear(0.5, 0), x, None, t, torch.randn_like(x))
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # x̂_real == x exactly makes w = 0; the 0/0 is turned into a finite number instead of NaN
    z = torch.zeros(1, 1, 2, 2, requires_grad=True)
    loss, _ = distribution_matching_loss(adapter, Linear(0.0, 0), Linear(0.0, 1.0), z, None, torch.tensor([500]),
                                         torch.zeros_like(z))
    assert torch.isfinite(loss)


def test_guidance_scale_extrapolates_conditional_prediction():
    adapter = EDMAdapter(label_dim=2)

    class CondNet(torch.nn.Module):
        def forward(self, x, sigma, cond, return_bottleneck=False):
            return x * 0 + cond.sum(dim=1).reshape(-1, 1, 1, 1)  # 1 when conditioned, 0 unconditional

    x = torch.zeros(2, 1, 1, 1)
    cond = adapter.encode_conditions(torch.tensor([0, 1]))
    out = adapter.predict_x0(CondNet(), x, torch.tensor([10, 10]), cond, guidance_scale=3.0)
    assert torch.equal(out, torch.full_like(x, 3.0))  # 0 + 3·(1 − 0)


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


def test_fake_score_loss_is_edm_weighted_x0_regression():
    adapter = EDMAdapter(sigma_data=0.5)
    x0 = torch.ones(1, 1, 1, 1)
    t = torch.tensor([999])  # σ = 80
    loss = adapter.fake_score_loss(Linear(0.0, 0.0), x0, t, None, torch.zeros_like(x0))
    sigma = 80.0
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert math.isclose(loss.item(), weight * 1.0, rel_tol=1e-5)
