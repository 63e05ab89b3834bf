"""Test-wide settings: offline, no telemetry, deterministic CPU, and helpers to run the real CLI."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# pytest-xdist's workers (`make test` starts one per core) share the cores: each worker's torch, and the stages it
# starts, get their share instead of all of them each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (gmm.py, …)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Real data and a tiny trained teacher, built once by the real stages; tests copy it (tiny.fresh_copy)."""
    from tiny import run, write_tiny_params

    root = tmp_path_factory.mktemp("prepared")
    write_tiny_params(root)
    run(root, "prepare-data")
    run(root, "teacher")
    return root
# Subprocesses (snakemake, dvc, dmd2, accelerate) come from the same environment as the tests.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
