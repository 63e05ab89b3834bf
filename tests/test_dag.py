"""Snakemake and DVC describe the same DAG, and both really run it with the expected caching behaviour."""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from tiny import write_tiny_params

LOGGED = re.compile(r"if \[ -t 1 \]; then set -o pipefail; PYTHONUNBUFFERED=1 (.+) 2>&1 \| tee -i \{log:q\}; "
                    r"else \1 > \{log:q\} 2>&1; fi")


def unlogged(shellcmd: str) -> str:
    """The stage command inside a rule's `logged(...)` shell (workflow/rules/common.smk)."""
    match = LOGGED.fullmatch(shellcmd)
    assert match, f"not a logged(...) command: {shellcmd}"
    return match.group(1)


def snakemake_stages(workdir: Path = REPO, experiment: str | None = None) -> dict[str, dict]:
    """Rules as Snakemake itself parses them (through its API, not by reading the text); `experiment` as
    `--config experiment=…` gives it."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings, StorageSettings

    config = ConfigSettings(config={"experiment": experiment}) if experiment else ConfigSettings()
    with SnakemakeApi(OutputSettings()) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(), config_settings=config,
                                    storage_settings=StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        workflow = workflow_api._workflow  # the parsed rules; there is no public accessor
        exp = workflow.globals["EXP"]
        return {
            # the settings stamps (work/<exp>/settings/) are Snakemake's own: DVC compares params with dvc.lock
            r.name: {"cmd": unlogged(r.shellcmd).replace("{EXP}", exp),
                     "deps": sorted(f for f in r.input if not f.startswith(f"work/{exp}/settings/")),
                     "outs": sorted(r.output),
                     "params": sorted(json.dumps(v, sort_keys=True) for v in r.params)}
            for r in workflow.rules if r.name != "all"
        }


def dvc_stages(workdir: Path = REPO, experiment: str | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with `${…}` resolved from params.yaml (`experiment` as `dvc exp run -S experiment=…`)."""
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    if experiment:
        params["experiment"] = experiment

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


@pytest.mark.parametrize("experiment", ["mnist", "mnist-ddpm", "mnist-flow", "fashion", "cifar10", "cifar10-edm", "imagenet64",
                                        "sd-tiny", "sdxl-tiny", "sdxl-tiny-1step", "sdv15", "sdxl",
                                        "sdxl-1step", "sd3-tiny", "flux-tiny", "sd35", "flux"])
def test_snakemake_and_dvc_describe_the_same_dag(experiment):
    assert_same_dag(snakemake_stages(experiment=experiment), dvc_stages(experiment=experiment), experiment)


def assert_same_dag(smk: dict[str, dict], dvc: dict[str, dict], experiment: str, workdir: Path = REPO) -> None:
    from dmd2.config import load_params
    from dmd2.stage import stage_code

    family = load_params(workdir / "params.yaml", experiment=experiment).current(experiment).teacher.family
    assert sorted(smk) == sorted(set(dvc) - {"code"})  # DVC's `code` stage writes the manifests below
    assert dvc["code"]["outs"] == [f"configs/{experiment}/code"]
    for name in smk:
        # DVC's command reads the experiment from params.yaml (no params.yaml value reaches its shell); Snakemake's
        # names it, as `--config experiment=…` may differ from params.yaml
        assert smk[name]["cmd"] == dvc[name]["cmd"] + f" --experiment {experiment}", name
        # code: Snakemake's rule depends on the experiment's family's files only; DVC's stage on its manifest of
        # the same files (dmd2.stage.code_manifest)
        own = stage_code(name, workdir, [family])
        manifest = f"configs/{experiment}/code/{name}.json"
        assert [f for f in smk[name]["deps"] if f.startswith("src/")] == own, name
        assert not any("families/" in f and f not in own for f in smk[name]["deps"]), name
        assert not any(f.startswith("src/") for f in dvc[name]["deps"]) and manifest in dvc[name]["deps"], name
        strip = {**smk[name], "cmd": None, "deps": [f for f in smk[name]["deps"] if not f.startswith("src/")]}
        assert strip == {**dvc[name], "cmd": None, "deps": [f for f in dvc[name]["deps"] if f != manifest]}


