"""DMD2 end to end against an analytic teacher: the generator must learn the Gaussian mixture, in every family.

The teacher is the exact denoiser of a 2-D, 3-component mixture (tests/gmm.py): σ-space for the EDM family, the
exact ε-predictor under Stable Diffusion's DDPM schedule for the diffusers family, the exact velocity field on
SD3's shifted time table (shift 3) for the flow family. Generator and critic start as
that teacher (plus zero-initialised residual MLPs), so the 1-step generator starts collapsed on the data mean;
DMD2 has to spread it over the three modes with the right weights.

What is asserted, and why those numbers. A 1-step generator is a continuous map of a Gaussian, so the support of
its samples is connected: it always leaves a thin bridge of samples between the modes (10–20 % of them at these
training lengths, falling slowly with more iterations). Per-mode means and standard deviations of nearest-mode
assignments absorb those bridge samples, which made the earlier version of this test a coin flip across CPUs
(the third mode's mean missed its tolerance by 0.17 on one machine and passed on another). The test therefore
measures the whole distribution: the sliced Wasserstein-1 distance (SW) between 4,000 generated and 4,000 real
samples (64 fixed directions), plus the mode weights. Measured over seeds 0–5 with one thread (and seed 1 again
with two threads: bit-identical on the machine measured), at the iteration counts below:

    family     case                     iterations   SW, 6 seeds     max |weight error|   SW of the initial generator
    edm        1 step                   3000         0.148 – 0.253   0.054                1.19 (weights 0.50 off)
    edm        1 step + GAN             3000         0.155 – 0.287   0.052
    edm        4 steps, backsim         2500         0.114 – 0.221   0.077                0.58
    edm        2 steps, backsim + GAN   4000         0.189 – 0.255   0.049                0.68
    edm        4 steps, critic per step 2500         0.128 – 0.304   0.056 (each step's x0; 0.304: the test's own draw)
    diffusers  1 step (ε)               3000         0.142 – 0.228   0.046                1.10 (weights 0.40 off)
    diffusers  2 steps, backsim (ε)     2500         0.150 – 0.221   0.050                0.54
    diffusers  1 step, ε on ε̂ itself    3000         0.219 – 0.255   0.049                1.10
    flow       1 step, v on v̂ itself    3000         0.177 – 0.198   0.031                1.21 (weights 0.50 off)
    flow       2 steps, backsim         2500         0.222 – 0.288   0.043                0.75
    real versus real samples                         0.048

"ε on ε̂ itself" (`DirectEpsilon`) is the one-step ε case as an ε-UNet has it, on Stable Diffusion's schedule
(ᾱ_999 ≈ 0.0047): the trainable part is added to ε̂, so the generator's x0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ carries it ×14.6
(the other ε cases are preconditioned in x0). Its figures: seeds 0–5 after the trainer is built, one thread, and
seeds 0–2 again with two threads, bit-identical. In two dimensions the amplification costs little; on images it
is what keeps a one-step ε-student at t = 999 speckled (docs/tuning.md section 5). The flow cases put the
trainable part on v̂ itself as well (`DirectVelocity`): x0 = x_t − t·v̂ carries it at most ×1. Their figures:
seeds 0–5 after the trainer is built, one thread, and seed 1 again with two threads, bit-identical.

The 2-step + GAN case is slower, not broken: only half of its generator updates train the final step (backward
simulation picks k ∈ {0, 1}), and the GAN term adds variance to the mode weights; at 2500 iterations it spanned
SW 0.19–0.37 over the same seeds (weights up to 0.11 off), at 4000 it is in line with the others.
Tolerances: SW below 0.4 (1.4× the worst measured, below every initial generator) and every mode weight within
0.15 of the truth (2× the worst measured; the collapsed 1-step generators are 0.4–0.5 off).
"""

import pytest
import torch
from accelerate import Accelerator
from gmm import (
    AnalyticEpsilon,
    AnalyticTeacher,
    AnalyticVelocity,
    DirectEpsilon,
    DirectVelocity,
    GaussianMixture,
    MixtureDiffusers,
    MixtureEDM,
    MixtureFlow,
    ResidualDenoiser,
    ResidualEpsilon,
)
from torch import nn

from dmd2.config import DistillConfig
from dmd2.distill import Batch, DMD2Trainer

