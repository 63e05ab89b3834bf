"""Is a distillation setting better than another over seeds, not on one? Distill and evaluate each setting on
several seeds against one teacher, and print each setting's mean and spread.

    python benchmarks/distill_seeds.py --project . --seeds 0,1,2,3 --parallel 2 \\
        base "ratio-3=distill.dfake_gen_update_ratio=3" "critic-4e-4=distill.critic_lr=4e-4"

A setting is `NAME` (the experiment as it is) or `NAME=KEY=VALUE[,KEY=VALUE...]`. `--project` is a project
directory whose experiment already has its data, teacher and FID reference (`snakemake models/mnist/fid_reference`
or a default run). Each (setting, seed) runs the real `dmd2 distill` and `dmd2 evaluate` in its own directory under
`--workdir`, which links to the project's inputs, so the project itself is not touched; `--parallel` runs that many
at once (on a GPU, several small runs share it well). A setting whose parameters enable `regression` (the
experiment's own, as `fashion`'s, or `regression.enabled=true`) runs the regression stage first. The project's
finished teacher pairs (`work/<exp>/regression/pairs/run-*`, for the regression stage or
`distill.regression_weight`) are linked into every run rather than sampled again in each, and its regression runs
(`work/<exp>/regression/train/run-*`) are copied into every run (the stage resumes a run with its settings, so the
seeds of a setting regress once, in the project, not once each; copied because the stage locks and writes its run
directory); pairs or regression settings that differ from the project's are sampled and trained in the run's own
directory. Every finished run appends a line to `--workdir/runs.jsonl`
and prints it; the summary at the end gives, per setting, the mean ± standard deviation over seeds of the student's
proxy FID and of its paired difference to the teacher, the class accuracy, and the mean FID-versus-iteration curve.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dmd2.config import ConfigError, load_params

INPUTS = ("data", "models/{e}/teacher", "models/{e}/fid_reference")
PAIRS = "work/{e}/regression/pairs"  # the project's finished teacher pairs, linked: sampled once for every run
REGRESSIONS = "work/{e}/regression/train"  # the project's regression runs, copied: the stage resumes a matching one


def parse_setting(text: str) -> tuple[str, list[str]]:
    name, _, sets = text.partition("=")
    return name, [s for s in re.split(r",(?=[\w.]+=)", sets) if s]  # a comma inside a value ([0.0, 0.99]) stays


def run_one(project: Path, workdir: Path, experiment: str, name: str, sets: list[str], seed: int) -> dict:
    """Distill and evaluate one (setting, seed) in its own directory; return its figures."""
    run_dir = workdir / f"{name}-seed{seed}"
    pair_runs = [p.parent.relative_to(project) for p in (project / PAIRS.format(e=experiment)).glob("run-*/pairs.lmdb")]
    for relative in (*INPUTS, *map(str, pair_runs)):
        link = run_dir / relative.format(e=experiment)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((project / relative.format(e=experiment)).resolve())
    for regression in (project / REGRESSIONS.format(e=experiment)).glob("run-*"):
        copy = run_dir / regression.relative_to(project)
        if not copy.exists():
            shutil.copytree(regression, copy, ignore=shutil.ignore_patterns("LOCK"))
    params = run_dir / "params.yaml"
    params.write_text((project / "params.yaml").read_text())
    options = ["--experiment", experiment, "--params", str(params), "--root", str(run_dir)]
    options += [f"--set={s}" for s in [*sets, f"distill.seed={seed}"]]
    cli = [sys.executable, "-c", "from dmd2.cli import main; main()"]
    with open(run_dir / "log.txt", "w") as log:
        regressed = load_params(params, sets, experiment).current(experiment).regression.enabled
        for stage in ("regression", "distill", "evaluate") if regressed else ("distill", "evaluate"):
            if subprocess.run([*cli, stage, *options], stdout=log, stderr=subprocess.STDOUT, cwd=run_dir).returncode:
                last = (run_dir / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"{name} seed {seed}: {stage} failed ({last[0]}); its log: {run_dir / 'log.txt'}")
    evaluation = json.loads((run_dir / "results" / experiment / "evaluation.json").read_text())
    curve_files = sorted((run_dir / "work" / experiment / "distill").glob("run-*/fid_curve.jsonl"))
    curve = [json.loads(line) for line in curve_files[-1].read_text().splitlines()] if curve_files else []
    rows = evaluation["rows"]
    student = next(r for r in rows if r["model"] == "student")
    teacher = max((r for r in rows if r["model"] == "teacher"), key=lambda r: r["nfe"])
    comparison = evaluation["student_vs_full_teacher"]
    stage = run_dir / "models" / experiment / "student" / "stage.json"
    return {"setting": name, "sets": sets, "seed": seed,
            "teacher_fid": teacher["fid"], "student_fid": student["fid"], "student_fid_std": student["fid_std"],
            "difference": comparison["fid_difference"], "difference_std": comparison["fid_difference_std"],
            "class_accuracy": student["class_accuracy"], "teacher_class_accuracy": teacher["class_accuracy"],
            **{f"{kind}_{key}": row.get(key) for kind, row in (("student", student), ("teacher", teacher))
               for key in ("precision", "recall", "class_coverage", "class_coverage_min")},
            "distill_seconds": json.loads(stage.read_text()).get("wall_s") if stage.exists() else None,
            "curve": {row["step"]: row["fid"] for row in curve}}


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def summarise(rows: list[dict]) -> None:
    print("\nsetting            seeds  student FID      student − teacher  class acc.  recall (teacher)  "
          "mean curve (iteration: FID)")
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == name]
        steps = sorted({int(s) for r in mine for s in r["curve"]})
        curve = "  ".join(f"{s}: {statistics.fmean(r['curve'][s] for r in mine if s in r['curve']):.2f}"
                          for s in steps)
        recall = (f"{statistics.fmean(r['student_recall'] for r in mine):.3f} "
                  f"({statistics.fmean(r['teacher_recall'] for r in mine):.3f})")
        print(f"{name:18s} {len(mine):5d}  {mean_sd([r['student_fid'] for r in mine]):15s}  "
              f"{mean_sd([r['difference'] for r in mine]):17s}  {statistics.fmean(r['class_accuracy'] for r in mine):.3f}"
              f"       {recall:16s}  {curve}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="NAME or NAME=KEY=VALUE[,KEY=VALUE...]")
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--experiment", default="mnist")
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0, 1, 2, 3],
                        help="distillation seeds, comma-separated (default 0,1,2,3)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dmd2-seeds"))
    args = parser.parse_args()
    for relative in INPUTS:
        if not (args.project / relative.format(e=args.experiment)).exists():
            raise SystemExit(f"{args.project / relative.format(e=args.experiment)} is missing: run the experiment's "
                             f"data, teacher and fid-reference stages in {args.project} first")
    settings = [parse_setting(s) for s in args.settings]
    for name, sets in settings:  # a misspelt key fails now, not after the other settings' runs
        try:
            load_params(args.project / "params.yaml", sets, args.experiment)
        except ConfigError as err:
            raise SystemExit(f"setting {name}: {err}") from None
    args.workdir.mkdir(parents=True, exist_ok=True)
    jobs = [(name, sets, seed) for name, sets in settings for seed in args.seeds]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")

    def job(spec: tuple[str, list[str], int]) -> dict | None:
        try:
            row = run_one(args.project, args.workdir, args.experiment, *spec)
        except RuntimeError as failure:  # one failed run does not stop the others or the summary
            print(failure, flush=True)
            return None
        with open(args.workdir / "runs.jsonl", "a") as out:
            out.write(json.dumps(row) + "\n")
        print(f"{row['setting']} seed {row['seed']}: student {row['student_fid']:.3f} (teacher {row['teacher_fid']:.3f}), "
              f"student − teacher {row['difference']:+.3f} ± {row['difference_std']:.3f}, class accuracy "
              f"{row['class_accuracy']:.3f} ({row['teacher_class_accuracy']:.3f}), precision {row['student_precision']}, "
              f"recall {row['student_recall']} ({row['teacher_recall']}), coverage {row['student_class_coverage']}",
              flush=True)
        return row

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = [row for row in pool.map(job, jobs) if row is not None]
    summarise(rows)


if __name__ == "__main__":
    main()
