"""Checkpoints: atomic writes, rotation, safe loading, and survival of a SIGKILL mid-write."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from dmd2.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from dmd2.errors import CheckpointError


def test_save_load_and_rotate(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"net": {"w": torch.full((2,), float(step))}}, {"opt": {"lr": 0.1 * step}},
                        {"note": "x"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000002", "ckpt-0000003"]
    models, state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(models["net"]["w"], torch.full((2,), 3.0))
    assert abs(state["opt"]["lr"] - 0.3) < 1e-12 and meta["step"] == 3


def test_sigkill_while_writing_leaves_previous_checkpoint_loadable(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from dmd2.checkpoint import save_checkpoint
        save_checkpoint({str(tmp_path)!r}, 1, {{"net": {{"w": torch.ones(3)}}}}, {{}}, {{}}, keep_last=2)
        big = {{f"w{{i}}": torch.randn(4_000_000) for i in range(40)}}   # ~640 MB: slow enough to be caught mid-write
        save_checkpoint({str(tmp_path)!r}, 2, {{"net": big}}, {{}}, {{}}, keep_last=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    tmp_dir = tmp_path / ".ckpt-0000002.tmp"
    deadline = time.time() + 120
    while not tmp_dir.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp_dir.exists(), "the writer finished before it could be killed mid-write"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-0000001"]
    models, _, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert meta["step"] == 1 and torch.equal(models["net"]["w"], torch.ones(3))
    # the next save cleans the debris and rotates normally
    save_checkpoint(tmp_path, 2, {"net": {"w": torch.zeros(1)}}, {}, {}, keep_last=2)
    assert not tmp_dir.exists() and latest_checkpoint(tmp_path).name == "ckpt-0000002"


def _trained_part(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.SiLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(3):
        net(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return net, opt


def test_unsharded_training_state_is_one_file_and_round_trips_the_optimiser(tmp_path):
    from dmd2.checkpoint import load_training_state, save_training_state, training_state_path

    saved = {"generator": _trained_part(0), "critic": _trained_part(1)}
    path = save_training_state(tmp_path, saved, sharded=False)
    assert path == tmp_path / "training.safetensors" == training_state_path(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["training.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # packed: one flat tensor per dtype, not one per key
        assert sorted(f.keys()) == ["float32"]  # noqa: SIM118

    loaded = {"generator": _trained_part(2), "critic": _trained_part(3)}
    load_training_state(path, loaded)
    for name in saved:
        (net_a, opt_a), (net_b, opt_b) = saved[name], loaded[name]
        for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
            assert torch.equal(a, b)
        state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
        assert state_a["param_groups"][0]["betas"][0] == state_b["param_groups"][0]["betas"][0] == 0.5
        for i, moments in state_a["state"].items():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(moments[key], state_b["state"][i][key]), (name, i, key)
        # and training continues identically from both
        x = torch.randn(5, 3)
        for net, opt in (saved[name], loaded[name]):
            net(x).square().mean().backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True))


def test_the_unsharded_training_state_is_what_dcp_get_state_dict_returns():
    """The one-file checkpoint builds its state from the modules' and optimisers' own state dicts (DCP's name
    lookups cost more than the iterations between checkpoints): it must be exactly DCP's, which loads it."""
    from dmd2.checkpoint import _training_state, _unsharded_training_state

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(4, 2)))
    net[0].bias.requires_grad_(False)  # a frozen parameter (LoRA's base weights) has no optimiser state
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, fused=True)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)  # adds initial_lr to the group, as distill's does
    net(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    average = torch.nn.Linear(2, 2)
    parts = {"generator": (net, opt), "generator_ema": (average, None)}

    ours, dcp = _unsharded_training_state(parts), _training_state(parts)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list | tuple):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    assert same(ours, dcp)
    assert ours["generator"]["optim"]["param_groups"][0]["params"] == ["0.weight", "1.1.weight", "1.1.bias"]


def test_a_training_state_file_written_before_packing_still_loads(tmp_path):
    """Files from before the packed form hold one tensor per key; a run started then resumes now."""
    import json

    from safetensors.torch import save_file

    from dmd2.checkpoint import _flatten, _unsharded_training_state, load_training_state

    saved = {"generator": _trained_part(0)}
    tensors = {}
    skeleton = _flatten(_unsharded_training_state(saved), "", tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "training.safetensors",
              metadata={"structure": json.dumps(skeleton)})
    loaded = {"generator": _trained_part(1)}
    load_training_state(tmp_path / "training.safetensors", loaded)
    for a, b in zip(saved["generator"][0].parameters(), loaded["generator"][0].parameters(), strict=True):
        assert torch.equal(a, b)
    moments_a, moments_b = saved["generator"][1].state_dict()["state"], loaded["generator"][1].state_dict()["state"]
    assert all(torch.equal(moments_a[i]["exp_avg_sq"], moments_b[i]["exp_avg_sq"]) for i in moments_a)


def test_a_truncated_training_state_file_is_a_checkpoint_error(tmp_path):
    import pytest

    from dmd2.checkpoint import load_training_state, save_training_state
    from dmd2.errors import CheckpointError

    path = save_training_state(tmp_path, {"generator": _trained_part(0)}, sharded=False)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="training.safetensors is corrupt"):
        load_training_state(path, {"generator": _trained_part(1)})


def test_the_background_writer_runs_writes_in_order_and_reports_a_failure_at_the_next_wait():
    from dmd2.checkpoint import BackgroundWriter

    done, writer = [], BackgroundWriter()
    writer.submit(lambda: done.append(1))
    writer.submit(lambda: done.append(2))  # waits for the first
    writer.wait()
    assert done == [1, 2]

    def fail():
        raise CheckpointError("writing /x failed (the disk is full)")

    writer.submit(fail)
    with pytest.raises(CheckpointError, match="the disk is full"):
        writer.close()
