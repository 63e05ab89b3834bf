"""The rectified-flow family's formulas, against hand-derived values and diffusers' own flow scheduler."""

import math

import pytest
import torch
from gmm import AnalyticVelocity, GaussianMixture, MixtureEDM, MixtureFlow
from test_dmd2_gmm import sliced_wasserstein

from dmd2.families.base import logit_normal
from dmd2.families.flow import FlowFamily, FlowTeacherConfig, resolution_shift, shift_times

MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.3, 0.5, 0.4])
TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D"] * 2,
             "up_block_types": ["UpBlock2D"] * 2, "norm_num_groups": 4}


def test_the_time_table_is_diffusers_flow_training_table():
    """Index i names t_i = shift((i + 1)/1000): FlowMatchEulerDiscreteScheduler's training sigmas, low to high."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        ours = MixtureFlow(shift).times
        theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas.double().flip(0)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
        assert ours[-1] == 1.0  # the generator's t = 999 is pure noise
    # by hand: shift 3 at s = 1/2 is 3·0.5/(1 + 2·0.5) = 0.75
    assert shift_times(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_the_resolution_dependent_shift_is_flux_s():
    """m = exp(μ), μ linear in the token count: Flux's `calculate_shift` (0.5 at 256 tokens, 1.15 at 4096)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    anchors = {"base_shift": 0.5, "max_shift": 1.15, "base_seq_len": 256, "max_seq_len": 4096}
    for tokens in (64, 256, 1024, 4096):
        assert resolution_shift(tokens, anchors) == pytest.approx(math.exp(calculate_shift(tokens)), rel=1e-12)
    assert resolution_shift(256, anchors) == pytest.approx(math.exp(0.5))
    # a 64×64 latent in 2×2 patches: 1024 tokens, so the family's shift (and the sampler's μ) come from that count
    cfg = FlowTeacherConfig(unet=TINY_UNET, schedule={"resolution_shift": anchors})
    family = FlowFamily(FlowFamily.teacher_config(cfg, (4, 64, 64), 0))
    assert family.shift == pytest.approx(math.exp(calculate_shift(1024)))
    sampler = family.scheduler(4)
    assert sampler.sigmas[0] == 1.0 and sampler.sigmas[-1] == 0.0
    # the sigmas FluxPipeline sets for 4 steps at 1024 tokens: linspace(1, 1/4, 4) shifted with μ = calculate_shift
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    flux.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=calculate_shift(1024))
    torch.testing.assert_close(sampler.sigmas, flux.sigmas, rtol=1e-6, atol=1e-7)


def test_noising_and_the_x0_conversion_by_hand():
    """x_t = (1 − t)x0 + tε and x0 = x_t − t·v̂: the true velocity ε − x0 gives back x0, and the flow loss of
    the true velocity is zero."""
    family = MixtureFlow(1.0)
    x0, noise = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    t = torch.tensor([499])  # t = 0.5 without a shift
    assert family.time(t).item() == 0.5
    torch.testing.assert_close(family.add_noise(x0, noise, t), torch.tensor([[0.75, -0.875]]))

    class TrueVelocity(torch.nn.Module):
        def forward(self, x_t, timestep, class_labels=None):
            assert timestep.item() == pytest.approx(500.0)  # the network takes 1000·t
            return noise - x0

    torch.testing.assert_close(family.denoise(TrueVelocity(), family.add_noise(x0, noise, t), t, None), x0)
    assert family.fake_score_loss(TrueVelocity(), x0, t, None, noise).item() == 0.0
    assert torch.equal(family.generator_input(noise, torch.tensor([999])), noise)


def test_the_exact_velocity_field_denoises_as_the_mixture_posterior():
    """v = (x_t − E[x0 | x_t]) / t: the family's x0 of the analytic velocity is the σ-space posterior mean at
    σ = t/(1 − t) of x_t/(1 − t)."""
    family, velocity = MixtureFlow(), AnalyticVelocity(MIXTURE)
    x0 = MIXTURE.sample(256, torch.Generator().manual_seed(0))[0]
    t = torch.randint(0, 999, (256,), generator=torch.Generator().manual_seed(1))
    x_t = family.add_noise(x0, torch.randn(256, 2, generator=torch.Generator().manual_seed(2)), t)
    time = family.time(t).reshape(-1, 1)
    expected = MIXTURE.denoise((x_t.double() / (1 - time)).float(), (time / (1 - time)).flatten().float())
    torch.testing.assert_close(family.predict_x0(velocity, x_t, t, None), expected, rtol=1e-4, atol=1e-4)


