"""FSDP2 for the training loops: `fully_shard` on distillation's generator, critic, GAN head and teacher, and on the
regression stage's generator.

accelerate starts the processes and owns the process group; dmd2 shards the models itself because
accelerate's FSDP plugin cannot run on CPU and wraps one model per `prepare`, while DMD2 trains two models
with separate optimisers and calls the critic from outside its wrapper (the DM loss and the GAN generator
loss). Sharding each network as its own FSDP root keeps every one of those calls valid.

The mapping from `launch.fsdp.sharding_strategy` to FSDP2:
  FULL_SHARD          1-D mesh over all ranks, parameters resharded after forward (ZeRO-3)
  SHARD_GRAD_OP       1-D mesh, parameters kept gathered between forward and backward (ZeRO-2)
  HYBRID_SHARD        2-D (replicate = machines, shard = processes per machine) mesh, resharded (HSDP)
  HYBRID_SHARD_ZERO2  the same mesh, parameters kept gathered
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard

from dmd2.config import FSDPConfig, LaunchConfig


def shards(launch: LaunchConfig | None, num_processes: int) -> bool:
    """Whether the run shards its networks with FSDP2 (NO_SHARD replicates every parameter: that is DDP, so it
    takes accelerate's DDP path)."""
    return (launch is not None and launch.distributed == "fsdp" and num_processes > 1
            and launch.fsdp.sharding_strategy != "NO_SHARD")


def device_mesh(launch: LaunchConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The ranks FSDP shards over: all of them, or (machines × processes per machine) for hybrid sharding."""
    if launch.fsdp.sharding_strategy.startswith("HYBRID"):
        if world_size % launch.num_machines:
            raise ValueError(f"hybrid sharding needs the {world_size} processes split evenly over "
                             f"launch.num_machines={launch.num_machines}")
        return init_device_mesh(device_type, (launch.num_machines, world_size // launch.num_machines),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))


def wrap_units(model: nn.Module, fsdp: FSDPConfig) -> list[nn.Module]:
    """Submodules that become their own FSDP unit (gathered and freed on their own), innermost first.

    SIZE_BASED_WRAP gives a submodule its own unit once the parameters beneath it that no inner unit has
    claimed reach `min_num_params` (torch's size-based policy); TRANSFORMER_BASED_WRAP picks submodules by
    class name. Whatever is left belongs to the root unit, which `shard` adds last.
    """
    if fsdp.auto_wrap_policy == "NO_WRAP":
        return []
    if fsdp.auto_wrap_policy == "TRANSFORMER_BASED_WRAP":
        names = set(fsdp.transformer_layer_cls_to_wrap)
        return [m for m in model.modules() if m is not model and type(m).__name__ in names and _has_forward(m)]
    units: list[nn.Module] = []

    def unclaimed(module: nn.Module) -> int:
        count = sum(unclaimed(child) for child in module.children())
        count += sum(p.numel() for p in module.parameters(recurse=False))
        if module is not model and count >= fsdp.min_num_params and _has_forward(module):
            units.append(module)
            return 0
        return count

    unclaimed(model)
    return units


def _has_forward(module: nn.Module) -> bool:
    """ModuleList/ModuleDict only hold modules: FSDP2 cannot hook them, so their parameters pass to the parent."""
    return type(module).forward is not nn.Module.forward


def shard(model: nn.Module, fsdp: FSDPConfig, mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `mesh` (inner units first, then the root); returns the same object."""
    reshard = fsdp.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD")
    for unit in wrap_units(model, fsdp):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    return model


def fill_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Allocate a sharded meta-device skeleton's local shards on `device` and fill them from rank 0's full weights
    (a collective: rank 0 broadcasts each tensor, every rank keeps its shard; the others pass None). `full_state`
    is the state dict plus every buffer, non-persistent ones included (`full_weights`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    rank0 = torch.distributed.get_rank() == 0
    saved = set(model.state_dict())
    weights = {k: v for k, v in full_state.items() if k in saved} if rank0 else {}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # buffers are not sharded, and set_model_state_dict leaves the non-persistent ones (e.g. a sinusoidal
    # embedding's frequencies, made in __init__) as `to_empty` allocated them: send rank 0's
    for name, buffer in model.named_buffers():
        if rank0:
            buffer.copy_(full_state[name])
        torch.distributed.broadcast(buffer, src=0)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What `fill_from_rank0` needs from rank 0: the state dict and every buffer."""
    return {**model.state_dict(), **dict(model.named_buffers())}
