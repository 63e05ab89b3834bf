"""What the training stages share: the learning-rate warm-up, the EMA of weights, rank-invariant randomness, and
cutting a batch's rows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

T, R = TypeVar("T"), TypeVar("R")


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, decay: str = "constant",
                    total_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A linear warm-up, then the LR held constant (diffusers' `constant_with_warmup`) or decayed to zero at
    `total_steps` along a half cosine (`cosine`) or a line (`linear`)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def progress_keys(keys: set[str], lr_scheduler: str) -> set[str]:
    """The settings that only say how far or how visibly to train (`run_directory` leaves them out of a run's
    fingerprint, so changing them resumes the run). A decaying LR ends at `steps`, so under one a different
    length is a different run, not an extension of this one."""
    return keys - ({"steps"} if lr_scheduler != "constant" else set())


def device() -> torch.device:
    """The accelerator if there is one: teacher training, evaluation and FID features run there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class EMA:
    """Exponential moving average of a module's parameters (the teacher's sampling weights)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module, step: int) -> None:
        ema_update_(self.shadow, model.state_dict(), warmed_up_decay(self.decay, step))


def warmed_up_decay(decay: float, step: int) -> float:
    """min(decay, (1 + step) / (10 + step)): early averages follow the weights instead of staying at the start."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update_(average: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """average ← decay · average + (1 − decay) · current, in place, for the floating-point tensors (others are
    copied). Works on a module's `state_dict()`, whose tensors share storage with it (and on FSDP2's DTensor
    shards, each rank averaging its own)."""
    floats = [k for k, v in current.items() if v.dtype.is_floating_point]
    # one multi-tensor kernel instead of a Python loop over a few hundred tensors
    torch._foreach_lerp_([average[k] for k in floats], [current[k].detach() for k in floats], 1 - decay)
    for k, v in current.items():
        if not v.dtype.is_floating_point:
            average[k].copy_(v)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip the gradient norm of what `optimizer` trains to `max_norm`; returns the norm before clipping.

    torch's multi-tensor norm and clip, on gradients that are already all-reduced (DDP) or sharded (FSDP2, where
    the norm is a DTensor of per-shard partials) and never loss-scaled (no fp16). The optimiser's parameter list is
    the model's trainable parameters without a walk over its modules; the norm is `get_total_norm`'s for gradients
    on one device, without its per-tensor device moves (0.2 ms a call on the embedded networks)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
    value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # the same on every rank
    if value > max_norm:  # below it the rescaling pass would multiply by exactly 1 (clip_grad_norm_ does it anyway)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return value


def adamw(params, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CPU and CUDA): one pass over all tensors instead of a Python loop per
    tensor, three times faster on the embedded experiment's small networks. weight_decay 0 is Adam."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


class GlobalBatchRandom:
    """Random draws made for the *global* batch on every rank, then sliced to this rank's part.

    Every rank seeds the same generator, so a run's randomness, and therefore its result up to floating-point
    reduction order, does not depend on how many processes share the batch, nor on how many micro-batches each
    accumulates (`over_micro_batches`); resuming on a different number of ranks continues the same stream.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.micro, self.micro_count = 0, 1

    @contextlib.contextmanager
    def micro_batch(self, index: int, count: int) -> Iterator[None]:
        """Inside, draws are for this rank's `index`-th of `count` accumulated micro-batches: the global batch is
        world × count micro-batches, rank r's a-th at position r·count + a (its share of the batch, cut in order)."""
        self.micro, self.micro_count = index, count
        try:
            yield
        finally:
            self.micro, self.micro_count = 0, 1

    def _full(self, n: int) -> int:
        return n * self.world * self.micro_count

    def _start(self, n: int) -> int:
        """Where this rank's current n rows begin in the global batch."""
        return (self.rank * self.micro_count + self.micro) * n

    def _mine(self, full: torch.Tensor, n: int, device) -> torch.Tensor:
        return full[self._start(n) : self._start(n) + n].to(device)

    def positions(self, n: int, device) -> torch.Tensor:
        """The global batch positions of this rank's current n rows."""
        return torch.arange(self._start(n), self._start(n) + n, device=device)

    def randn(self, n: int, shape: tuple[int, ...], device) -> torch.Tensor:
        return self._mine(torch.randn((self._full(n), *shape)), n, device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[0], tuple(x.shape[1:]), x.device).to(x.dtype)

    def randint(self, low: int, high: int, n: int, device) -> torch.Tensor:
        return self._mine(torch.randint(low, high, (self._full(n),)), n, device)

    def rand(self, n: int, device) -> torch.Tensor:
        return self._mine(torch.rand(self._full(n)), n, device)


def take_rows(value: Any, size: int, rows: slice | torch.Tensor) -> Any:
    """`rows` (a slice or an index tensor) of every batch-sized tensor, list or tuple in `value`, through dicts;
    anything else (None, a tensor shared by the batch) as it is."""
    if torch.is_tensor(value) and value.dim() and value.shape[0] == size:
        return value[rows]
    if isinstance(value, dict):
        return {k: take_rows(v, size, rows) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == size:
        picked = value[rows] if isinstance(rows, slice) else [value[i] for i in rows.tolist()]
        return type(value)(picked)
    return value


def over_micro_batches(draw: GlobalBatchRandom, items: Sequence[T], fn: Callable[[T], R]) -> list[R]:
    """`fn` on each of this rank's micro-batches. Each starts from the same state of torch's generator and keeps its
    slice of the global draws, so the draws, and the state after the last, are those of one pass over the batch."""
    state = torch.get_rng_state()
    results = []
    for index, item in enumerate(items):
        torch.set_rng_state(state)
        with draw.micro_batch(index, len(items)):
            results.append(fn(item))
    return results


@contextlib.contextmanager
def gradient_sync(net: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: with `sync` false its gradients only add up on this rank
    (DDP's no_sync, FSDP2's requires_gradient_sync off); with `sync`, as usual, the backward averages the sum across
    ranks. Syncing only the last micro-batch of a step gives the same gradients with one all-reduce per step.
    One process (no wrapper): nothing to sync either way."""
    sharded = [m for m in net.modules() if hasattr(m, "set_requires_gradient_sync")]
    if sync or not (sharded or hasattr(net, "no_sync")):
        yield
    elif sharded:
        for m in sharded:
            m.set_requires_gradient_sync(False, recurse=False)
        try:
            yield
        finally:
            for m in sharded:
                m.set_requires_gradient_sync(True, recurse=False)
    else:
        with net.no_sync():  # DDP decides in the forward pass whether its backward syncs
            yield


def all_ranks_agree(ok: bool, device: torch.device | str = "cpu") -> bool:
    """True only if `ok` is True on every rank (one all-reduce when a process group is up): a decision such as
    "stop, a value is not finite" is taken by all ranks together, so none is left waiting in a collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
