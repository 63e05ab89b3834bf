# Shared helpers: params.yaml validated by dmd2's own code, the experiment it picks, and its per-stage blocks.
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError

from dmd2.config import ConfigError, check_experiment_name, parse_params
from dmd2.slurm import snakemake_resources
from dmd2.paths import ExperimentPaths
from dmd2.stage import STAGE_PARAMS, stage_code, stage_settings, write_code_manifests


def _changed_beyond_experiment():
    """The top-level keys of params.yaml that --config/--configfile changed, other than `experiment`."""
    on_disk = yaml.safe_load(Path("params.yaml").read_text()) or {}
    return sorted(k for k in set(config) | set(on_disk) if k != "experiment" and config.get(k) != on_disk.get(k))


# Every stage reads params.yaml itself (as `dmd2 <stage>` and `dvc repro` do): a setting changed only in Snakemake's
# config would not reach it, and the settings records would call every run out of date.
if _changed_beyond_experiment():
    raise WorkflowError(f"\nsnakemake --config changed {', '.join(_changed_beyond_experiment())} of params.yaml, but "
                        "every stage reads params.yaml itself, so the change would not reach them. Edit params.yaml "
                        "(or run `dvc exp run -S KEY=VALUE`); --config is for experiment=NAME only.")

# The same validation and messages as `dmd2 <stage>`, before any job runs or any output is touched: a typo in
# params.yaml (or in --config experiment=…) stops `snakemake -n` with the key path and the closest valid key.
try:
    PARAMS = parse_params(dict(config), "params.yaml (with snakemake --config)")
    EXP = check_experiment_name(config["experiment"], "--config experiment")
    PARAMS.current(EXP)
except ConfigError as err:
    raise WorkflowError(f"\n{err}") from None


def stage_params(stage):
    """The params.yaml blocks a stage reads (dmd2.stage.STAGE_PARAMS), as the rule's `params:`: a change reruns it.
    A block left out of params.yaml is {} (its defaults)."""

    def lookup(path):
        node = config[EXP]
        for part in filter(None, path.split(".")):
            node = (node or {}).get(part, {})
        return node

    return {path.replace(".", "_") or "experiment": lookup(path) for path in STAGE_PARAMS[stage]}


def settings_stamp(stage):
    """An input file of the rule that is made newer than the stage's outputs when its stage.json says they were
    made with other settings than params.yaml's (by `dvc exp run -S …`, or a hand-run `dmd2 <stage> --set …`):
    Snakemake's own records know only its own runs, so without this it would call those outputs up to date.
    Created old (mtime 0), it triggers nothing by itself; the stage's rerun writes a matching stage.json."""
    stamp = Path(f"work/{EXP}/settings/{stage}.json")
    current = stage_settings(PARAMS.current(EXP), stage)
    record_file = ExperimentPaths(EXP).stage_record(stage.replace("_", "-"))
    try:
        recorded = json.loads(record_file.read_text()).get("settings")
    except (OSError, ValueError):
        recorded = None  # no outputs yet (or a record from before settings were recorded): nothing to compare
    if recorded is not None and recorded != current:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"params.yaml": current, "outputs were made with": recorded}, indent=1))
    elif not stamp.exists():
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"params.yaml": current}, indent=1))
        os.utime(stamp, (0, 0))
    return str(stamp)


def logged(command):
    """A rule's shell command (one simple command) with its output in the rule's log. On a terminal (`make run`, or
    `snakemake` typed at a prompt) the output is shown there too as it comes (unbuffered), the stage's progress lines
    with it; elsewhere (a Slurm job, CI, a pipe) the log alone gets it, so no tee can die under a stage that a job's
    signals reach. `tee -i` outlives a Ctrl-C while the stage writes its checkpoint; `pipefail` keeps the stage's
    exit status (Snakemake's shell is bash)."""
    return (f"if [ -t 1 ]; then set -o pipefail; PYTHONUNBUFFERED=1 {command} 2>&1 | tee -i {{log:q}}; "
            f"else {command} > {{log:q}} 2>&1; fi")


def code(stage):
    """The package files a stage runs: inputs, so that editing e.g. the losses reruns distillation
    (dmd2.stage.stage_code follows the stage's imports). Of the families, only the experiment's own files: editing
    another family reruns nothing here. dvc.yaml cannot pick files by the experiment's family (DVC resolves no
    nested `${…}`): its stages depend on the same files through the manifests its `code` stage writes
    (dmd2.stage.write_code_manifests; tests/test_dag.py checks both)."""
    return stage_code(stage, workflow.basedir, [PARAMS.current(EXP).teacher.family])


def slurm(stage):
    """The stage's Slurm job, from `slurm:` in params.yaml (dmd2.slurm; local runs ignore it)."""
    return snakemake_resources(PARAMS.current(EXP), stage)


def heavy_threads(stage):
    """Torch stages take every core of a local run (two side by side oversubscribe the cores and thrash);
    a cluster job gets its stage's slurm.<stage>.cpus, the same number on the submit host and inside the job."""
    if workflow.non_local_exec or workflow.remote_exec:
        return getattr(PARAMS.current(EXP).slurm, stage).cpus
    try:
        return workflow.cores
    except WorkflowError:  # a dry run without --cores
        return 1


def record_in_dvc_lock():
    """One record for both front-ends: after a successful run, `dvc commit` writes what Snakemake built (the
    hashes of code, parameters and outputs) into dvc.lock, so that `dvc status` agrees and `dvc repro` reruns
    nothing. Only when the run used params.yaml as it is (dvc.yaml reads the experiment and its blocks from the
    file, so a `--config` override would be recorded as something it is not)."""
    if not Path(".dvc").is_dir() or shutil.which("dvc") is None:
        return
    if dict(config) != yaml.safe_load(Path("params.yaml").read_text()):
        print("dvc.lock not updated: this run's --config differs from params.yaml, which DVC reads")
        return
    # the stages this run built or found up to date: a run of one target leaves the others as they were, built or
    # not, and DVC must not be told they match params.yaml (DVC's stages are the rules)
    built = sorted({job.rule.name for job in workflow.dag.jobs} - {"all"})
    if not built:
        return
    # DVC's stages depend on their code manifests (its `code` stage; Snakemake's rules read the files directly)
    write_code_manifests(ExperimentPaths(EXP, Path(".")), PARAMS.current(EXP).teacher.family)
    built = ["code", *built]
    done = subprocess.run(["dvc", "commit", "--force", *built], capture_output=True, text=True)
    if done.returncode == 0:
        print(f"dvc.lock records this run ({', '.join(built)}): `dvc status` and `dvc repro` agree with Snakemake")
    else:
        print(f"note: `dvc commit` failed, so DVC does not know of this run: {(done.stderr or done.stdout).strip()}")