def test_every_stage_depends_on_the_package_code_it_runs():
    """Editing the losses reruns distillation (and what follows), not the data or the teacher; dvc.yaml lists
    exactly the files each stage's module reaches (if this fails, copy the printed list into dvc.yaml)."""
    from dmd2.stage import STAGE_MODULES, stage_code

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    every = sorted(set().union(*(stage_code(stage, REPO) for stage in STAGE_MODULES)))
    assert dvc["code"]["deps"] == every, f"dvc.yaml's code stage should list {every}"
    for stage in STAGE_MODULES:
        assert f"configs/${{experiment}}/code/{stage}.json" in dvc[stage]["deps"], stage
    assert "src/dmd2/losses.py" in stage_code("distill", REPO)
    assert "src/dmd2/losses.py" not in stage_code("teacher", REPO) + stage_code("prepare_data", REPO)
    assert "src/dmd2/families/edm.py" in stage_code("evaluate", REPO)



def test_code_manifests_hash_the_files_each_stage_runs_for_the_experiment_s_family(tmp_path):
    """What DVC's `code` stage writes: per stage, the hashes of stage_code's files for the family. Editing a file
    rewrites the manifests of the stages that run it; another family's file, or nothing changed, rewrites none."""
    from dmd2.paths import ExperimentPaths
    from dmd2.stage import STAGE_MODULES, stage_code, write_code_manifests

    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    paths = ExperimentPaths("mnist", tmp_path)

    def contents() -> dict[str, str]:
        return {stage: paths.code_manifest(stage).read_text() for stage in STAGE_MODULES}

    assert write_code_manifests(paths, "edm") == [paths.code_manifest(stage) for stage in STAGE_MODULES]
    for stage in STAGE_MODULES:
        manifest = json.loads(paths.code_manifest(stage).read_text())
        assert sorted(manifest["files"]) == stage_code(stage, tmp_path, ["edm"]) and manifest["family"] == "edm"
    before, mtimes = contents(), {s: paths.code_manifest(s).stat().st_mtime_ns for s in STAGE_MODULES}
    (tmp_path / "src/dmd2/families/flow.py").write_text("# another family's module\n")
    write_code_manifests(paths, "edm")
    assert contents() == before and {s: paths.code_manifest(s).stat().st_mtime_ns for s in STAGE_MODULES} == mtimes
    (tmp_path / "src/dmd2/losses.py").write_text("# the losses, edited\n")
    write_code_manifests(paths, "edm")
    changed = {stage for stage, text in contents().items() if text != before[stage]}
    assert changed == {stage for stage in STAGE_MODULES if "src/dmd2/losses.py" in stage_code(stage, tmp_path, ["edm"])}
    assert "distill" in changed and "teacher" not in changed
    write_code_manifests(paths, "flow")  # another family: its own files
    assert "src/dmd2/families/flow.py" in json.loads(paths.code_manifest("teacher").read_text())["files"]

def test_dvc_reruns_each_stage_on_the_blocks_it_reads():
    """dvc.yaml's `params:` are dmd2.stage.STAGE_PARAMS (the Snakefile builds its rules' `params:` from the map, and
    the DAG test above compares the two front-ends value by value)."""
    from dmd2.stage import STAGE_PARAMS

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert sorted(dvc) == sorted([*STAGE_PARAMS, "code"])
    assert dvc["code"]["params"] == ["${experiment}.teacher.family"]  # the family picks the manifests' files
    for stage, blocks in STAGE_PARAMS.items():
        assert dvc[stage]["params"] == [f"${{experiment}}.{b}" if b else "${experiment}" for b in blocks], stage


