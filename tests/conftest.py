"""Test-wide settings: offline, no telemetry, deterministic CPU, and helpers to run the real CLI."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

sys.path.insert(0, str(Path(__file__).parent))  # test helper modules (gmm.py, …)

REPO = Path(__file__).resolve().parents[1]
