"""Where a few-step student gains or loses quality: score the x0 after each of its steps, the steps' outputs mixed
(each sample's x0 from a step drawn at random, equally often: what one critic for all steps learns), and each later
step on its own, fed real held-out images noised to that step's level. A mixture that scores clearly better (a
lower FID) than every step alone is the sign of one critic matching the mixture rather than each step
(`distill.critic_per_step`; docs/tuning.md section 15).

    python benchmarks/step_by_step.py --project . --experiment mnist \\
        --checkpoint work/mnist/distill/run-<fingerprint>/checkpoints/ckpt-0002400

`--checkpoint` is a distillation checkpoint (or a student directory: models/<exp>/student); the project must hold
the experiment's data and FID reference. Every score is the evaluation's (proxy FID, class accuracy, precision,
recall, class coverage) on `--num_samples` samples with fixed noise and balanced labels. Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dmd2.config import load_params
from dmd2.data import open_split
from dmd2.evaluate import score_images
from dmd2.families import load_model
from dmd2.fid import FIDReference
from dmd2.paths import ExperimentPaths
from dmd2.sampling import fixed_noise, to_uint8

KEYS = ("fid", "class_accuracy", "precision", "recall", "class_coverage", "class_coverage_min")


def scores(ref: FIDReference, family, x0: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    figures = score_images(ref, to_uint8(family.decode(x0).clamp(-1, 1)), labels)
    return {k: figures[k] for k in KEYS}


def real_images(paths: ExperimentPaths, resolution: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n real images and labels: the held-out split, topped up from the training split when it is smaller."""
    heldout = open_split(paths.data, "heldout", resolution)
    split = heldout if len(heldout) >= n else open_split(paths.data, "train", resolution)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:n]
    items = [split[int(i)] for i in order]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--num_samples", type=int, default=2000)
    args = parser.parse_args()

    exp = load_params(args.project / "params.yaml").current(args.experiment)
    paths = ExperimentPaths(args.experiment, args.project)
    student_dir = args.checkpoint / "student" if (args.checkpoint / "student").is_dir() else args.checkpoint
    model = load_model(student_dir, data_dir=paths.data)
    family, net, steps, n = model.family, model.net, model.timesteps, args.num_samples
    ref = FIDReference(exp, paths)

    def at(t: int, count: int) -> torch.Tensor:
        return torch.full((count,), t, dtype=torch.long)

    renoise = torch.Generator().manual_seed(1)
    labels = family.balanced_labels(n)
    cond = family.encode_conditions(family.balanced_conditions(n), "cpu")
    x_t = family.generator_input(fixed_noise(n, family.sample_shape, exp.eval.seed), at(steps[0], n))
    outputs = []
    for i, t in enumerate(steps):
        x0 = family.predict_x0(net, x_t, at(t, n), cond).float()
        outputs.append(x0)
        print(json.dumps({"chain_step": i + 1, "t": t, **scores(ref, family, x0, labels)}))
        if i + 1 < len(steps):
            x_t = family.add_noise(x0, torch.randn(x0.shape, generator=renoise), at(steps[i + 1], n))
    if len(steps) > 1:
        which = torch.randperm(n, generator=torch.Generator().manual_seed(2)) % len(steps)  # not tied to the classes
        mixed = torch.stack(outputs)[which, torch.arange(n)]
        print(json.dumps({"steps_mixed": True, **scores(ref, family, mixed, labels)}))

    real, real_labels = real_images(paths, exp.data.resolution, n)
    real_cond = family.encode_conditions(real_labels, "cpu")
    print(json.dumps({"real_images": True, **scores(ref, family, real, real_labels)}))
    for i, t in enumerate(steps[1:], start=2):
        noisy = family.add_noise(real, torch.randn(real.shape, generator=renoise), at(t, len(real)))
        x0 = family.predict_x0(net, noisy, at(t, len(real)), real_cond).float()
        print(json.dumps({"step_alone_on_real": i, "t": t, **scores(ref, family, x0, real_labels)}))


if __name__ == "__main__":
    main()
