"""Per-GPU peak memory of a distillation run, estimated before it runs: `dmd2 memory`.

Two parts, both from the networks the run builds (on the meta device: shapes, no weights):

- **resident**: what stays allocated all run: each network's weights in the dtype the trainer keeps them (the frozen
  teacher in bf16 under `distill.mixed_precision: bf16`, trained networks and a LoRA generator's frozen base in
  float32), a text-to-image teacher's text encoders and VAE, and AdamW's two float32 moments per trained parameter.
  FSDP2 divides the sharded networks' part by the shard group; DDP adds its gradient buckets (a float32 copy of the
  trained gradients).
- **turns**: the generator turn and the critic turn on one micro-batch, run through the same family calls as
  `DMD2Trainer` (generator forward, the DM loss's teacher and critic predictions, the GAN logits, the backward) on
  torch's fake tensors: shapes and dtypes, no arithmetic, no memory. Every storage the turn creates is counted while
  it lives (`LiveBytes`), so the peak includes activations (as gradient checkpointing and autocast leave them), the
  turn's gradients and temporaries. Run at the micro-batch and twice it, at the recipe's resolution, they give a per-sample
  figure, so the peak of any micro-batch follows without measuring it.

Peak = resident + the larger turn. Not counted: the CUDA context and the allocator's caching and fragmentation (add
a few GiB of headroom), NCCL buffers, FSDP2's gathered blocks in flight. `benchmarks/memory_estimate.py` compares
the estimate with the measured peak of real runs on this CPU.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from dmd2.config import ExperimentConfig, batch_shares
from dmd2.families import Family, ModelError, family_class, family_for, read_config

GIB = 2**30


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is on that are still alive (`live`), and their most at
    once (`peak`). Views share their base's storage and count once; a storage counts until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place op returns an input's storage: not new memory (a weight's transpose is the weight)
        inputs = {_storage_key(v) for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)}
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                key = _storage_key(value)
                if key not in self._seen and key not in inputs:
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, key, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _storage_key(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (its C++ object: the same for every view of it, fake tensors included)."""
    return tensor.untyped_storage()._cdata


