"""EDM formulas against hand-computed values."""

import math

import torch
from gmm import MixtureEDM

from dmd2.families.edm import edm_loss_weight, heun_nfe, heun_sample, karras_sigmas
from dmd2.families.edm_networks import Preconditioned, precondition, vp_sigma_to_t
from dmd2.families.edm_unet import UNet, UNetConfig


class Spy(torch.nn.Module):
    """Records what the preconditioning feeds the raw network; returns a constant F = 1."""

    def forward(self, x, c_noise, labels, features_only=False):
        self.x, self.c_noise = x, c_noise
        return torch.ones_like(x)


def test_preconditioning_coefficients():
    spy = Spy()
    d = Preconditioned(spy, "edm", sigma_data=0.5)
    x = torch.full((1, 1, 1, 1), 2.0)
    out = d(x, torch.tensor([1.0]))
    # σ = 1, σ_d = 0.5: c_skip = 0.25/1.25 = 0.2, c_out = 0.5/√1.25, c_in = 1/√1.25, c_noise = ln(1)/4 = 0
    assert math.isclose(out.item(), 0.2 * 2.0 + 0.5 / math.sqrt(1.25), rel_tol=1e-6)
    assert math.isclose(spy.x.item(), 2.0 / math.sqrt(1.25), rel_tol=1e-6)
    assert spy.c_noise.item() == 0.0


def test_vp_and_ve_preconditioning_coefficients():
    # VP (EDM's VPPrecond, beta_d 19.9, beta_min 0.1): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1), so at
    # t = 0.5: exp(2.4875 + 0.05) = 12.6482..., sigma = 3.4129...; c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2 + 1),
    # c_noise = 999 t = 499.5.
    sigma = torch.tensor([math.sqrt(math.exp(19.9 * 0.25 / 2 + 0.1 * 0.5) - 1)], dtype=torch.float64)
    assert math.isclose(vp_sigma_to_t(sigma).item(), 0.5, rel_tol=1e-12)
    c_skip, c_out, c_in, c_noise = precondition("vp", sigma, 0.5)
    assert c_skip.item() == 1 and math.isclose(c_out.item(), -sigma.item())
    assert math.isclose(c_in.item(), 1 / math.sqrt(sigma.item() ** 2 + 1)) and math.isclose(c_noise.item(), 499.5)
    # VE: c_skip 1, c_out sigma, c_in 1, c_noise ln(sigma / 2); at sigma = 2: c_noise = 0
    c_skip, c_out, c_in, c_noise = precondition("ve", torch.tensor([2.0]), 0.5)
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == (1.0, 2.0, 1.0, 0.0)


def test_karras_table_endpoints_and_adapter_indexing():
    s = karras_sigmas(1000)
    assert math.isclose(s[0].item(), 80.0, rel_tol=1e-9) and math.isclose(s[-1].item(), 0.002, rel_tol=1e-9)
    assert (s[:-1] > s[1:]).all()
    family = MixtureEDM()
    assert math.isclose(family.sigma(torch.tensor([999])).item(), 80.0, rel_tol=1e-6)
    assert math.isclose(family.sigma(torch.tensor([0])).item(), 0.002, rel_tol=1e-5)
    # the DM loss range 20…980 spans σ ≈ 0.0032 … 72 (method notes §2.2)
    assert 0.003 < family.sigma(torch.tensor([20])).item() < 0.0034
    assert 71.5 < family.sigma(torch.tensor([980])).item() < 72.5


def test_loss_weight_is_lambda_of_edm():
    assert math.isclose(edm_loss_weight(torch.tensor(0.5), 0.5).item(), 0.5 / 0.0625, rel_tol=1e-6)


def test_one_heun_step_is_one_denoiser_call_at_sigma_max():
    torch.manual_seed(0)
    net = Preconditioned(UNet(UNetConfig(channels=8, channel_mult=[1]), 1, 8, 0)).eval()
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        direct = net(noise * 80, torch.full((2,), 80.0), None)
    torch.testing.assert_close(heun_sample(lambda x, s: net(x, s, None), noise, 1), direct, rtol=1e-5, atol=1e-5)
    assert heun_nfe(1) == 1 and heun_nfe(18) == 35


def test_heun_is_a_second_order_solver_of_the_probability_flow_ode():
    # Data N(0, s²): the exact denoiser is x·s²/(s²+σ²), and the ODE scales x by √(s²+σ²)/√(s²+80²),
    # so noise·80 must end at noise·80·s/√(s²+80²). Heun's error shrinks ~4x per doubling of the steps.
    s = 0.5

    def exact_denoiser(x, sigma):
        sig = sigma.reshape(-1, 1, 1, 1).double()
        return (x.double() * s**2 / (s**2 + sig**2)).float()

    z = torch.ones(1, 1, 1, 1)
    exact = 80 * s / math.sqrt(s**2 + 80**2)
    errors = [abs(heun_sample(exact_denoiser, z, n).item() - exact) for n in (32, 64, 128)]
    assert errors[2] < 2e-3 * exact
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0, errors


def test_heun_hands_the_denoiser_sigmas_on_the_samples_device():
    """On a GPU the σ passed to the network must live beside the samples (the meta device stands in for one)."""
    devices = []

    def denoise(x, sigma):
        devices.append(sigma.device)
        return x

    heun_sample(denoise, torch.zeros(2, 1, 4, 4, device="meta"), 2)
    assert devices and all(d.type == "meta" for d in devices)
