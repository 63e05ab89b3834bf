"""Peak host memory per rank of a 2-process FSDP2 distillation, with and without meta-device initialisation.

    python benchmarks/fsdp_memory.py [--channels 96] [--iterations 2] [--experiment sdxl-tiny] [--set KEY=VALUE]

Builds a throwaway project in a temporary folder: the embedded MNIST data, a teacher of the experiment's
architecture with `--channels` base channels (one training step: only its size matters here), then runs
`dmd2 distill` on 2 CPU processes with FULL_SHARD twice:

- "meta init" (what `dmd2 distill` does): every rank builds the networks on the meta device, shards them, and rank 0
  alone reads the teacher's weights and broadcasts each shard;
- "full copies per rank" (what it did before): every rank loads the teacher and deep-copies it into the generator
  and the critic before sharding.

Each rank's peak resident set size (`ru_maxrss`) is recorded by a `sitecustomize` hook on the subprocesses' path
twice: when the networks are built and sharded (at the first iteration), which is what meta-device initialisation
changes, and over the whole run, where training (activations, optimiser moments, FSDP's gathered units) sets the
peak on a network this small. Both include the Python/torch runtime, the same in both rows. Prints figures; asserts
nothing.
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

from dmd2.config import apply_override

REPO = Path(__file__).resolve().parents[1]

HOOK = textwrap.dedent('''
    import atexit, json, os, resource

    PEAKS = {}

    def _peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def _report():
        rank = os.environ.get("RANK")
        if rank is not None and os.environ.get("DMD2_MEMORY_OUT"):
            with open(os.path.join(os.environ["DMD2_MEMORY_OUT"], f"rank-{rank}.json"), "w") as f:
                json.dump({"rank": int(rank), **PEAKS, "run_kb": _peak()}, f)

    atexit.register(_report)
    if os.environ.get("RANK") is not None:
        import dmd2.distill as distill

        first_step = distill.DMD2Trainer.train_step

        def train_step(self, *args, **kwargs):
            PEAKS.setdefault("set_up_kb", _peak())  # everything built and sharded, nothing trained yet
            return first_step(self, *args, **kwargs)

        distill.DMD2Trainer.train_step = train_step
    if os.environ.get("DMD2_FULL_COPIES") and os.environ.get("RANK") is not None:
        # the earlier behaviour: every rank loads the teacher, the generator and critic are deep copies of it
        import dmd2.distill as distill

        real_load = distill.load_model
        distill.load_model = lambda path, device="cpu", weights=True, data_dir=None: real_load(path, device, True,
                                                                                            data_dir)
        distill.full_weights = lambda net: None
''')


def dmd2(root: Path, *args: str, env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "dmd2.cli", *args, "--params", str(root / "params.yaml"), "--root", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=96, help="teacher.unet.channels (the network's width)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--experiment", default=None, help="another params.yaml block (default: `experiment:`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="distill.KEY=VALUE for the distill stage, e.g. distill.lora.enabled=true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root, hooks = Path(tmp) / "project", Path(tmp) / "hooks"
        root.mkdir()
        hooks.mkdir()
        (hooks / "sitecustomize.py").write_text(HOOK)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        exp = params["experiment"] = args.experiment or params["experiment"]
        block = params[exp]
        trained_here = block["teacher"].get("family", "edm") == "edm"
        if trained_here:  # a teacher of the chosen width, trained one step (only its size matters)
            block["teacher"].update(steps=1, checkpoint_every=1)
            block["teacher"].setdefault("unet", {})["channels"] = args.channels
        block["distill"].update(steps=args.iterations, checkpoint_every=args.iterations, batch_size=8)
        for assignment in args.overrides:
            apply_override(params, assignment, exp)
        block["launch"] = {"distributed": "fsdp", "processes_per_machine": 2}
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        dmd2(root, "prepare-data", env=env)
        dmd2(root, "teacher", env=env)
        dmd2(root, "launch-config", env=env)
        teacher = root / "models" / exp / "teacher"
        config = json.loads((teacher / "config.json").read_text())
        if "pretrained" in config:  # recorded by reference
            size = sum(f["size"] for f in config["pretrained"]["files"].values())
        else:
            size = (teacher / "model.safetensors").stat().st_size
        what = f"{args.channels} base channels" if trained_here else config["source"]["name"]
        print(f"experiment {exp}: teacher {what}, {size / 2**20:.1f} MiB of weights; 2 processes, FSDP2 "
              f"FULL_SHARD, {args.iterations} iterations{' (' + ', '.join(args.overrides) + ')' if args.overrides else ''}")
        for label, extra in (("meta init (now)", {}), ("full copies per rank (before)", {"DMD2_FULL_COPIES": "1"})):
            out = Path(tmp) / label.split()[0]
            out.mkdir()
            for stale in (root / "work", root / "models" / exp / "student"):
                subprocess.run(["rm", "-rf", str(stale)], check=True)
            dmd2(root, "distill", env={**env, **extra, "DMD2_MEMORY_OUT": str(out)})
            ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank-*.json")), key=lambda r: r["rank"])
            set_up = ", ".join(f"rank {r['rank']} {r['set_up_kb'] / 2**20:.2f}" for r in ranks)
            run = ", ".join(f"rank {r['rank']} {r['run_kb'] / 2**20:.2f}" for r in ranks)
            print(f"  {label:30s} peak RSS (GiB) when set up: {set_up}; over the run: {run}")


if __name__ == "__main__":
    main()
