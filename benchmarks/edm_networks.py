"""Speed of EDM's full-size networks in this pipeline: one DMD2 iteration, and teacher-training throughput.

    python benchmarks/edm_networks.py distill --network imagenet64 --batch-size 1            # CPU sanity figure
    python benchmarks/edm_networks.py distill --network imagenet64 --batch-size 40 --bf16   # one GPU of the recipe
    python benchmarks/edm_networks.py teacher --network cifar10 --batch-size 512 --bf16     # the CIFAR-10 teacher

`distill` builds the teacher, generator and critic (+ GAN head) at full size with random weights (speed does not
depend on the weights), then times the real `DMD2Trainer.train_step` on the default device: a generator iteration
(generator and critic updates) and a critic-only iteration, the two kinds the update ratio mixes. `teacher` times
the family's teacher objective with an Adam step (the teacher stage's inner loop). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from dmd2.config import DistillConfig, GANConfig
from dmd2.families import family_for
from dmd2.training import device

MANIFESTS = Path(__file__).resolve().parents[1] / "tests" / "data" / "edm"
NETWORKS = {"imagenet64": "edm-imagenet-64x64-cond-adm", "cifar10": "edm-cifar10-32x32-cond-vp"}


def family_config(network: str) -> dict:
    """The config.json a converted EDM checkpoint of this network gets (constructor arguments from the manifest)."""
    from dmd2.families.edm_pickle import network_config_from_edm

    constructor = json.loads((MANIFESTS / f"{NETWORKS[network]}.json").read_text())["constructor"]
    return {"family": "edm", "kind": "teacher", **network_config_from_edm("EDMPrecond", constructor),
            "sampler": {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "num_steps": 18},
            "training": {"p_mean": -1.2, "p_std": 1.2}}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up (allocator, kernels)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def bench_distill(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from dmd2.distill import Batch, DMD2Trainer, new_gan_head

    family = family_for(family_config(args.network))
    dev = device()
    torch.manual_seed(0)
    teacher = family.build_network().to(dev)
    cfg = DistillConfig(batch_size=args.batch_size, generator_lr=2e-6, critic_lr=2e-6, dfake_gen_update_ratio=5,
                        gan=GANConfig(enabled=True, gen_weight=3e-3, critic_weight=1e-2),
                        mixed_precision="bf16" if args.bf16 else "no", backward_simulation=False)
    trainer = DMD2Trainer(family, teacher, copy.deepcopy(teacher), copy.deepcopy(teacher), new_gan_head(family, 0),
                          cfg, Accelerator(cpu=dev.type == "cpu"))
    n = args.batch_size
    labels = torch.randint(0, family.num_classes, (n,))
    cond = family.encode_conditions(labels, dev)
    real = torch.randn(n, *family.sample_shape, device=dev).clamp(-1, 1)
    batch = Batch(n, cond, real, cond)
    step = iter(range(10**9))
    gen = timed(lambda: trainer.train_step(5 * next(step), batch), args.repeats)  # multiples of 5: generator turns
    critic = timed(lambda: trainer.train_step(5 * next(step) + 1, batch), args.repeats)
    params = sum(p.numel() for p in teacher.parameters())
    mean_iteration = (statistics.median(gen) + 4 * statistics.median(critic)) / 5
    print(f"network {args.network} ({params:,} parameters), batch {n}, {'bf16' if args.bf16 else 'fp32'}, "
          f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else torch.get_num_threads()} "
          f"{'' if dev.type == 'cuda' else 'threads'})")
    print(f"  generator iteration (generator + critic updates): median {statistics.median(gen):.3f} s over {len(gen)}")
    print(f"  critic-only iteration:                            median {statistics.median(critic):.3f} s over {len(critic)}")
    print(f"  mean iteration at update ratio 5: {mean_iteration:.3f} s = {1 / mean_iteration:.2f} it/s, "
          f"{n / mean_iteration:.1f} generated images/s")
    if dev.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def bench_teacher(args: argparse.Namespace) -> None:
    family = family_for(family_config(args.network))
    dev = device()
    torch.manual_seed(0)
    net = family.build_network().to(dev).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    n = args.batch_size
    x = torch.randn(n, *family.sample_shape, device=dev).clamp(-1, 1)
    cond = family.encode_conditions(torch.randint(0, family.num_classes, (n,)), dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = family.teacher_loss(net, x, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = timed(step, args.repeats)
    per_step = statistics.median(times)
    per_day = 86400 / per_step
    print(f"teacher {args.network} ({sum(p.numel() for p in net.parameters()):,} parameters), batch {n}, "
          f"{'bf16' if args.bf16 else 'fp32'}, device {dev}: median {per_step:.3f} s/step = {n / per_step:.0f} images/s; "
          f"one day = {per_day:,.0f} steps ({per_day * n / 1e6:.1f} M images)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["distill", "teacher"])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="imagenet64")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="autocast model calls to bfloat16 (GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    (bench_distill if args.what == "distill" else bench_teacher)(args)


if __name__ == "__main__":
    main()