def test_the_teacher_sampler_draws_the_mixture_from_its_exact_velocity():
    """diffusers' flow Euler scheduler on the exact field: 50 steps land on the mixture (sliced Wasserstein 0.050,
    where real-versus-real samples give 0.048 at 4,000 points; 10 steps: 0.128); one step gives the mean."""
    family, velocity = MixtureFlow(), AnalyticVelocity(MIXTURE)
    noise = torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))
    real = MIXTURE.sample(4000, torch.Generator().manual_seed(99))[0]
    assert sliced_wasserstein(family.sample_teacher(velocity, noise, None, 50), real) < 0.08
    one = family.sample_teacher(velocity, noise, None, 1)
    torch.testing.assert_close(one, (MIXTURE.weights @ MIXTURE.means).float().expand(4000, 2), rtol=0, atol=1e-4)
    assert family.teacher_nfe(50) == 50


@pytest.mark.parametrize("family", [MixtureFlow(1.0), MixtureEDM()], ids=["flow", "edm"])
def test_the_critic_draws_its_times_uniformly_or_logit_normally(family):
    """distill.critic_times, any family: uniform over the table by default; logit-normal(0, 1) puts
    P(|logit s| < logit 0.75) = 0.728 of the draws in the middle half of the table (uniform: 0.5); logit-normal(1, 1)
    P(s > 1/2) = Φ(1) = 0.841 in its upper half."""
    from dmd2.training import GlobalBatchRandom

    torch.manual_seed(0)
    uniform = family.critic_timesteps(20000, GlobalBatchRandom(), "cpu")
    shaped = family.critic_timesteps(20000, GlobalBatchRandom(), "cpu", "logit_normal", (0.0, 1.0))
    noisier = family.critic_timesteps(20000, GlobalBatchRandom(), "cpu", "logit_normal", (1.0, 1.0))
    for drawn, middle in ((uniform, 0.5), (shaped, 0.728)):
        assert drawn.min() >= 0 and drawn.max() <= 999
        assert ((drawn >= 250) & (drawn < 750)).double().mean().item() == pytest.approx(middle, abs=0.015)
    assert (noisier >= 500).double().mean().item() == pytest.approx(0.841, abs=0.015)
    assert logit_normal(torch.tensor([0.5]), 0.0, 1.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize("family", [MixtureFlow(1.0), MixtureEDM()], ids=["flow", "edm"])
def test_the_dm_loss_draws_its_noise_uniformly_or_logit_normally_within_its_range(family):
    """distill.dm_times, any family: uniform over {20 … 980} by default; logit-normal(0, 1) over the same range puts
    0.728 of the draws in its middle half (P(|z| < logit 0.75 = 1.0986) = 0.728; uniform: 0.5) and about 0.8 % below
    index 100 (P(s < 80/961) = Φ(logit 0.0832) = Φ(−2.40) = 0.0082; uniform: 8.3 %); with a per-sample cap
    (dm_noise_below_input) the same fractions of {20 … cap}."""
    from dmd2.training import GlobalBatchRandom

    torch.manual_seed(0)
    uniform = family.dm_timesteps(20000, GlobalBatchRandom(), "cpu", 20, 980)
    shaped = family.dm_timesteps(20000, GlobalBatchRandom(), "cpu", 20, 980, None, "logit_normal", (0.0, 1.0))
    capped = family.dm_timesteps(20000, GlobalBatchRandom(), "cpu", 20, 980, torch.full((20000,), 499),
                                 "logit_normal", (0.0, 1.0))
    for drawn, middle, low in ((uniform, 0.5, 0.083), (shaped, 0.728, 0.0082)):
        assert drawn.min() >= 20 and drawn.max() <= 980
        assert ((drawn >= 260) & (drawn < 740)).double().mean().item() == pytest.approx(middle, abs=0.015)
        assert (drawn < 100).double().mean().item() == pytest.approx(low, abs=0.006)
    assert capped.min() >= 20 and capped.max() <= 499
    assert ((capped >= 140) & (capped < 380)).double().mean().item() == pytest.approx(0.728, abs=0.015)
    torch.manual_seed(1)  # the default draws exactly what it drew before dm_times existed: old runs repeat
    before = GlobalBatchRandom().randint(20, 981, 64, "cpu")
    torch.manual_seed(1)
    assert torch.equal(family.dm_timesteps(64, GlobalBatchRandom(), "cpu", 20, 980), before)


def test_the_critic_turn_draws_what_distill_critic_times_says():
    """The setting reaches the critic's loss: with logit-normal(3, 0.5) nearly every timestep the critic trains at is
    in the table's top tenth (P(s > 0.9) = Φ((3 − ln 9)/0.5) = Φ(1.61) = 0.946; uniform: 0.1)."""
    from gmm import DirectVelocity
    from test_dmd2_gmm import MIXTURE as MODES

    from dmd2.critic import Critic
    from dmd2.training import GlobalBatchRandom

    family, seen = MixtureFlow(1.0), []
    score = DirectVelocity(MODES)
    score.register_forward_pre_hook(lambda module, args: seen.append(args[1] / 1000))
    torch.manual_seed(0)
    Critic(family, score, None, 1000, GlobalBatchRandom(), "logit_normal", (3.0, 0.5))(torch.randn(4000, 2), None)
    assert (seen[0] > 0.9).double().mean().item() == pytest.approx(0.946, abs=0.015)


TINY_TRANSFORMER = {"unet_class": "SD3Transformer2DModel",
                    "transformer": {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8}}


def test_the_transformer_s_gan_features_are_its_middle_block_s_image_tokens():
    """SD3's MM-DiT (class labels one-hot as its pooled and context inputs): the GAN head reads the image tokens
    block 1 of 4 returns, as a full forward computes them, and blocks 2 and 3 never run for it."""
    cfg = FlowTeacherConfig(**TINY_TRANSFORMER)
    family = FlowFamily(FlowFamily.teacher_config(cfg, (1, 16, 16), 10))
    torch.manual_seed(0)
    net = family.build_network()
    calls, seen = [], {}

    def record(i, out):  # returns None: the block's output stays what it was
        calls.append(i)
        seen.setdefault(i, out[1])

    for i, block in enumerate(net.transformer_blocks):
        block.register_forward_hook(lambda module, args, out, i=i: record(i, out))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 990])
    cond = family.encode_conditions(torch.tensor([1, 2, -1]), "cpu")
    family.predict_x0(net, x, t, cond)
    assert calls == [0, 1, 2, 3] and family.gan_block == 1
    calls.clear()
    features = family.gan_features(net, x, t, cond)
    assert calls == [0, 1] and features.shape == (3, *family.gan_feature_shape) == (3, 64, 16)
    torch.testing.assert_close(features, seen[1])
    assert len(net.transformer_blocks[1]._forward_hooks) == 1  # the early exit's hook is gone again


