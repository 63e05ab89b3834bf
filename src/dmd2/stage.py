"""What every stage function receives: the parameters, the experiment it runs for, and its fixed paths.

Every stage is `run_<stage>(ctx: StageContext, **options) -> dict`, returning the figures that the CLI writes
into the stage's `stage.json` (wall time and hardware added), the one place stage records are written.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmd2.atomic import staging_path
from dmd2.config import ExperimentConfig, Params, to_dict
from dmd2.paths import ExperimentPaths


@dataclass(frozen=True)
class StageContext:
    params: Params
    experiment: str
    paths: ExperimentPaths

    @property
    def exp(self) -> ExperimentConfig:
        """The selected experiment's block of params.yaml."""
        return self.params.current(self.experiment)


# The module each pipeline stage (a Snakemake rule / DVC stage) runs; its code dependencies are the package
# files that module reaches through `dmd2` imports (at any depth, function-level imports included).
STAGE_MODULES = {"prepare_data": ("data",), "teacher": ("teacher",), "launch_config": ("launch",),
                 "regression": ("regression",),
                 "distill": ("distill", "launch"), "fid_reference": ("fid",), "evaluate": ("evaluate",),
                 "report": ("report",)}
# The blocks of the experiment each stage reads ("" = the whole experiment): a change to one reruns the stage.
# The Snakemake rules' `params:` and dvc.yaml's `params:` name the same blocks (tests/test_dag.py checks both), and
# `dmd2 <stage> --help` lists their keys.
STAGE_PARAMS = {"prepare_data": ("data",), "teacher": ("teacher",), "launch_config": ("launch",),
                "regression": ("regression",), "distill": ("distill", "regression"),
                "fid_reference": ("eval.classifier", "eval.fid", "eval.coco"), "evaluate": ("eval",), "report": ("",)}


def stage_settings(exp: ExperimentConfig, stage: str) -> dict[str, Any]:
    """The values of the blocks `stage` reads, validated and with every default filled in, as plain JSON values.

    Each stage records them in its stage.json; the Snakefile compares that record with params.yaml, so outputs
    that another front-end (`dvc exp run -S …`) or a hand-run `--set` made with other settings are rerun rather
    than taken as up to date, and the report lists where they differ."""
    tree = to_dict(exp)
    settings = {}
    for path in STAGE_PARAMS[stage.replace("-", "_")]:
        node = tree
        for part in filter(None, path.split(".")):
            node = node[part]
        settings[path or "experiment"] = node
    return json.loads(json.dumps(settings))


DATA_FILES = {"report": ["templates/report.html.j2"]}


def stage_code(stage: str, root: str | Path = ".", families: Iterable[str] | None = None) -> list[str]:
    """The files under `root`/src/dmd2 that a stage's code reads, as paths relative to `root` (sorted), so that
    editing e.g. the losses reruns distillation in Snakemake and DVC. [] when `root` has no src/dmd2.

    The stage's modules reach no family's own module (families are imported by name, `dmd2.families.FAMILIES`): a
    stage that reaches `dmd2.families` gets the files of `families` (registered names; None: every registered
    family) and what they import."""
    from dmd2.families import FAMILIES, family_module

    package = Path(root) / "src" / "dmd2"
    if not package.is_dir():
        return []
    seen: set[str] = set()

    def follow(todo: list[str]) -> None:
        while todo:
            name = todo.pop()
            file = _module_file(package, name)
            if file is None or name in seen:
                continue
            seen.add(name)
            todo += _dmd2_imports(file)

    follow(list(STAGE_MODULES[stage]))  # not `cli`: it only dispatches (and imports every stage)
    if "families" in seen:  # the stage loads models: their family's module and what it imports
        own = [family_module(name) for name in (FAMILIES if families is None else families)]
        follow([m.removeprefix("dmd2.") for m in own if m.startswith("dmd2.")])
    files = {_module_file(package, name) for name in seen} | {package / f for f in DATA_FILES.get(stage, [])}
    return sorted(str(f.relative_to(root)) for f in files if f is not None)


def _module_file(package: Path, name: str) -> Path | None:
    base = package.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dmd2_imports(file: Path) -> list[str]:
    """`dmd2.x.y` names a module imports (relative to the package), wherever the import statement sits; a package's
    modules also bring in the package's __init__."""
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dmd2":
            base = node.module.split(".")[1:]
            found.append(".".join(base))
            found += [".".join([*base, alias.name]) for alias in node.names]  # `from dmd2.families import edm`
        elif isinstance(node, ast.Import):
            found += [".".join(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "dmd2"]
    parents = [".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)]
    return [n for n in found + parents if n]


def code_manifest(stage: str, root: str | Path, family: str) -> dict[str, Any]:
    """The sha256 of every package file `stage` runs for an experiment of `family` (`stage_code`)."""
    files = stage_code(stage, root, [family])
    return {"stage": stage, "family": family,
            "files": {f: hashlib.sha256((Path(root) / f).read_bytes()).hexdigest() for f in files}}


def write_code_manifests(paths: ExperimentPaths, family: str) -> list[Path]:
    """configs/<exp>/code/<stage>.json for every stage: DVC's code dependencies, by family.

    dvc.yaml cannot choose files by the experiment's family (it resolves no nested `${…}`), so its `code` stage
    writes these and every other stage depends on its own manifest: editing another family's module rewrites no
    manifest of this experiment and reruns nothing else. A manifest whose content is unchanged is left untouched.
    (Snakemake's rules take the same files directly, `stage_code`.)"""
    written = []
    for stage in STAGE_MODULES:
        path = paths.code_manifest(stage)
        text = json.dumps(code_manifest(stage, paths.root, family), indent=1) + "\n"
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = staging_path(path)
            tmp.write_text(text)
            os.replace(tmp, path)
        written.append(path)
    return written
