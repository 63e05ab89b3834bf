"""Every stage's fixed output locations (one place, shared by the CLI, Snakemake and DVC).

Declared outputs live under data/, models/ and results/; rolling checkpoints live under work/, outside every
declared output, so a failed or interrupted stage never loses them and rerunning the command resumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def input_path(location: str, root: Path) -> Path:
    """A user-given input file (`data.path`, `teacher.pickle`): absolute or `~` as written, else relative to the
    project root."""
    path = Path(location).expanduser()
    return path if path.is_absolute() else root / path


@dataclass(frozen=True)
class ExperimentPaths:
    experiment: str
    root: Path = Path(".")

    @property
    def data(self) -> Path:
        return self.root / "data" / self.experiment

    @property
    def launch_config(self) -> Path:
        return self.root / "configs" / self.experiment / "accelerate.yaml"

    def code_manifest(self, stage: str) -> Path:
        """The hashes of the package files `stage` runs for this experiment (`dmd2.stage.write_code_manifests`)."""
        return self.root / "configs" / self.experiment / "code" / f"{stage}.json"

    @property
    def teacher(self) -> Path:
        return self.root / "models" / self.experiment / "teacher"

    @property
    def student(self) -> Path:
        return self.root / "models" / self.experiment / "student"

    @property
    def regression(self) -> Path:
        """The generator pre-trained on teacher pairs at its first step (`regression.enabled`)."""
        return self.root / "models" / self.experiment / "regression"

    @property
    def feature_net(self) -> Path:
        """The proxy-FID classifier and the cached reference statistics."""
        return self.root / "models" / self.experiment / "fid_reference"

    def student_run(self) -> Path:
        """The work directory of the distillation run that wrote the student (its checkpoints and FID curve)."""
        import json

        config = self.student / "config.json"
        run = json.loads(config.read_text()).get("source", {}).get("run", "") if config.exists() else ""
        return self.work("distill") / run

    @property
    def results(self) -> Path:
        return self.root / "results" / self.experiment

    def work(self, stage: str) -> Path:
        return self.root / "work" / self.experiment / stage

    def stage_record(self, stage: str) -> Path | None:
        """Where a stage's `stage.json` (wall time, hardware, the stage's own figures) goes: beside its outputs."""
        folder = {"prepare-data": self.data, "teacher": self.teacher,
                  "regression": self.regression, "distill": self.student,
                  "fid-reference": self.feature_net, "evaluate": self.results}.get(stage)
        return folder / "stage.json" if folder is not None else None