def test_a_params_typo_stops_snakemake_before_anything_runs(tmp_path):
    """The Snakefile validates params.yaml with dmd2's own code: `snakemake -n` names the key and the fix."""
    root = project_copy(tmp_path / "typo", distill={"stpes": 3})
    proc = subprocess.run(["snakemake", "-n", "--cores", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "mnist.distill.stpes: unknown key; did you mean 'steps'?" in output, output[-3000:]
    write_tiny_params(root)
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", "experiment=nope"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "experiment: 'nope' has no block" in proc.stdout + proc.stderr
    # a setting given to Snakemake alone would not reach the stages, which read params.yaml: refused, with the fix
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--config", "mnist={distill: {steps: 7}}"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "snakemake --config changed mnist of params.yaml" in proc.stdout + proc.stderr
    assert "Edit params.yaml (or run `dvc exp run -S KEY=VALUE`)" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ real runs


def project_copy(dest: Path, **overrides: dict) -> Path:
    """A plain fresh clone of the project (what `git clone` of this working tree would give: tracked and
    untracked-but-not-ignored files, symlinks kept, one commit), with the tiny params. No `dvc init` or other
    set-up: the repository itself must be a working DVC and Snakemake project."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if name.startswith("results/"):
            continue  # a local run's committed-able figures (metrics.json …) are outputs, not part of a clone
        src, dst = REPO / name, dest / name
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree, not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst, follow_symlinks=False)
    write_tiny_params(dest, **overrides)
    # the clone's own identity: `dvc exp run` commits, and a machine's user may have none configured
    for command in (["init", "-q"], ["config", "user.name", "dmd2 tests"], ["config", "user.email", "tests@dmd2.invalid"],
                    ["add", "-A"], ["commit", "-q", "-m", "fresh clone"]):
        subprocess.run(["git", *command], cwd=dest, check=True, capture_output=True)
    return dest


def sh(cwd: Path, *cmd: str, timeout: int = 900) -> tuple[str, float]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output, time.time() - start


def _leaves(node) -> list:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    return [node]


def change_distill_steps(root: Path) -> None:
    write_tiny_params(root, distill={"steps": 7})


SNAKEMAKE = ("snakemake", "--cores", "2", "--workflow-profile", "workflow/profiles/default")
ALL_STAGES = {"prepare_data", "teacher", "regression", "launch_config", "distill", "fid_reference", "evaluate",
              "report"}
DVC_STAGES = ALL_STAGES | {"code"}  # DVC's own: it writes the code manifests (dmd2.stage.write_code_manifests)
DOWNSTREAM_OF_DISTILL = {"distill", "evaluate", "report"}


def snakemake_ran(output: str) -> set[str]:
    return set(re.findall(r"\(Rule: (\w+)\)", output)) - {"all"}  # "Finished jobid: 3 (Rule: teacher)"


def planned_by_snakemake(root: Path) -> set[str]:
    """The rules `snakemake -n` would run."""
    out, _ = sh(root, *SNAKEMAKE, "-n")
    if "Nothing to be done" in out:
        return set()
    return set(re.findall(r"^(\w+)\s+\d+$", out.split("Job stats:")[1], re.M)) - {"all", "total"}


def at_a_terminal(cwd: Path, *cmd: str, timeout: int = 600) -> str:
    """What `cmd` prints when its output is a terminal (a pseudo-terminal here), as `make run` typed at a prompt."""
    import threading

    controller, terminal = os.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal's other end closed: the command and its children are done
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.kill()  # a no-op once it has ended
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    reader.join(timeout=10)
    os.close(controller)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.integration
def test_at_a_terminal_each_stage_s_output_is_shown_and_logged_and_dvc_records_what_was_built(tmp_path):
    """`make run` at a prompt shows what the stages print (their progress lines with it) as well as logging it;
    a run of one target records that stage in dvc.lock (the others are not built, and DVC is not told they are)."""
    root = project_copy(tmp_path / "tty")
    shown = at_a_terminal(root, *SNAKEMAKE, "data/mnist")
    logged = (root / "logs/mnist/prepare_data.log").read_text()
    assert "wrote data/mnist/train.lmdb" in logged and "wrote data/mnist/train.lmdb" in shown
    assert "dvc.lock records this run (code, prepare_data)" in shown
    status, _ = sh(root, "dvc", "status", "prepare_data")
    assert "up to date" in status, status


@pytest.mark.integration
def test_snakemake_runs_caches_and_reruns_only_what_changed(tmp_path):
    root = project_copy(tmp_path / "smk")
    out, _ = sh(root, *SNAKEMAKE)
    assert snakemake_ran(out) == ALL_STAGES
    assert (root / "results/mnist/report.html").exists() and (root / "results/mnist/metrics.json").exists()

    # one record for both front-ends: Snakemake's run is in dvc.lock, so DVC has nothing to rerun
    assert "dvc.lock records this run" in out
    status, _ = sh(root, "dvc", "status")
    assert "up to date" in status, status

    out, seconds = sh(root, *SNAKEMAKE)
    assert "Nothing to be done" in out and seconds < 15, (seconds, out[-2000:])

    # another family's code is not this experiment's: editing it reruns nothing; editing its own family reruns
    for family, expected in (("flow", set()), ("stable_diffusion", set()), ("diffusers", set()), ("edm", ALL_STAGES)):
        module = root / f"src/dmd2/families/{family}.py"
        original = module.read_text()
        module.write_text(original + "\n# an edit\n")
        assert planned_by_snakemake(root) == expected, family
        module.write_text(original)
        os.utime(module, (0, 0))  # older than every output again

    # a student made by hand with other settings is not taken as up to date: its stage.json says what it was made
    # with, and Snakemake reruns distill (not only what reads the newer student)
    sh(root, "dmd2", "distill", "--set", "distill.steps=7")
    assert planned_by_snakemake(root) == DOWNSTREAM_OF_DISTILL

    change_distill_steps(root)
    out, _ = sh(root, *SNAKEMAKE)
    assert snakemake_ran(out) == DOWNSTREAM_OF_DISTILL
    assert_same_dag(snakemake_stages(root), dvc_stages(root), "mnist", root)
    out, _ = sh(root, "dvc", "repro")
    assert not re.findall(r"Running stage", out), out[-2000:]

    # Slurm resources are not results: a changed time limit reruns only the report (it prints the whole block)
    write_tiny_params(root, distill={"steps": 7}, slurm={"distill": {"runtime_minutes": 600}})
    assert planned_by_snakemake(root) == {"report"}


@pytest.mark.integration
def test_snakemake_runs_the_diffusers_experiment_and_reruns_distillation_when_the_losses_change(tmp_path):
    """`--config experiment=mnist-ddpm`: the same rules with the diffusers family; editing the package code a stage
    runs (the losses) reruns that stage and what follows, nothing before it."""
    root = project_copy(tmp_path / "ddpm")
    out, _ = sh(root, *SNAKEMAKE, "--config", "experiment=mnist-ddpm")
    assert snakemake_ran(out) == ALL_STAGES
    evaluation = json.loads((root / "results/mnist-ddpm/evaluation.json").read_text())
    assert evaluation["family"] == "diffusers"
    assert [r["setting"] for r in evaluation["rows"]] == ["1 DDIM step", "3 DDIM steps", "1-step generator (t = 999)"]
    assert (root / "results/mnist-ddpm/report.html").exists()

    losses = root / "src/dmd2/losses.py"
    losses.write_text(losses.read_text() + "\n# an edit\n")
    out, _ = sh(root, *SNAKEMAKE, "--config", "experiment=mnist-ddpm", "-n")
    planned = set(re.findall(r"^(\w+)\s+\d+$", out.split("Job stats:")[1], re.M)) - {"all", "total"}
    assert planned == DOWNSTREAM_OF_DISTILL, out[-3000:]


@pytest.mark.integration
def test_the_text_to_image_experiments_run_through_snakemake_and_dvc(tmp_path):
    """`sd-tiny` (SD1.5 shape, one step) through Snakemake and `sdxl-tiny-1step` (SDXL shape, the one-step recipe:
    regression pre-training on teacher pairs, then distillation at t = 399) through `dvc exp run`, with params.yaml's
    own blocks: tiny random pipelines built offline (`tiny:sd15`, `tiny:sdxl`), captioned MNIST latents, every
    stage, a report and a diffusers pipeline export."""
    root = project_copy(tmp_path / "t2i")
    out, _ = sh(root, *SNAKEMAKE, "--config", "experiment=sd-tiny")
    assert snakemake_ran(out) == ALL_STAGES
    for name in ("latents.lmdb", "prompts.lmdb", "eval_prompts.lmdb"):
        assert (root / "data/sd-tiny" / name / "data.mdb").exists()
    assert json.loads((root / "models/sd-tiny/regression/stage.json").read_text())["enabled"] is False
    evaluation = json.loads((root / "results/sd-tiny/evaluation.json").read_text())
    assert evaluation["family"] == "stable_diffusion" and len(evaluation["grid_prompts"]) == 8
    assert (root / "results/sd-tiny/report.html").exists()
    assert (root / "models/sd-tiny/student/pipeline/model_index.json").exists()

    out, _ = sh(root, "dvc", "exp", "run", "-S", "experiment=sdxl-tiny-1step")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == DVC_STAGES
    regression = json.loads((root / "models/sdxl-tiny-1step/regression/config.json").read_text())
    assert regression["generator"]["timesteps"] == [399] and regression["source"]["type"] == "regression"
    rows = json.loads((root / "results/sdxl-tiny-1step/evaluation.json").read_text())["rows"]
    assert {("student", 1), ("teacher", 16)} <= {(r["model"], r["nfe"]) for r in rows}  # 8 DDIM steps, guided: NFE 16
    index = json.loads((root / "models/sdxl-tiny-1step/student/pipeline/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][1] == "LCMScheduler"


@pytest.mark.integration
def test_the_flow_pipeline_experiments_run_through_snakemake_and_dvc(tmp_path):
    """`flux-tiny` (Flux shape, two steps, embedded guidance) through Snakemake and `sd3-tiny` (SD3 shape, four steps
    with backward simulation) through `dvc exp run`, with params.yaml's own blocks: tiny pipelines built offline
    (`tiny:flux`, `tiny:sd3`), every stage, a report and a diffusers pipeline export with the flow LCM scheduler."""
    from test_text_to_image import assert_exported_pipeline_reproduces_generate

    from dmd2.latents import LatentDataset

    root = project_copy(tmp_path / "flow")
    out, _ = sh(root, *SNAKEMAKE, "--config", "experiment=flux-tiny")
    assert snakemake_ran(out) == ALL_STAGES
    evaluation = json.loads((root / "results/flux-tiny/evaluation.json").read_text())
    assert evaluation["family"] == "flow_pipeline" and (root / "results/flux-tiny/report.html").exists()
    rows = {(r["model"], r["nfe"]) for r in evaluation["rows"]}
    assert {("student", 2), ("teacher", 8)} <= rows  # guidance is an input: one call per step
    index = json.loads((root / "models/flux-tiny/student/pipeline/model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["scheduler"][1] == "FlowMatchLCMScheduler"
    assert LatentDataset(root / "data/flux-tiny/latents.lmdb").meta["shift_factor"] == 0.1159  # the tiny VAE's
    log = [json.loads(line) for line in (root / "models/flux-tiny/student/metrics.jsonl").read_text().splitlines()]
    gan = [r["loss_gan_generator"] for r in log if "loss_dm" in r]
    assert gan and all(abs(v) < 1e6 for v in gan)  # the token GAN head ran on every generator turn

    out, _ = sh(root, "dvc", "exp", "run", "-S", "experiment=sd3-tiny")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == DVC_STAGES
    rows = json.loads((root / "results/sd3-tiny/evaluation.json").read_text())["rows"]
    assert {("student", 4), ("teacher", 16)} <= {(r["model"], r["nfe"]) for r in rows}  # two-branch guidance
    index = json.loads((root / "models/sd3-tiny/student/pipeline/model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"

    # the exported pipelines make `dmd2 generate`'s images, re-noised from torch's global generator as the export
    # says: Flux's two steps from noise in 2×2-patch tokens, SD3's four
    prompts = ["a handwritten digit 3", "a red cat"]
    for experiment, shape in (("flux-tiny", "flux"), ("sd3-tiny", "sd3")):
        assert_exported_pipeline_reproduces_generate(root / "models" / experiment / "student",
                                                     tmp_path / f"{experiment}-exported", prompts, flow=shape)


@pytest.mark.integration
def test_readme_dvc_commands_work_in_a_fresh_clone(tmp_path):
    """`dvc repro`, `dvc metrics show` and `dvc exp run -S …` exactly as the README gives them, in a clone that
    nobody ran `dvc init` in; the exp run's rewrite of params.yaml must leave a valid file."""
    root = project_copy(tmp_path / "dvc")
    out, _ = sh(root, "dvc", "repro")
    ran = set(re.findall(r"Running stage '(\w+)'", out))
    assert ran == DVC_STAGES
    shown, _ = sh(root, "dvc", "metrics", "show")
    assert "results/mnist/metrics.json" in shown and "student.fid" in shown and "fid_difference" in shown
    assert max(map(len, shown.splitlines())) < 400, shown  # the headline, not every evaluation row (was 1,471)
    shown, _ = sh(root, "dvc", "metrics", "show", "--json")
    leaves = _leaves(json.loads(shown))
    assert leaves and all(isinstance(v, int | float | bool) for v in leaves), leaves  # figures, not paragraphs
    # `dvc plots show` offline: the report's charts are images, drawn with no script from the network
    sh(root, "dvc", "plots", "show", "-o", "dvc_plots")
    page = (root / "dvc_plots/index.html").read_text()
    images = re.findall(r"<img[^>]+src=\"([^\"]+)\"", page)
    assert any("distillation" in src for src in images) and any("quality_versus_nfe" in src for src in images), images

    out, seconds = sh(root, "dvc", "repro")
    assert "up to date" in out and not re.findall(r"Running stage", out) and seconds < 15, (seconds, out)

    # code, by family: editing another family's module rewrites no manifest of this experiment, so only the `code`
    # stage reruns; editing the losses changes the manifests of the stages that run them, and DVC then names those
    from dmd2.stage import stage_code

    originals = {f: (root / f).read_text() for f in ("src/dmd2/families/flow.py", "src/dmd2/losses.py")}
    (root / "src/dmd2/families/flow.py").write_text(originals["src/dmd2/families/flow.py"] + "# an edit\n")
    out, _ = sh(root, "dvc", "repro")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == {"code"}, out[-2000:]
    (root / "src/dmd2/losses.py").write_text(originals["src/dmd2/losses.py"] + "# an edit\n")
    sh(root, "dvc", "repro", "--single-item", "code")
    status, _ = sh(root, "dvc", "status")
    readers = {stage for stage in ALL_STAGES if "src/dmd2/losses.py" in stage_code(stage, root, ["edm"])}
    assert "distill" in readers and "teacher" not in readers
    assert set(re.findall(r"^(\w+):$", status, re.M)) == readers, status
    for file, text in originals.items():
        (root / file).write_text(text)
    sh(root, "dvc", "repro", "--single-item", "code")

    # a typo in params.yaml: the stage refuses the file, and DVC deletes none of its outputs first (persist)
    good = (root / "params.yaml").read_text()
    student = (root / "models/mnist/student/model.safetensors").read_bytes()
    (root / "params.yaml").write_text(good.replace("dfake_gen_update_ratio:", "dfake_gen_update_ration:", 1))
    failed = subprocess.run(["dvc", "repro"], cwd=root, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "did you mean 'dfake_gen_update_ratio'" in failed.stdout + failed.stderr
    assert (root / "models/mnist/student/model.safetensors").read_bytes() == student
    assert (root / "data/mnist/train.lmdb/data.mdb").exists()
    # a hostile experiment name never reaches a shell: DVC's commands read it from params.yaml, and dmd2 refuses it
    hostile = yaml.safe_load(good)
    hostile["experiment"] = "x$(touch PWNED)y"
    hostile["x$(touch PWNED)y"] = hostile["mnist"]
    (root / "params.yaml").write_text(yaml.safe_dump(hostile, sort_keys=False))
    failed = subprocess.run(["dvc", "repro", "prepare_data"], cwd=root, capture_output=True, text=True, timeout=600)
    assert failed.returncode != 0 and "is not allowed" in failed.stdout + failed.stderr
    assert not list(root.rglob("PWNED"))
    (root / "params.yaml").write_text(good)
    shutil.rmtree(root / "data/x$(touch PWNED)y", ignore_errors=True)

    out, _ = sh(root, "dvc", "exp", "run", "-S", "mnist.distill.steps=7")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == DOWNSTREAM_OF_DISTILL
    from dmd2.config import load_params

    params = load_params(root / "params.yaml")  # DVC rewrote the file (YAML 1.2, unquoted `no`): still valid
    assert params.current().distill.steps == 7 and params.current().distill.mixed_precision == "no"
    # params.yaml reverted after the experiment: Snakemake sees that the student in models/ is the experiment's
    rewritten = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(good)
    assert planned_by_snakemake(root) == DOWNSTREAM_OF_DISTILL
    (root / "params.yaml").write_text(rewritten)
    shown, _ = sh(root, "dvc", "exp", "show", "--csv")
    assert "mnist.distill.steps" in shown.splitlines()[0]

    # a queued experiment runs in a temporary copy; its figures must still reach `dvc exp show` (the tuning study
    # in the README is a queue): results/*/metrics.json is committed with the experiment, not git-ignored
    sh(root, "dvc", "exp", "run", "--queue", "-n", "queued", "-S", "mnist.distill.steps=5")
    sh(root, "dvc", "exp", "run", "--run-all")
    shown, _ = sh(root, "dvc", "exp", "show", "--csv")
    rows = {row["Experiment"]: row for row in csv.DictReader(io.StringIO(shown))}
    assert rows["queued"]["mnist.distill.steps"] == "5"
    float(rows["queued"]["student.fid"])  # a number, not DVC's "!" for a missing metric
    dag, _ = sh(root, "dvc", "dag", "--md")
    for stage in ALL_STAGES:
        assert stage in dag

    # the second embedded experiment, selected the DVC way
    out, _ = sh(root, "dvc", "exp", "run", "-S", "experiment=mnist-ddpm")
    assert set(re.findall(r"Running stage '(\w+)'", out)) == DVC_STAGES
    assert json.loads((root / "results/mnist-ddpm/evaluation.json").read_text())["family"] == "diffusers"


@pytest.mark.integration
def test_the_short_slurm_profile_name_resolves_from_the_repository_root(tmp_path):
    """`snakemake --profile slurm` (the form users type) finds workflow/profiles/slurm through the root entry."""
    from snakemake.cli import get_profile_dir

    root = project_copy(tmp_path / "profile")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        found = get_profile_dir("slurm")
        config = found[1].resolve() if found else None
    finally:
        os.chdir(cwd)
    assert config == (root / "workflow/profiles/slurm/config.yaml").resolve()


def test_an_experiment_without_an_eval_block_parses_with_the_defaults(tmp_path):
    for name in ("Snakefile", "workflow", "src"):
        (tmp_path / name).symlink_to(REPO / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["mnist"]["eval"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = snakemake_stages(tmp_path, "mnist")
    assert "dmd2 fid-reference --experiment mnist" in stages["fid_reference"]["cmd"]
