"""Where the default DAG's compute goes, per operator: torch.profiler over the three loops that dominate it.

    python benchmarks/profile_ops.py [--experiment mnist] [--rows 12] [--set teacher.unet.channels=24]

For the experiment's own network (built from params.yaml with random weights: operator costs do not depend on the
weights; its data stage must have run: `snakemake data/mnist`), profiles (1) teacher-training steps (the family's objective, backward, Adam), (2) DMD2 iterations of the
real `DMD2Trainer.train_step` at the experiment's batch size and update ratio, and (3) the teacher's full-step
sampler, which is the evaluation's dominant row. Prints each loop's seconds per call and its top operators by self
CPU time; asserts nothing. `benchmarks/default_dag.py` gives the per-stage wall times these loops add up to.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dmd2.config import load_params
from dmd2.data import open_split
from dmd2.families import family_for, teacher_config
from dmd2.paths import ExperimentPaths
from dmd2.training import device


def report(name: str, fn, calls: int, rows: int) -> None:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    per_call = (time.perf_counter() - start) / calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    print(f"\n=== {name}: {per_call * 1000:.1f} ms per call (mean of {calls}, unprofiled)")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--experiment", default=None)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from accelerate import Accelerator

    from dmd2.distill import Batch, DMD2Trainer, new_gan_head

    params = load_params(args.params, args.overrides, experiment=args.experiment)
    exp, dev = params.current(), device()
    train = open_split(ExperimentPaths(params.experiment, Path(".")).data, "train", exp.data.resolution)
    shape, classes = tuple(train.shape), max(1, train.num_classes)
    family = family_for(teacher_config(exp.teacher, shape, train.num_classes))
    torch.manual_seed(0)
    net = family.build_network().to(dev).train()
    print(f"experiment {params.experiment}: {sum(p.numel() for p in net.parameters()):,} parameters, samples {shape}, "
          f"device {dev}, torch threads {torch.get_num_threads()}")

    # (1) teacher training
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    n = exp.teacher.batch_size
    x = torch.rand(n, *shape, device=dev) * 2 - 1
    cond = family.encode_conditions(torch.randint(0, classes, (n,)), dev)

    def teacher_step():
        loss = family.teacher_loss(net, x, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    report(f"teacher training step (batch {n})", teacher_step, args.calls, args.rows)

    # (2) DMD2 iterations: `ratio` consecutive iterations hold one generator turn
    cfg = exp.distill
    trainer = DMD2Trainer(family, copy.deepcopy(net).eval(), copy.deepcopy(net), copy.deepcopy(net),
                          new_gan_head(family, 0) if cfg.gan.enabled else None, cfg, Accelerator(cpu=dev.type == "cpu"))
    m = cfg.batch_size
    labels = torch.randint(0, classes, (m,))
    batch = Batch(m, family.encode_conditions(labels, dev), x[:m].clone(), family.encode_conditions(labels, dev))
    ratio, step = cfg.dfake_gen_update_ratio, iter(range(10**9))

    def iterations():
        for _ in range(ratio):
            trainer.train_step(next(step), batch)

    report(f"{ratio} DMD2 iterations (batch {m}, one generator turn)", iterations, max(2, args.calls // ratio), args.rows)

    # (3) the teacher's full-step sampler, as the evaluation runs it
    net.eval()
    b = exp.eval.batch_size
    noise, labels = torch.randn(b, *shape, device=dev), family.encode_conditions(torch.arange(b) % classes, dev)
    steps = exp.teacher.sampler.num_steps

    @torch.no_grad()
    def sampler():
        family.sample_teacher(net, noise, labels, steps, 1.0)

    report(f"teacher sampler, {steps} steps (NFE {family.teacher_nfe(steps)}), batch {b}", sampler, 2, args.rows)


if __name__ == "__main__":
    main()