MIXTURE = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.3, 0.5, 0.4])
SW_TOL, WEIGHT_TOL = 0.4, 0.15


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, directions: int = 64) -> float:
    """Mean over fixed random directions of the 1-D Wasserstein-1 distance between the projections (equal n)."""
    theta = torch.randn(a.shape[1], directions, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    theta /= theta.norm(dim=0)
    pa, pb = (a.double() @ theta).sort(0).values, (b.double() @ theta).sort(0).values
    return (pa - pb).abs().mean().item()


def real_samples(seed: int = 99) -> torch.Tensor:
    return MIXTURE.sample(4000, torch.Generator().manual_seed(seed))[0]


def mode_weights(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(MIXTURE.assign(x), minlength=3).double() / len(x)


def assert_matches_mixture(x: torch.Tensor) -> None:
    distance = sliced_wasserstein(x, real_samples())
    weights = mode_weights(x)
    print(f"sliced Wasserstein {distance:.4f}, mode weights {[round(w, 3) for w in weights.tolist()]}")
    assert distance < SW_TOL, distance
    assert (weights - MIXTURE.weights).abs().max() < WEIGHT_TOL, weights


def make_trainer(family: str, timesteps: list[int], gan: bool, iters: int, accumulation: int = 1,
                 **settings) -> DMD2Trainer:
    torch.manual_seed(0)
    cfg = DistillConfig(steps=iters, batch_size=256, generator_lr=2e-3, critic_lr=2e-3, warmup_steps=20,
                        dfake_gen_update_ratio=5, denoising_timesteps=timesteps,
                        gan={"enabled": gan, "gen_weight": 0.05, "critic_weight": 0.1}, **settings)
    if family == "edm":
        fam, teacher = MixtureEDM(), AnalyticTeacher(MIXTURE)
        student, critic = ResidualDenoiser(MIXTURE), ResidualDenoiser(MIXTURE)
    elif family == "flow":  # velocity networks with their errors on v̂ itself, as a flow UNet's
        fam, teacher = MixtureFlow(), AnalyticVelocity(MIXTURE)
        student, critic = DirectVelocity(MIXTURE), DirectVelocity(MIXTURE)
    else:  # "diffusers": ε-networks preconditioned in x0; "diffusers-direct": errors on ε̂ itself, as a UNet's
        fam = MixtureDiffusers()
        network = DirectEpsilon if family == "diffusers-direct" else ResidualEpsilon
        teacher, student, critic = AnalyticEpsilon(MIXTURE, fam), network(MIXTURE, fam), network(MIXTURE, fam)
    head = nn.Sequential(nn.Linear(128, 64), nn.SiLU(), nn.Linear(64, 1), nn.Flatten(0)) if gan else None
    return DMD2Trainer(fam, teacher, student, critic, head, cfg, Accelerator(cpu=True), accumulation=accumulation)


def train(trainer: DMD2Trainer, iters: int, gan: bool) -> dict[str, float]:
    data = torch.Generator().manual_seed(1)
    for step in range(iters):
        batch = Batch(256, real=MIXTURE.sample(256, data)[0] if gan else None)
        metrics = trainer.train_step(step, batch)
    return metrics


@pytest.mark.parametrize("family,timesteps", [("edm", [999]), ("edm", [999, 499]), ("edm", [999, 749, 499, 249]),
                                             ("diffusers", [999]), ("diffusers", [999, 499]),
                                             ("diffusers-direct", [999]), ("flow", [999]), ("flow", [999, 499])])
def test_initial_generator_fails_the_tolerances(family, timesteps):
    trainer = make_trainer(family, timesteps, gan=False, iters=1)
    torch.manual_seed(123)
    with pytest.raises(AssertionError):
        assert_matches_mixture(trainer.sample(4000))


def test_the_two_families_start_from_the_same_teacher():
    """The ε-space test networks are the σ-space ones seen through the VP schedule: same x0 predictions."""
    edm, vp = MixtureEDM(), MixtureDiffusers()
    x0, noise = real_samples()[:512], torch.randn(512, 2)
    t = torch.randint(0, 1000, (512,))
    x_vp = vp.add_noise(x0, noise, t)
    x_edm, sigma, _, _ = vp.edm_view(x_vp, t)
    ours = vp.predict_x0(AnalyticEpsilon(MIXTURE, vp), x_vp, t, None)
    torch.testing.assert_close(ours, AnalyticTeacher(MIXTURE)(x_edm, sigma), rtol=1e-4, atol=1e-4)
    assert edm.num_train_timesteps == vp.num_train_timesteps == 1000


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,timesteps,gan,iters",
    [("edm", [999], False, 3000), ("edm", [999], True, 3000), ("edm", [999, 749, 499, 249], False, 2500),
     ("edm", [999, 499], True, 4000), ("diffusers", [999], False, 3000), ("diffusers", [999, 499], False, 2500),
     ("diffusers-direct", [999], False, 3000), ("flow", [999], False, 3000), ("flow", [999, 499], False, 2500)],
    ids=["1step", "1step-gan", "4step-backsim", "2step-backsim-gan", "eps-1step", "eps-2step-backsim",
         "eps-direct-1step", "flow-1step", "flow-2step-backsim"],
)
def test_dmd2_learns_the_mixture(family, timesteps, gan, iters):
    trainer = make_trainer(family, timesteps, gan, iters)
    metrics = train(trainer, iters, gan)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    torch.manual_seed(123)
    assert_matches_mixture(trainer.sample(4000))

    # The critic tracks the generator: on the generator's own samples it denoises at least as well as the
    # teacher (which models the data, not the generator).
    x = trainer.sample(4000)
    t = torch.randint(0, 1000, (len(x),))
    noise = torch.randn_like(x)
    critic_loss = trainer.family.fake_score_loss(trainer.critic_module.score, x, t, None, noise)
    teacher_loss = trainer.family.fake_score_loss(trainer.teacher, x, t, None, noise)
    assert critic_loss <= teacher_loss * 1.02, (critic_loss, teacher_loss)


@pytest.mark.slow
def test_a_critic_per_step_matches_each_steps_outputs_to_the_mixture():
    """distill.critic_per_step learns: with 4 steps and backward simulation, the x0 after every step, not only the
    last, within the tolerances. (In two dimensions one critic gets there too, its first step's x0 at SW 0.21–0.35
    over the same seeds; which critic judges which rows is tests/test_faults.py's test.)"""
    steps = [999, 749, 499, 249]
    trainer = make_trainer("edm", steps, gan=False, iters=2500, critic_per_step=True)
    train(trainer, 2500, gan=False)
    family, net = trainer.family, trainer.student_module
    torch.manual_seed(123)
    x_t = family.generator_input(torch.randn(4000, 2), torch.full((4000,), steps[0]))
    with torch.no_grad():
        for i, t in enumerate(steps):
            x0 = family.predict_x0(net, x_t, torch.full((4000,), t), None).float()
            assert_matches_mixture(x0)
            if i + 1 < len(steps):
                x_t = family.add_noise(x0, torch.randn_like(x0), torch.full((4000,), steps[i + 1]))


@pytest.mark.parametrize("below", [False, True])
def test_dm_noise_below_input_caps_the_later_steps_only(monkeypatch, below):
    """With distill.dm_noise_below_input, the DM loss of an output made from a noisy input at t_k (backward
    simulation's steps after the first) draws its noise in [min step, t_k]; the first step (pure noise in) keeps
    the full range. Off, every step draws from the full range (the original's)."""
    import dmd2.distill

    trainer = make_trainer("edm", [999, 749, 499, 249], gan=False, iters=100)
    trainer.cfg.dm_noise_below_input = below
    inputs, seen = [], []
    generator_input, dm_loss = trainer.generator_input, dmd2.distill.distribution_matching_loss

    def record_input(*args, **kwargs):
        x_t, t = generator_input(*args, **kwargs)
        inputs.append(int(t[0]))
        return x_t, t

    def record_dm(family, real_net, fake_net, x, cond, t, *args, **kwargs):
        seen.append((inputs[-1], t.clone()))
        return dm_loss(family, real_net, fake_net, x, cond, t, *args, **kwargs)

    monkeypatch.setattr(trainer, "generator_input", record_input)
    monkeypatch.setattr(dmd2.distill, "distribution_matching_loss", record_dm)
    train(trainer, 100, gan=False)  # 20 generator turns
    low, high = trainer.dm_range
    later = [(t_in, t) for t_in, t in seen if t_in != 999]
    first = [t for t_in, t in seen if t_in == 999]
    assert len({t_in for t_in, _ in later}) >= 2 and first
    assert all(t.min() >= low and t.max() <= high for _, t in seen)
    assert all(t.max() > 900 for t in first)  # the first step: the full range either way
    if below:
        assert all(t.max() <= t_in for t_in, t in later)
        assert all(t.max() > t_in - 60 for t_in, t in later)  # up to its input's level, not far below
    else:
        assert all(t.max() > t_in for t_in, t in later)


@pytest.mark.parametrize("critic_per_step", [False, True])
def test_micro_batches_train_as_the_whole_batch(critic_per_step):
    """launch.micro_batch: each batch of 256 cut into 4 micro-batches of 64, whose gradients add up before each
    optimiser step, trains as the whole batch at once (the DM loss, the critic, the GAN head and 2-step backward
    simulation all on; and with a critic per step, whose rows follow the global batch): the same parameters and
    figures up to float summation order after 31 iterations (the last a generator turn)."""
    runs = {}
    for accumulation in (1, 4):
        trainer = make_trainer("edm", [999, 499], gan=True, iters=31, accumulation=accumulation,
                               critic_per_step=critic_per_step)
        sizes = []
        trainer.generator.register_forward_pre_hook(lambda module, args, sizes=sizes: sizes.append(len(args[0])))
        metrics = train(trainer, 31, gan=True)
        assert set(sizes) == {256 // accumulation}  # every generator pass saw one micro-batch
        runs[accumulation] = (trainer, metrics)
    (whole, m1), (cut, m4) = runs[1], runs[4]
    for a, b in [(whole.generator, cut.generator), (whole.critic_module, cut.critic_module)]:
        pa, pb = torch.cat([p.flatten() for p in a.parameters()]), torch.cat([p.flatten() for p in b.parameters()])
        difference = ((pa - pb).norm() / pa.norm()).item()
        print(f"relative parameter difference {difference:.2e}")
        assert 0 <= difference < 1e-5
    for key in ("grad_norm_generator", "grad_norm_critic", "loss_dm", "loss_fake", "loss_gan_critic"):
        assert m4[key] == pytest.approx(m1[key], rel=1e-4), key

