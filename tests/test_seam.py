"""The family seam, tested by its promise: a family defined in this file alone, registered here, runs every stage.

`ToyFamily` is a small σ-space denoiser (variance exploding, Euler sampler, its own network and config schema) that
no file of the package knows. If a stage or tool still reached past the `Family` interface (a family name, a
family's module, a key only some family's config has), this test would fail there.
"""

import json
import math
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from conftest import REPO
from pydantic import Field
from tiny import TINY, merge, run
from torch import nn

from dmd2.config import Strict, TeacherTraining, to_dict
from dmd2.families import FAMILIES, Family

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.01, 20.0, 0.5


class ToySampler(Strict):
    num_steps: int = Field(8, ge=1, description="Euler steps of the teacher's sampler")


class ToyTeacherConfig(TeacherTraining):
    family: Literal["toy"] = "toy"
    width: int = Field(8, ge=2)
    sampler: ToySampler = Field(default_factory=ToySampler)


class ToyNet(nn.Module):
    """conv → (stride-2 conv: the GAN's features) → transposed conv, with ln σ and the label added as embeddings."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.inp, self.down = nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, width, 4, 2, 1)
        self.up, self.out = nn.ConvTranspose2d(width, width, 4, 2, 1), nn.Conv2d(width, channels, 3, padding=1)
        self.noise = nn.Linear(1, width)
        self.label = nn.Embedding(num_classes + 1, width) if num_classes else None  # the last: no label

    def forward(self, x, sigma, labels=None, features_only=False):
        emb = self.noise(sigma.log().reshape(-1, 1) / 4)
        if self.label is not None:
            emb = emb + self.label(labels)
        c_in = 1 / (sigma**2 + SIGMA_DATA**2).sqrt().reshape(-1, 1, 1, 1)
        h = torch.nn.functional.silu(self.inp(x * c_in) + emb[:, :, None, None])
        features = torch.nn.functional.silu(self.down(h))
        if features_only:
            return features
        return self.out(torch.nn.functional.silu(self.up(features) + h))


class ToyFamily(Family):
    schema = ToyTeacherConfig
    name, sampler_name = "toy", "Euler"

    @staticmethod
    def teacher_config(cfg, sample_shape, num_classes):
        return {"family": "toy", "kind": "teacher", "shape": list(sample_shape), "num_classes": num_classes,
                "width": cfg.width, "sampler": to_dict(cfg.sampler), "label_dropout": cfg.label_dropout}

    def __init__(self, config):
        super().__init__(config)
        ramp = torch.linspace(0, 1, self.num_train_timesteps, dtype=torch.float64)
        self.sigmas = (math.log(SIGMA_MIN) + ramp * math.log(SIGMA_MAX / SIGMA_MIN)).exp().float()

    def build_network(self):
        return ToyNet(self.sample_shape[0], self.config["width"], self.num_classes)

    def enable_gradient_checkpointing(self, net):
        return None

    @property
    def sample_shape(self):
        return tuple(self.config["shape"])

    def encode_conditions(self, raw, device):
        if raw is None or not self.num_classes:
            return None
        return torch.where(raw < 0, self.num_classes, raw).long().to(device)

    def unconditional(self, cond):
        return torch.full_like(cond, self.num_classes)

    @property
    def has_unconditional_branch(self):
        return self.config["label_dropout"] > 0

    @property
    def num_train_timesteps(self):
        return 1000

    def sigma(self, t):
        return self.sigmas.to(t.device)[t.long()]

    def add_noise(self, x0, noise, t):
        ToyFamily.noised_at.update(t.tolist())
        return x0 + self.sigma(t).reshape(-1, 1, 1, 1) * noise

    # The loop's time draws are the family's: this one draws each at one timestep of its own, so the test can see
    # that the DM loss and the GAN noise at theirs (add_noise) and the critic's loss at its own (fake_score_loss).
    noised_at: set[int] = set()
    critic_at: set[int] = set()

    def dm_timesteps(self, n, draw, device, low, high, cap=None, times="uniform", logit=(0.0, 1.0)):
        return torch.full((n,), 500, device=device)

    def gan_timesteps(self, n, draw, device, high):
        return torch.full((n,), 7, device=device)

    def critic_timesteps(self, n, draw, device, times="uniform", logit=(0.0, 1.0)):
        return torch.full((n,), 300, device=device)

    def generator_input(self, noise, t):
        return self.sigma(t).reshape(-1, 1, 1, 1) * noise

    def _x0(self, net, x, sigma, cond):
        """EDM-style skip: x0 = c_skip·x + c_out·F(x)."""
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        c_skip, c_out = SIGMA_DATA**2 / (s2 + SIGMA_DATA**2), s2.sqrt() * SIGMA_DATA / (s2 + SIGMA_DATA**2).sqrt()
        return (c_skip * x + c_out * net(x, sigma, cond)).float()

    def denoise(self, net, x_t, t, cond):
        return self._x0(net, x_t, self.sigma(t), cond)

    def _loss(self, net, x0, sigma, cond, noise):
        weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
        pred = self._x0(net, x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma, cond)
        return (weight.reshape(-1, 1, 1, 1) * (pred - x0.float()) ** 2).mean()

    def fake_score_loss(self, net, x0, t, cond, noise):
        ToyFamily.critic_at.update(t.tolist())
        return self._loss(net, x0, self.sigma(t), cond, noise)

    def gan_features(self, net, x_t, t, cond):
        return net(x_t, self.sigma(t), cond, features_only=True)

    @property
    def gan_feature_shape(self):
        return (self.config["width"], self.sample_shape[1] // 2, self.sample_shape[2] // 2)

    def teacher_loss(self, net, x0, cond):
        sigma = (torch.randn(len(x0)) * 1.2 - 1.2).exp().to(x0.device)
        return self._loss(net, x0, sigma, cond, torch.randn_like(x0))

    @torch.no_grad()
    def sample_teacher(self, net, noise, cond, num_steps, guidance_scale=1.0):
        sigmas = torch.cat([self.sigmas.flip(0)[torch.linspace(0, 999, num_steps).long()], torch.zeros(1)])
        x = noise * sigmas[0]
        for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            sigma = s.expand(len(x)).to(x.device)
            x0 = self.guided(lambda c: self._x0(net, x, sigma, c), cond, guidance_scale)  # noqa: B023
            x = x + (s_next - s) * (x - x0) / s
        return x

    def teacher_nfe(self, num_steps):
        return num_steps


@pytest.mark.slow
def test_a_family_defined_outside_the_package_runs_every_stage(tmp_path, monkeypatch):
    """Registered from here, `family: toy` goes through prepare-data → teacher → distill (with the GAN head on its
    features, and the DM, critic and GAN times drawn by the family) → fid-reference → evaluate → report; nothing in
    src/dmd2 names it."""
    assert "toy" not in FAMILIES
    monkeypatch.setitem(FAMILIES, "toy", ToyFamily)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    block = merge(params["mnist"], TINY)
    block["teacher"] = {"family": "toy", **{k: v for k, v in TINY["teacher"].items()}, "width": 8}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"experiment": "toy", "toy": block}, sort_keys=False))

    for stage in ("prepare-data", "teacher", "distill", "fid-reference", "evaluate", "report"):
        ToyFamily.noised_at.clear()
        ToyFamily.critic_at.clear()
        run(tmp_path, stage)
        if stage == "distill":  # one step from noise: nothing else is noised
            assert ToyFamily.noised_at == {500, 7} and ToyFamily.critic_at == {300}

    student = json.loads((tmp_path / "models/toy/student/config.json").read_text())
    assert student["family"] == "toy" and student["kind"] == "student"
    evaluation = json.loads((tmp_path / "results/toy/evaluation.json").read_text())
    assert evaluation["family"] == "toy"
    assert [r["setting"] for r in evaluation["rows"]] == ["1 Euler step", "3 Euler steps", "1-step generator (t = 999)"]
    assert all(math.isfinite(r["fid"]) for r in evaluation["rows"])
    assert (tmp_path / "results/toy/report.html").read_text().count("Euler") >= 1
    assert not list(Path(REPO / "src/dmd2").rglob("*toy*"))
