"""Snakemake and DVC describe the same DAG, and both really run it with the expected caching behaviour."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from tiny import write_tiny_params

LOG_REDIRECT = " > {log} 2>&1"


def snakemake_stages(workdir: Path = REPO) -> dict[str, dict]:
    """Rules as Snakemake itself parses them (through its API, not by reading the text)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(),
                                    storage_settings=StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        rules = workflow_api._workflow.rules  # the parsed rules; there is no public accessor
        return {
            r.name: {"cmd": r.shellcmd.replace(LOG_REDIRECT, ""), "deps": sorted(r.input), "outs": sorted(r.output),
                     "params": sorted(json.dumps(v, sort_keys=True) for v in r.params)}
            for r in rules if r.name != "all"
        }


def dvc_stages(workdir: Path = REPO) -> dict[str, dict]:
    params = yaml.safe_load((workdir / "params.yaml").read_text())

    def resolve(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: str(params[m.group(1)]), text)

    def lookup(dotted: str):
        node = params
        for part in dotted.split("."):
            node = node[part]
        return node

    def names(entries) -> list[str]:
        return [resolve(next(iter(e)) if isinstance(e, dict) else e) for e in entries]

    stages = yaml.safe_load((workdir / "dvc.yaml").read_text())["stages"]
    return {
        name: {"cmd": resolve(s["cmd"]), "deps": sorted(names(s.get("deps", []))),
               "outs": sorted(names(s.get("outs", [])) + names(s.get("metrics", []))),
               "params": sorted(json.dumps(lookup(resolve(p)), sort_keys=True) for p in s.get("params", []))}
        for name, s in stages.items()
    }


def test_snakemake_and_dvc_describe_the_same_dag():
    smk, dvc = snakemake_stages(), dvc_stages()
    assert sorted(smk) == sorted(dvc)
    for name in smk:
        assert smk[name] == dvc[name], name


# ------------------------------------------------------------------------------------------ real runs


def project_copy(dest: Path) -> Path:
    dest.mkdir()
    for item in ("Snakefile", "dvc.yaml", "workflow"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    write_tiny_params(dest)
    return dest


def sh(cwd: Path, *cmd: str, timeout: int = 900) -> tuple[str, float]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output, time.time() - start


def change_distill_steps(root: Path) -> None:
    write_tiny_params(root, distill={"steps": 7})


SNAKEMAKE = ("snakemake", "--cores", "2", "--workflow-profile", "workflow/profiles/default")
ALL_STAGES = {"prepare_data", "teacher", "launch_config", "distill", "fid_reference", "evaluate", "report"}
DOWNSTREAM_OF_DISTILL = {"distill", "evaluate", "report"}


def snakemake_ran(output: str) -> set[str]:
    return set(re.findall(r"\(Rule: (\w+)\)", output)) - {"all"}  # "Finished jobid: 3 (Rule: teacher)"


@pytest.mark.integration
def test_snakemake_runs_caches_and_reruns_only_what_changed(tmp_path):
    root = project_copy(tmp_path / "smk")
    out, _ = sh(root, *SNAKEMAKE)
    assert snakemake_ran(out) == ALL_STAGES
    assert (root / "results/mnist/report.html").exists() and (root / "results/mnist/metrics.json").exists()

    out, seconds = sh(root, *SNAKEMAKE)
    assert "Nothing to be done" in out and seconds < 15, (seconds, out[-2000:])

    change_distill_steps(root)
    out, _ = sh(root, *SNAKEMAKE)
    assert snakemake_ran(out) == DOWNSTREAM_OF_DISTILL
    assert snakemake_stages(root) == dvc_stages(root)


@pytest.mark.integration
def test_dvc_repro_runs_caches_and_reruns_only_what_changed(tmp_path):
    root = project_copy(tmp_path / "dvc")
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    out, _ = sh(root, "dvc", "repro")
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == ALL_STAGES
    metrics, _ = sh(root, "dvc", "metrics", "show", "--json")
    assert "results/mnist/metrics.json" in metrics

    out, seconds = sh(root, "dvc", "repro")
    assert "up to date" in out and not re.findall(r"Running stage", out) and seconds < 15, (seconds, out)

    change_distill_steps(root)
    out, _ = sh(root, "dvc", "repro")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == DOWNSTREAM_OF_DISTILL
    dag, _ = sh(root, "dvc", "dag", "--md")
    for stage in ALL_STAGES:
        assert stage in dag
