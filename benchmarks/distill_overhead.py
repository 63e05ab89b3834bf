"""Where does one DMD2 iteration's wall time go? Model forward/backward passes versus everything else.

    python benchmarks/distill_overhead.py [--params params.yaml] [--iterations 60] [--set distill.batch_size=64]
    python benchmarks/distill_overhead.py --set experiment=sdxl-tiny      (another experiment)

Runs the real `dmd2 distill` loop for a few iterations on the current experiment (its data and teacher must
exist: `snakemake models/mnist/teacher`), in a scratch work directory, with every network's forward pass and
every backward pass timed. "Everything else" is the rest of the iteration wall time: data loading,
optimiser steps, logging and checkpointing (a checkpoint is written every `--checkpoint_every` iterations so
its cost is included). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dmd2.config import load_params
from dmd2.paths import ExperimentPaths
from dmd2.stage import StageContext

TIMES: dict[str, float] = defaultdict(float)  # model passes
OTHER: dict[str, float] = defaultdict(float)  # named parts of everything else


@dataclass(frozen=True)
class ScratchPaths(ExperimentPaths):
    """The experiment's inputs where they are; the student and the run directory in a scratch folder."""

    scratch: Path = Path("/tmp")

    @property
    def student(self) -> Path:
        return self.scratch / "student"

    def work(self, stage: str) -> Path:
        return self.scratch / "work" / stage


def timed_module(module: torch.nn.Module, name: str) -> None:
    """Accumulate the module's forward time (backward passes are timed as a whole, in `Accelerator.backward`)."""

    def pre(_m, _args, _kwargs):
        TIMES[f"_start_{name}"] = time.perf_counter()

    def post(_m, _args, _kwargs, output):
        TIMES[f"{name}.forward"] += time.perf_counter() - TIMES.pop(f"_start_{name}")
        return output

    module.register_forward_pre_hook(pre, with_kwargs=True)
    module.register_forward_hook(post, with_kwargs=True)


def timed_call(owner, attribute: str, name: str) -> None:
    """Accumulate the time of `owner.attribute(...)` under `name` (a part of "everything else")."""
    original = getattr(owner, attribute)

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            OTHER[name] += time.perf_counter() - start

    setattr(owner, attribute, call)


def timed_backward(accelerator) -> None:
    original = accelerator.backward

    def backward(loss, **kwargs):
        start = time.perf_counter()
        original(loss, **kwargs)
        TIMES["backward (all models)"] += time.perf_counter() - start

    accelerator.backward = backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--checkpoint_every", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    import dmd2.distill as distill

    overrides = [*args.overrides, f"distill.steps={args.iterations}", f"distill.checkpoint_every={args.checkpoint_every}"]
    params = load_params(args.params, overrides)
    exp = params.current()

    original_init = distill.DMD2Trainer.__init__

    def instrumented_init(self, family, teacher, generator, critic_score, gan_head, *rest, **kw):
        timed_module(teacher, "teacher")
        timed_module(generator, "generator")
        timed_module(critic_score, "critic")
        if gan_head is not None:
            timed_module(gan_head, "gan_head")
        original_init(self, family, teacher, generator, critic_score, gan_head, *rest, **kw)
        timed_backward(self.acc)
        timed_call(self.opt_g, "step", "optimiser steps")
        timed_call(self.opt_c, "step", "optimiser steps")
        timed_call(self, "_update_average", "generator's weight average")
        timed_call(family, "encode_conditions", "conditions (text encoders)")

    original_step = distill.DMD2Trainer.train_step

    def instrumented_step(self, step, batch):
        TIMES.setdefault("_loop_start", time.perf_counter())
        return original_step(self, step, batch)

    import dmd2.export

    timed_call(distill, "clip_gradients", "gradient clipping")
    timed_call(distill, "_save", "checkpoints (loop's share)")
    timed_call(dmd2.export, "export_pipeline", "pipeline export (text-to-image)")
    timed_call(distill.RandomBatches, "next", "real data batches")
    distill.DMD2Trainer.__init__ = instrumented_init
    distill.DMD2Trainer.train_step = instrumented_step
    with tempfile.TemporaryDirectory() as scratch:
        # the experiment's data and teacher, but a scratch student and run directory
        paths = ScratchPaths(params.experiment, Path("."), Path(scratch))
        start = time.perf_counter()
        distill.run_distill(StageContext(params, params.experiment, paths))
        end = time.perf_counter()
    loop_start = TIMES.pop("_loop_start")
    startup, total = loop_start - start, end - loop_start

    model = sum(v for k, v in TIMES.items() if not k.startswith("_"))
    print(f"experiment {params.experiment}: {args.iterations} iterations, batch {exp.distill.batch_size}, "
          f"generator every {exp.distill.dfake_gen_update_ratio}, GAN {'on' if exp.distill.gan.enabled else 'off'}, "
          f"checkpoint every {args.checkpoint_every}, torch threads {torch.get_num_threads()}")
    print(f"start-up (model loading, accelerate): {startup:.2f} s, not counted below")
    print(f"training loop wall time: {total:8.2f} s  ({total / args.iterations * 1000:.0f} ms/iteration, incl. final save)")
    for key in sorted(k for k in TIMES if not k.startswith("_")):
        print(f"  {key:22s} {TIMES[key]:8.2f} s  {100 * TIMES[key] / total:5.1f} %")
    print(f"model forward+backward:  {model:8.2f} s  {100 * model / total:5.1f} %")
    print(f"everything else:         {total - model:8.2f} s  {100 * (total - model) / total:5.1f} %")
    for key in sorted(OTHER):
        print(f"  {key:30s} {OTHER[key]:8.2f} s  {100 * OTHER[key] / total:5.1f} %")
    rest = total - model - sum(OTHER.values())
    print(f"  {'the rest':30s} {rest:8.2f} s  {100 * rest / total:5.1f} %  (loss arithmetic, random draws, logging)")


if __name__ == "__main__":
    main()
