"""Checkpoints: atomic writes, rotation, safe loading, and survival of a SIGKILL mid-write."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from dmd2.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


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