@dataclass
class Estimate:
    """Bytes per GPU: `resident` by part; `turns`: per turn, (fixed, per sample) of one micro-batch's pass."""

    resident: dict[str, float]
    turns: dict[str, tuple[float, float]]
    micro_batch: int
    notes: list[str] = field(default_factory=list)

    def turn(self, name: str, micro_batch: int | None = None) -> float:
        fixed, per_sample = self.turns[name]
        return fixed + per_sample * (micro_batch or self.micro_batch)

    def peak(self, micro_batch: int | None = None) -> float:
        return sum(self.resident.values()) + max(self.turn(name, micro_batch) for name in self.turns)

    def largest_micro_batch(self, budget: float) -> int:
        """The largest micro-batch whose estimated peak stays within `budget` bytes (0: not even one sample)."""
        room = budget - sum(self.resident.values())
        fits = [int((room - fixed) // per_sample) if per_sample > 0 else 10**6 for fixed, per_sample in self.turns.values()]
        return max(0, min(fits))


# ------------------------------------------------------------------------------------------------ the networks


def teacher_config(exp: ExperimentConfig, teacher_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    """The teacher's config.json: the one `dmd2 teacher` wrote, else one its family makes from config files alone
    (no weights): the published architecture of one of the paper's downloaded teachers, or a pipeline's own."""
    if (teacher_dir / "config.json").exists():
        return read_config(teacher_dir)
    cfg = exp.teacher
    try:
        return family_class(cfg.family).architecture_config(cfg, root)
    except ModelError as err:
        raise ModelError(f"no teacher config to estimate from: {teacher_dir}/config.json does not exist and {err}; "
                         "run `dmd2 prepare-data` and `dmd2 teacher` first") from None


def _fake(net: nn.Module, mode: TorchDispatchMode, dtype: torch.dtype | None = None) -> nn.Module:
    """`net` (a meta-device skeleton) with fake CPU tensors of the same shapes in place of its weights."""
    with mode:
        for module in net.modules():
            for name, param in module._parameters.items():
                if param is not None:
                    fake = torch.empty(param.shape, dtype=dtype if param.is_floating_point() and dtype else param.dtype)
                    module._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)
    return net


def _count(net: nn.Module | None, trainable: bool | None = None) -> int:
    if net is None:
        return 0
    return sum(p.numel() for p in net.parameters() if trainable is None or p.requires_grad == trainable)


# ------------------------------------------------------------------------------------------------ the estimate


def estimate(exp: ExperimentConfig, config: dict[str, Any], processes: int | None = None,
             micro_batch: int | None = None) -> Estimate:
    """The per-GPU peak of `dmd2 distill` for experiment `exp` with the teacher `config`, on `processes` processes
    (default: the launch shape's) with `micro_batch` samples per pass (default: the run's own)."""
    from dmd2.distill import new_gan_head, new_generator
    from dmd2.sharding import shards

    cfg, launch = exp.distill, exp.launch
    processes = processes or launch.num_machines * launch.processes_per_machine
    per_rank, accumulation = batch_shares(cfg.batch_size, processes, launch.micro_batch)
    micro_batch = micro_batch or per_rank // accumulation
    family = family_for(config)
    with torch.device("meta"):
        teacher = family.build_network().eval().requires_grad_(False)
        generator = new_generator(family, teacher, cfg)
        critic = copy.deepcopy(teacher).train().requires_grad_(True)
    head = new_gan_head(family, cfg.seed) if cfg.gan.enabled else None
    bf16 = cfg.mixed_precision == "bf16"
    critics = len(cfg.denoising_timesteps) if cfg.critic_per_step else 1  # copies of the critic and head
    trained = _count(generator, True) + critics * (_count(critic) + _count(head))
    sharded = shards(launch, processes)
    group = _shard_group(launch, processes) if sharded else 1
    frozen = {name: _count(net) for name, net in family.frozen_networks().items()}
    resident = {
        "teacher": _count(teacher) * (2 if bf16 else 4) / group,
        "generator": _count(generator) * 4 / group,
        "generator average": _count(generator) * 4 / group if cfg.ema_decay > 0 else 0,
        "critic and GAN head": critics * (_count(critic) + _count(head)) * 4 / group,
        "AdamW moments": 8 * trained / group,
        **{name: count * (2 if bf16 and name.startswith("text") else 4) for name, count in frozen.items()},
    }
    notes = []
    if processes > 1 and not sharded:
        resident["DDP gradient buckets"] = 4 * trained
    if sharded:
        notes.append(f"FSDP2 shards over {group} GPUs; the blocks it gathers in flight are not counted")
    turns = measure_turns(family, teacher, generator, critic, head, cfg, micro_batch)
    if critics > 1:  # measured with one critic on the whole micro-batch; the others' gradients live beside it
        fixed, per_sample = turns["critic turn"]
        turns["critic turn"] = (fixed + 4 * (critics - 1) * (_count(critic) + _count(head)), per_sample)
        notes.append(f"{critics} critics (distill.critic_per_step), each on its step's share of the batch")
    if sharded:  # the turn's gradients end up as this rank's shard (the full ones exist a block at a time)
        critic_grads = critics * (_count(critic) + _count(head))
        for name, grads in (("generator turn", _count(generator, True)), ("critic turn", critic_grads)):
            fixed, per_sample = turns[name]
            turns[name] = (fixed - 4 * grads * (1 - 1 / group), per_sample)
    return Estimate({k: v for k, v in resident.items() if v}, turns, micro_batch, notes)


def _shard_group(launch, processes: int) -> int:
    return launch.processes_per_machine if launch.fsdp.sharding_strategy == "HYBRID_SHARD" else processes


def measure_turns(family: Family, teacher: nn.Module, generator: nn.Module, critic: nn.Module,
                  head: nn.Module | None, cfg, micro_batch: int) -> dict[str, tuple[float, float]]:
    """(fixed, per-sample) bytes of each turn's pass, from fake-tensor runs at `micro_batch` and twice it: exact at
    the run's micro-batch, and the slope there (a turn's peak is where the most is alive, which moves with the
    batch: from micro-batches 1 and 2 the slope of small batches, where gradients rather than activations peak,
    underestimated a batch of 64 by a third)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())  # the shape env lets .item() pass
    bf16 = cfg.mixed_precision == "bf16"
    teacher = _fake(teacher, mode, torch.bfloat16 if bf16 else None)
    generator, critic = _fake(generator, mode), _fake(critic, mode)
    head = _fake(head, mode) if head is not None else None
    if cfg.gradient_checkpointing:
        for net in (generator, critic):
            family.enable_gradient_checkpointing(net)
    # Classifier-free guidance's unconditional input has the conditions' shapes; made without weights, it cannot come
    # from the family's encoders (an empty prompt), so zeros of those shapes stand in for it.
    family.unconditional = lambda cond: tree_map(torch.zeros_like, cond)
    turns = {}
    for name in ("generator turn", "critic turn"):
        at_m, at_2m = (_turn_peak(name, family, teacher, generator, critic, head, cfg, mode, n)
                       for n in (micro_batch, 2 * micro_batch))
        per_sample = (at_2m - at_m) / micro_batch
        turns[name] = (at_m - per_sample * micro_batch, per_sample)
    return turns


def _turn_peak(turn: str, family: Family, teacher: nn.Module, generator: nn.Module, critic_score: nn.Module,
               head: nn.Module | None, cfg, mode, n: int) -> int:
    """The most bytes alive at once in one turn on `n` samples, as `DMD2Trainer._generator_pass` and
    `_critic_pass` make them (the trained network's gradients included)."""
    from dmd2.critic import Critic
    from dmd2.losses import distribution_matching_loss, gan_generator_loss
    from dmd2.training import GlobalBatchRandom

    draw = GlobalBatchRandom()
    critic = Critic(family, critic_score, head, cfg.gan.diffusion_max_timestep, draw)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    generator_turn = turn == "generator turn"
    critic.requires_grad_(not generator_turn)
    cond = family.memory_conditions(n)
    tracker = LiveBytes()
    with mode, tracker:
        x_in = torch.randn(n, *family.sample_shape)
        t_in = torch.full((n,), cfg.denoising_timesteps[0], dtype=torch.long)
        with torch.set_grad_enabled(generator_turn), autocast:
            x = family.predict_x0(generator, x_in, t_in, cond).float()
        if generator_turn:
            t_dm = torch.randint(0, family.num_train_timesteps, (n,))
            with autocast:
                loss, _ = distribution_matching_loss(family, teacher, critic.score, x, cond, t_dm, torch.randn_like(x),
                                                     cfg.real_guidance_scale, cfg.fake_score_fp32)
                if head is not None:
                    loss = loss + cfg.gan.gen_weight * gan_generator_loss(critic.logits(x, cond))
        else:
            real = torch.randn_like(x) if head is not None else None
            with autocast:
                out = critic(x.detach(), cond, real, cond)
                loss = out["loss_fake"] + out.get("loss_gan_critic", 0)
        loss.backward()
    for net in (generator, critic):
        net.zero_grad(set_to_none=True)
    return tracker.peak


def describe(estimate: Estimate, budget_gib: float | None = None) -> str:
    """The estimate as the lines `dmd2 memory` prints."""
    lines = [f"{'resident':36s}{sum(estimate.resident.values()) / GIB:8.2f} GiB"]
    lines += [f"  {name:34s}{value / GIB:8.2f}" for name, value in estimate.resident.items()]
    for name, (fixed, per_sample) in estimate.turns.items():
        lines.append(f"{name + f' (micro-batch {estimate.micro_batch})':36s}{estimate.turn(name) / GIB:8.2f} GiB  "
                     f"({fixed / GIB:.2f} + {per_sample / GIB:.3f} per sample)")
    lines.append(f"{'estimated peak per GPU':36s}{estimate.peak() / GIB:8.2f} GiB")
    if budget_gib:
        largest = estimate.largest_micro_batch(budget_gib * GIB)
        verdict = "fits" if estimate.peak() <= budget_gib * GIB else "does NOT fit"
        lines.append(f"{verdict} in {budget_gib:g} GiB; the largest micro-batch that fits: about {largest} "
                     f"(extrapolated from {estimate.micro_batch} and {2 * estimate.micro_batch}, where the peak may sit "
                     f"elsewhere: check with --set launch.micro_batch={largest})")
    lines += [f"note: {note}" for note in estimate.notes]
    lines.append("not counted: the CUDA context, the allocator's cache and fragmentation (leave a few GiB)")
    return "\n".join(lines)
