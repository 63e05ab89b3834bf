"""Can the diffusion-GAN head tell real images from a trained student's at all? Train a fresh head, apart from
distillation, on real images against the student's one-step samples (or, as the control, the teacher's own), and
print its held-out accuracy.

    python benchmarks/discriminator_probe.py --project . --experiment fashion --student models/fashion/student

The head reads what the distillation's head reads: the teacher's GAN features (the critic starts as the teacher)
of the samples noised at t ~ U{0 … max − 1}, for several `--max_timesteps`. A small convolutional network on the
noised samples themselves is the second probe: whether what the features hide is there in pixels. 0.5 is chance:
where both stay near it, a GAN term on that head has no direction to give the generator. Each probe trains for
`--steps` Adam steps on 1,500 real and 1,500 student samples and is scored on 500 of each that it never saw.
The student's samples are not clamped: clamping would give the probe a pattern of its own (real pixels stop at
±1, a student's pass beyond it). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dmd2.config import load_params
from dmd2.critic import gan_head
from dmd2.data import open_split
from dmd2.families import load_model
from dmd2.sampling import fixed_noise

TRAIN, HELDOUT = 1500, 500


def pixel_network(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.SiLU(),
                         nn.Conv2d(64, 64, 4, 2, 1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1),
                         nn.Flatten(0))


def probe(classify, params, real, fake, max_t: int, steps: int, lr: float) -> float:
    """Train `classify(x, index, t) -> logits` to say real, then score it on the held-out samples."""
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        i, t = torch.randint(0, TRAIN, (64,)), torch.randint(0, max_t, (64,))
        loss = F.softplus(-classify(real[i], i, t)).mean() + F.softplus(classify(fake[i], i, t)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        j, t = torch.arange(TRAIN, TRAIN + HELDOUT), torch.randint(0, max_t, (HELDOUT,))
        right = (classify(real[j], j, t) > 0).float().mean() + (classify(fake[j], j, t) < 0).float().mean()
    return round(right.item() / 2, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--student", type=Path, help="a student directory (models/<exp>/student); without it the "
                        "probes face the teacher's own samples (its full-step row, max(eval.teacher_steps)): the control")
    parser.add_argument("--max_timesteps", default="1000,250,60")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=4e-4)
    args = parser.parse_args()

    exp = load_params(args.project / "params.yaml").current(args.experiment)
    data = args.project / "data" / args.experiment
    teacher = load_model(args.project / "models" / args.experiment / "teacher", data_dir=data)
    family, n = teacher.family, TRAIN + HELDOUT
    torch.manual_seed(0)
    train = open_split(data, "train", exp.data.resolution)
    items = [train[int(i)] for i in torch.randperm(len(train))[:n]]
    real = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    labels = torch.tensor([int(y) for _, y in items])
    noise, cond = fixed_noise(n, family.sample_shape, exp.eval.seed), family.encode_conditions(labels, "cpu")
    with torch.no_grad():
        if args.student is None:
            fake = torch.cat([family.sample_teacher(teacher.net, z, family.encode_conditions(y, "cpu"),
                                                    max(exp.eval.teacher_steps)).float()
                              for z, y in zip(noise.split(250), labels.split(250), strict=True)])
        else:
            student = load_model(args.student, data_dir=data)
            t0 = torch.full((n,), student.timesteps[0], dtype=torch.long)
            fake = student.family.predict_x0(student.net, student.family.generator_input(noise, t0), t0, cond).float()
    print(json.dumps({"against": "teacher" if args.student is None else str(args.student),
                      "real_range": [real.min().item(), real.max().item()],
                      "sample_range": [round(fake.min().item(), 3), round(fake.max().item(), 3)]}))

    def noised(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return family.add_noise(x, torch.randn_like(x), t)

    for max_t in [int(v) for v in args.max_timesteps.split(",")]:
        torch.manual_seed(1)
        head = gan_head(family.gan_feature_shape)

        def on_features(x, index, t, head=head):
            with torch.no_grad():  # the same labels for both: the student's samples are drawn for the real ones'
                features = family.gan_features(teacher.net, noised(x, t), t, family.encode_conditions(labels[index], "cpu"))
            return head(features)

        torch.manual_seed(1)
        pixels = pixel_network(family.sample_shape[0])
        print(json.dumps({"max_timestep": max_t,
                          "gan_head_on_teacher_features": probe(on_features, head.parameters(), real, fake, max_t,
                                                                args.steps, args.lr),
                          "conv_net_on_noised_samples": probe(lambda x, i, t: pixels(noised(x, t)),  # noqa: B023
                                                              pixels.parameters(), real, fake, max_t, args.steps,
                                                              args.lr)}), flush=True)


if __name__ == "__main__":
    main()
