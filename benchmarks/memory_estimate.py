"""`dmd2 memory`'s estimate against the measured peak of real distillation runs on this CPU.

    python benchmarks/memory_estimate.py [--experiment mnist] [--set KEY=VALUE ...] [--iterations 2]

Builds a throwaway project in a temporary folder (the embedded data; a teacher trained one step where the
experiment trains its own: only its shape matters), runs `dmd2 distill` for a few iterations in one process and
records, around each iteration, the bytes of every live tensor when it starts plus the most bytes its tensors
reached during it (`dmd2.memory.LiveBytes`, on the real tensors). The largest over the iterations is the measured
peak; the estimate is `dmd2.memory.estimate` for the same settings, built from the teacher's config alone. With no
`--experiment`, runs the tiny cases below. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CASES = [("mnist", []), ("mnist-ddpm", []), ("sdxl-tiny", ["distill.lora.enabled=true"]),
         ("sdxl-tiny", ["distill.mixed_precision=bf16", "distill.gradient_checkpointing=true"])]

HOOK = textwrap.dedent('''
    import gc, json, os
    import torch
    import dmd2.distill as distill
    from dmd2.memory import LiveBytes

    RECORD = {"peak": 0, "iterations": 0}

    def live_tensor_bytes():
        storages = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:  # by storage: views count once
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    train_step = distill.DMD2Trainer.train_step

    def measured_train_step(self, step, batch):
        start, tracker = live_tensor_bytes(), LiveBytes()
        with tracker:
            metrics = train_step(self, step, batch)
        RECORD["peak"] = max(RECORD["peak"], start + tracker.peak)
        RECORD.setdefault("steps", []).append([start, tracker.peak])
        RECORD["iterations"] += 1
        with open(os.environ["DMD2_MEMORY_OUT"], "w") as f:
            json.dump(RECORD, f)
        return metrics

    distill.DMD2Trainer.train_step = measured_train_step
''')


def dmd2(root: Path, *args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "dmd2.cli", *args, "--params", str(root / "params.yaml"), "--root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def measure(experiment: str, overrides: list[str], iterations: int = 2) -> dict[str, float]:
    """The measured peak and the estimate, in bytes, of `experiment` with `overrides` on one CPU process."""
    from dmd2.config import apply_override, load_params
    from dmd2.memory import estimate, teacher_config

    with tempfile.TemporaryDirectory() as tmp:
        root, hooks = Path(tmp) / "project", Path(tmp) / "hooks"
        root.mkdir()
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(HOOK)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        params["experiment"] = experiment
        block = params[experiment]
        if block["teacher"].get("source", "train") == "train" and "pretrained" not in block["teacher"]:
            block["teacher"].update(steps=1, checkpoint_every=1)
        block["distill"].update(steps=iterations, checkpoint_every=iterations)
        for assignment in overrides:
            apply_override(params, assignment, experiment)
        block["launch"] = {"processes_per_machine": 1}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = Path(tmp) / "measured.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "DMD2_MEMORY_OUT": str(out),
               "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        for stage in ("prepare-data", "teacher", "launch-config", "distill"):
            dmd2(root, stage, env=env)
        measured = json.loads(out.read_text())
        exp = load_params(root / "params.yaml").current(experiment)
        estimated = estimate(exp, teacher_config(exp, root / "models" / experiment / "teacher", root), processes=1)
        return {"measured": measured["peak"], "estimated": estimated.peak(), "micro_batch": estimated.micro_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default=None, help="a params.yaml block (default: the tiny cases)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE of that block")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()
    cases = [(args.experiment, args.overrides)] if args.experiment else CASES
    print(f"{'experiment':12s} {'settings':62s} {'measured MiB':>12s} {'estimated MiB':>14s} {'error':>7s}")
    for experiment, overrides in cases:
        r = measure(experiment, overrides, args.iterations)
        error = r["estimated"] / r["measured"] - 1
        settings = ", ".join(overrides) or "as in params.yaml"
        print(f"{experiment:12s} {settings:62s} {r['measured'] / 2**20:12.2f} {r['estimated'] / 2**20:14.2f} "
              f"{error:+7.1%}", flush=True)


if __name__ == "__main__":
    main()