@pytest.mark.slow
@pytest.mark.parametrize("network", ["unet", "transformer"])
def test_the_mnist_flow_experiment_runs_every_stage(tmp_path, network):
    """`mnist-flow` at tiny size, with a UNet or an SD3-style transformer: a flow teacher trained here on the digits,
    distilled with the GAN head on the UNet's mid-block maps or the transformer's middle tokens, evaluated against
    its own Euler sampler."""
    import json

    from tiny import run, write_tiny_params

    write_tiny_params(tmp_path, "mnist-flow", **({"teacher": TINY_TRANSFORMER} if network == "transformer" else {}))
    for stage in ("prepare-data", "teacher", "distill", "fid-reference", "evaluate"):
        run(tmp_path, stage)
    teacher = json.loads((tmp_path / "models/mnist-flow/teacher/config.json").read_text())
    assert teacher["family"] == "flow" and teacher["schedule"]["teacher_times"] == "logit_normal"
    evaluation = json.loads((tmp_path / "results/mnist-flow/evaluation.json").read_text())
    assert evaluation["family"] == "flow"
    assert [r["setting"] for r in evaluation["rows"]] == ["1 Euler step", "3 Euler steps", "1-step generator (t = 999)"]
    log = [json.loads(line) for line in (tmp_path / "models/mnist-flow/student/metrics.jsonl").read_text().splitlines()]
    assert any("loss_gan_critic" in record for record in log)
