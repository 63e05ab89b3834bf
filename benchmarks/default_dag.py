"""Wall time of every stage of an experiment's DAG on this machine (CPU or GPU), and the evaluated images/s.

    python benchmarks/default_dag.py [--experiment mnist] [--workdir /tmp/dmd2-dag] [--set distill.steps=500]

Runs the stages in order through the real CLI (prepare-data, teacher, distill, fid-reference, evaluate, report) in
a scratch project directory with the repository's params.yaml, so nothing under this checkout changes, then
prints each stage's wall time (from its stage.json) and each evaluated model's throughput. Snakemake is not needed;
the stages and their order are the DAG's. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = [("prepare-data", "data/{e}"), ("teacher", "models/{e}/teacher"), ("distill", "models/{e}/student"),
          ("fid-reference", "models/{e}/fid_reference"), ("evaluate", "results/{e}"), ("report", None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--workdir", default="/tmp/dmd2-dag")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    from click.testing import CliRunner

    from dmd2.cli import main as cli

    root = Path(args.workdir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"experiment {args.experiment} on {device}")
    total = time.time()
    for stage, out in STAGES:
        started = time.time()
        options = ["--experiment", args.experiment, "--params", str(root / "params.yaml"), "--root", str(root)]
        options += [f"--set={o}" for o in args.overrides]
        result = CliRunner().invoke(cli, [stage, *options], catch_exceptions=False)
        if result.exit_code != 0:
            raise SystemExit(f"{stage} failed:\n{result.output[-3000:]}")
        record = root / out.format(e=args.experiment) / "stage.json" if out else None
        wall = json.loads(record.read_text())["wall_s"] if record and record.exists() else time.time() - started
        print(f"  {stage:14s} {wall:8.1f} s")
    print(f"  {'all':14s} {time.time() - total:8.1f} s")
    evaluation = json.loads((root / "results" / args.experiment / "evaluation.json").read_text())
    for row in evaluation["rows"]:
        print(f"  {row['model']:8s} {row['setting']:32s} FID {row['fid']:.3f}  {row['images_per_s']:,.0f} images/s "
              f"(batch {row['batch_size']}), {row['latency_ms']:.1f} ms at batch 1")


if __name__ == "__main__":
    main()
