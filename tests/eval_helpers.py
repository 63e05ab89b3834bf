"""Shared artefacts for the evaluation/report tests: the real CLI from data to report on the tiny experiment.

Built once per test session (the first test module that asks builds it; later modules reuse it), because the
report and the browser tests both need the full chain and it costs most of their run time.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from tiny import run_dir, write_tiny_params

from dmd2.cli import main

EVAL_OVERRIDES = {
    "num_samples": 100, "batch_size": 50, "teacher_steps": [1, 3], "grid_per_class": 2, "latency_repeats": 2,
    "classifier": {"width": 8, "feature_dim": 16, "steps": 30, "batch_size": 64},
    "fid": {"feature_extractor": "proxy"},  # never depend on what happens to sit in clean-fid's /tmp cache
}
STAGES = ("prepare-data", "teacher", "distill", "fid-reference", "evaluate")

_BUILT: dict[str, Path] = {}


def run_cli(root: Path, *args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--params", str(root / "params.yaml"), "--root", str(root)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def eval_pipeline(tmp_path_factory) -> Path:
    """A root with data/, models/ (teacher, student, fid_reference), results/mnist/ and a FID-versus-step curve."""
    if "root" not in _BUILT:
        root = tmp_path_factory.mktemp("eval_pipeline")
        write_tiny_params(root, eval=EVAL_OVERRIDES)
        for stage in STAGES:
            run_cli(root, stage)
        run_cli(root, "evaluate-folder", "--folder", str(run_dir(root, "distill") / "checkpoints"), "--once")
        run_cli(root, "report")
        _BUILT["root"] = root
    return _BUILT["root"]
