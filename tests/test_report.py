"""fid-reference → evaluate → evaluate-folder → report through the real CLI, on the tiny experiment."""

import base64
import io
import json
import math
import re

import pytest
from eval_helpers import EVAL_OVERRIDES, eval_pipeline, run_cli
from PIL import Image
from tiny import run_dir

from dmd2.config import load_params
from dmd2.evaluate import CheckpointScorer, scan_once
from dmd2.fid import load_stats
from dmd2.paths import ExperimentPaths
from dmd2.stage import StageContext
from dmd2.tracking import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("eval_pipeline")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return eval_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def metrics(root):
    return json.loads((root / "results/mnist/evaluation.json").read_text())


def test_fid_reference_outputs(root):
    ref = root / "models/mnist/fid_reference"
    names = {p.name for p in ref.iterdir()}
    assert {"classifier.safetensors", "classifier.json", "reference.json", "stage.json",
            "mnist_train_proxy_16.npz", "mnist_train_proxy_16.json", "mnist_heldout_proxy_16.npz"} <= names
    mu, sigma, info = load_stats(ref / "mnist_train_proxy_16.npz")
    assert mu.shape == (16,) and sigma.shape == (16, 16)
    assert info["count"] == 4500 and info["split"] == "train" and info["extractor"] == "proxy"
    stage = json.loads((ref / "stage.json").read_text())
    assert 0.0 <= stage["heldout_accuracy"] <= 1.0 and stage["wall_s"] >= 0


def test_metrics_schema(metrics):
    assert metrics["fid_is_proxy"] is True
    assert "PROXY" in metrics["fid_protocol"] and "100 generated samples" in metrics["fid_protocol"]
    assert "16x16" in metrics["fid_protocol"] and "train split" in metrics["fid_protocol"]
    rows = metrics["rows"]
    assert [(r["model"], r["steps"], r["nfe"]) for r in rows] == [("teacher", 1, 1), ("teacher", 3, 5), ("student", 1, 1)]
    types = {"model": str, "nfe": int, "steps": int, "fid": float, "class_accuracy": float, "diversity": float,
             "images_per_s": float, "latency_ms": float, "batch_size": int}
    for row in rows:
        for key, kind in types.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert math.isfinite(row["fid"]) and row["fid"] >= 0
        assert 0 <= row["class_accuracy"] <= 1 and row["diversity"] > 0
        assert row["images_per_s"] > 0 and row["latency_ms"] > 0 and row["batch_size"] == EVAL_OVERRIDES["batch_size"]
        assert row["fid_std"] > 0  # bootstrap spread (eval.fid.bootstrap resamples)
        assert row["fid_at_floor_count"] is None  # 100 samples: fewer than two subsets of the floor's 500
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["manifold_samples"] == 100
        per_class = row["class_coverage_per_class"]
        assert sorted(per_class) == [str(c) for c in range(10)] and min(per_class.values()) == row["class_coverage_min"]
    real = metrics["real_data"]
    assert real["split"] == "heldout" and real["count"] == 500 and real["fid"] >= 0 and real["fid_std"] > 0
    assert real["recall"] > 0.5 and real["precision"] > 0.5  # real against real: most of either manifold is shared
    assert "k = 3" in metrics["manifold_definition"]
    assert "diversity_definition" in metrics and "hardware" in metrics
    assert 0 <= metrics["feature_classifier_heldout_accuracy"] <= 1


def test_dvc_metrics_are_the_headline_of_the_evaluation(root, metrics):
    """metrics.json (what `dvc metrics show` and `dvc exp show` print) is the student, the full-step teacher (NFE 5,
    not the 1-step row) and their comparison, taken from evaluation.json's rows."""
    headline = json.loads((root / "results/mnist/metrics.json").read_text())
    rows = {(r["model"], r["nfe"]): r for r in metrics["rows"]}
    keys = ["fid", "fid_std", "precision", "recall", "class_accuracy", "diversity"]
    assert headline["student"] == {k: rows["student", 1][k] for k in keys}
    assert headline["teacher"] == {k: rows["teacher", 5][k] for k in keys}
    comparison = metrics["student_vs_full_teacher"]
    assert comparison["teacher_nfe"] == 5
    assert (headline["fid_difference"], headline["fid_difference_std"]) == (comparison["fid_difference"],
                                                                          comparison["fid_difference_std"])
    assert headline["fid_ratio"] == round(rows["student", 1]["fid"] / rows["teacher", 5]["fid"], 4)
    assert headline["speedup"] == round(rows["student", 1]["images_per_s"] / rows["teacher", 5]["images_per_s"], 2)
    assert headline["fid_is_proxy"] is True and len(headline) == 7


def test_the_headline_picks_the_full_step_teacher_and_leaves_out_what_is_missing():
    from dmd2.evaluate import numeric_metrics

    rows = [{"model": "teacher", "nfe": 35, "fid": 0.5, "recall": 0.9, "images_per_s": 10.0, "clip_score": None},
            {"model": "student", "nfe": 1, "fid": 0.75, "recall": 0.8, "images_per_s": 400.0},
            {"model": "teacher", "nfe": 1, "fid": 250.0, "recall": 0.0, "images_per_s": 500.0}]
    comparison = {"fid_difference": 0.25, "fid_difference_std": None}
    assert numeric_metrics(rows, False, comparison) == {
        "student": {"fid": 0.75, "recall": 0.8}, "teacher": {"fid": 0.5, "recall": 0.9},
        "fid_difference": 0.25, "fid_ratio": 1.5, "speedup": 40.0, "fid_is_proxy": False}
    assert numeric_metrics(rows[:1], True) == {"teacher": {"fid": 0.5, "recall": 0.9}, "fid_is_proxy": True}


def test_every_row_holds_what_the_scorers_give_for_its_model(root, metrics):
    """The figures in evaluation.json are the named model's, at the named steps, on the evaluation seed: each row
    recomputed from scratch (sample, extract, score) gives the same values (bounds alone could not see a row scored
    on the wrong model, steps or seed)."""
    from dmd2.evaluate import score_images
    from dmd2.families import load_model
    from dmd2.fid import FIDReference
    from dmd2.sampling import sample_images

    exp = load_params(root / "params.yaml").current()
    paths, cfg = ExperimentPaths("mnist", root), exp.eval
    ref = FIDReference(exp, paths)
    for row in metrics["rows"]:
        model = load_model(paths.teacher if row["model"] == "teacher" else paths.student, data_dir=paths.data)
        steps = row["steps"] if row["model"] == "teacher" else None
        images = sample_images(model, cfg.num_samples, cfg.seed, cfg.batch_size, steps)
        again = score_images(ref, images, model.family.balanced_labels(cfg.num_samples))
        for key in ("fid", "class_accuracy", "diversity", "precision", "recall", "class_coverage"):
            assert again[key] == row[key], (row["model"], row["steps"], key)
    rows = {(r["model"], r["steps"]): r for r in metrics["rows"]}
    assert rows[("teacher", 1)]["fid"] != rows[("teacher", 3)]["fid"]  # different samplers, different figures


def test_results_hold_only_declared_outputs(root, metrics):
    results = root / "results/mnist"
    assert {p.name for p in results.iterdir()} == {"evaluation.json", "metrics.json", "samples", "plots", "stage.json",
                                                 "report.html", "figures"}
    # the report's charts, as PNG files too (`dvc plots show` draws them offline)
    figures = {p.name for p in (results / "figures").iterdir()}
    assert {"quality_versus_nfe.png", "distillation.png", "teacher_training.png"} <= figures
    assert all(Image.open(results / "figures" / name).format == "PNG" for name in figures)
    assert {p.name for p in (results / "samples").iterdir()} == {"teacher_nfe1.png", "teacher_nfe5.png", "student_nfe1.png"}
    grid = Image.open(results / "samples/student_nfe1.png")
    # class-major: 10 columns of 16 px tiles + 1 px padding, 2 rows (grid_per_class), scaled x3
    assert grid.size == (3 * (10 * 17 + 1), 3 * (2 * 17 + 1))
    student_csv = (results / "plots/student_losses.csv").read_text().splitlines()
    logged = read_jsonl(root / "models/mnist/student/metrics.jsonl")
    assert student_csv[0].startswith("step,") and "loss_dm" in student_csv[0] and len(student_csv) == 1 + len(logged)
    fid_csv = (results / "plots/fid_vs_nfe.csv").read_text().splitlines()
    assert fid_csv[0] == "model,nfe,fid" and len(fid_csv) == 4


def test_same_seed_gives_identical_metrics_rows_on_rerun(root, metrics):
    import shutil

    # a rerun with the same models and settings reuses every row (the teacher's are most of evaluate's time)
    output = run_cli(root, "evaluate")
    assert output.count("reusing") == len(metrics["rows"]) and "evaluate: teacher" in output
    assert json.loads((root / "results/mnist/evaluation.json").read_text())["rows"] == metrics["rows"]
    # recomputed from scratch, the same seed gives the same figures
    shutil.rmtree(root / "work/mnist/evaluate/rows")
    assert "reusing" not in run_cli(root, "evaluate")
    again = json.loads((root / "results/mnist/evaluation.json").read_text())
    for a, b in zip(metrics["rows"], again["rows"], strict=True):
        assert (a["fid"], a["class_accuracy"], a["diversity"]) == (b["fid"], b["class_accuracy"], b["diversity"])
    # another student (its weights changed): its row is computed, the teacher's are reused
    student = root / "models/mnist/student/model.safetensors"
    original = student.read_bytes()
    from safetensors.torch import load_file, save_file

    weights = load_file(student)
    save_file({k: v * 0.5 if i == 0 else v for i, (k, v) in enumerate(weights.items())}, student,
              metadata={"format": "dmd2-denoiser/1"})
    try:
        output = run_cli(root, "evaluate")
        assert output.count("reusing") == len(metrics["rows"]) - 1 and "evaluate: student 1 step(s) (NFE 1)" in output
    finally:
        student.write_bytes(original)
        run_cli(root, "evaluate")


def test_checkpoint_folder_scores_each_checkpoint_once(root):
    curve = run_dir(root, "distill") / "fid_curve.jsonl"
    records = read_jsonl(curve)
    assert [r["step"] for r in records] == [3, 6]  # checkpoint_every 3, keep_last 2
    assert all(r["checkpoint"] == f"ckpt-{r['step']:07d}" and r["fid"] >= 0 for r in records)
    assert not (run_dir(root, "distill") / "checkpoints/fid_curve.jsonl").exists()
    params = load_params(root / "params.yaml")
    scorer = CheckpointScorer(params.current("mnist"), ExperimentPaths("mnist", root))
    assert scan_once(scorer, run_dir(root, "distill") / "checkpoints", curve) == 0  # a restart re-scores nothing
    assert len(read_jsonl(curve)) == 2


def test_watch_mode_sleeps_between_scans_and_stops_on_ctrl_c(root, tmp_path, monkeypatch):
    import dmd2.evaluate as evaluate

    output = tmp_path / "curve.jsonl"
    output.write_text('{"step": 3, "fid": 1.0, "checkpoint": "ckpt-0000003"}\n{"step": 6, "fi')  # torn by a kill
    naps = []

    def fake_sleep(seconds):
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.time, "sleep", fake_sleep)
    ctx = StageContext(load_params(root / "params.yaml"), "mnist", ExperimentPaths("mnist", root))
    evaluate.evaluate_checkpoint_folder(ctx, run_dir(root, "distill") / "checkpoints", str(output), True, 7.5)
    assert naps == [7.5, 7.5]  # one sleep per scan, never a busy loop
    records = read_jsonl(output)
    assert [r["step"] for r in records] == [3, 6]  # step 3 kept as it was, step 6 scored once after the torn line
    assert records[0]["fid"] == 1.0


def test_report_is_self_contained(root):
    page = (root / "results/mnist/report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), "external resource reference"
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page, re.I) and "@import" not in page
    assert "<script" not in page.lower() and "<link" not in page.lower()
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 3 + 4  # three sample grids; NFE, teacher, student and FID-versus-step charts
    for data in images:
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    # provenance and protocol labels
    for text in ("Proxy metrics", "Proxy FID", "not comparable with published FIDs", "Git commit",
                 "Teacher weights (sha256)", "Settings that differ from params.yaml", "Stage wall times", "open-clip-torch",
                 "Images / s", "FID versus step"):
        assert text in page, text
    assert "—" in page  # no paper number for mnist


def test_the_report_names_outputs_made_with_other_settings(root):
    """Each stage records the settings it ran with; the report lists those that differ from the parameters it reads
    (here the report is given distill.steps=9 while the student was made with 6)."""
    none = "None: every stage's outputs were made with params.yaml's settings."
    assert none in (root / "results/mnist/report.html").read_text()
    try:
        run_cli(root, "report", "--set", "distill.steps=9")
        page = (root / "results/mnist/report.html").read_text()
        rows = re.findall(r"<tr><td><code>([\w.]+)</code></td><td><code>(.*?)</code></td><td><code>(.*?)</code></td>"
                          r"<td>([\w-]+)</td></tr>", page)
        assert rows == [("distill.steps", "9", "6", "distill")], rows
    finally:
        run_cli(root, "report")


def test_the_readme_python_snippet_samples_a_student(root, monkeypatch):
    """README's "A student from Python", run as it stands from a project root that holds a student."""
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"### A student from Python.*?```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(root)
    try:
        exec(compile(snippet, "README.md", "exec"), {})  # noqa: S102 - the README's own code
        grid = Image.open(root / "student.png")
        assert grid.size == (4 * (10 * 17 + 1), 4 * (2 * 17 + 1))  # 10 classes × 2 rows of 16-px tiles, ×4
    finally:
        (root / "student.png").unlink(missing_ok=True)


def test_paper_numbers_slot_in_for_other_experiments():
    from dmd2.report import paper_match

    assert paper_match("imagenet64", {"model": "student", "steps": 1, "nfe": 1})["fid"] == 1.51
    assert paper_match("imagenet64", {"model": "teacher", "steps": 256, "nfe": 511})["fid"] == 2.32
    assert paper_match("sdxl", {"model": "student", "steps": 4, "nfe": 4})["clip_score"] == 0.332
    assert paper_match("mnist", {"model": "student", "steps": 1, "nfe": 1}) is None
    assert paper_match("cifar10-edm", {"model": "teacher", "steps": 18, "nfe": 35, "num_samples": 50000})["fid"] == 1.79
    assert paper_match("cifar10-edm", {"model": "teacher", "steps": 18, "nfe": 35, "num_samples": 2000}) is None


def test_throughput_is_the_median_full_batch_after_the_warm_up():
    from dmd2.evaluate import throughput

    assert throughput(250, [9.0, 1.0, 2.0, 0.5]) == 250 / 1.0  # the 9 s warm-up batch is left out
    assert throughput(250, [9.0, 1.0, 2.0]) is None  # too few batches: evaluate times separate calls instead


def test_without_bootstrap_spread_the_comparison_gives_no_verdict(root):
    import torch

    from dmd2.data import open_split
    from dmd2.evaluate import compare_student_with_teacher
    from dmd2.fid import FIDReference

    exp = load_params(root / "params.yaml").current()
    paths = ExperimentPaths("mnist", root)
    images, _ = open_split(paths.data, "heldout", exp.data.resolution).all_uint8()
    teacher = torch.from_numpy(images[:200])
    student = (teacher.int() // 2).to(torch.uint8)  # far worse: a verdict with a spread, none without one
    rows = [{"model": "teacher", "nfe": 3}, {"model": "student", "nfe": 1}]
    ref = FIDReference(exp, paths)
    features = [ref.extractor(teacher.numpy()), ref.extractor(student.numpy())]
    assert compare_student_with_teacher(ref, rows, features, 0)["verdict"].startswith("no verdict")
    assert compare_student_with_teacher(ref, rows, features, 5)["verdict"] == "teacher better"


def test_a_teacher_recorded_by_reference_shows_its_recorded_hashes():
    from dmd2.report import _by_reference

    pretrained = {"pretrained": {"path": "models/ddpm", "files": {"model.safetensors": {"sha256": "ab12", "size": 3}}}}
    assert _by_reference(pretrained) == "recorded by reference at models/ddpm: model.safetensors ab12"
    assert "not hashed" in _by_reference({"pipeline": {"path": "models/sd-tiny/pipeline"}})
    assert _by_reference({"family": "edm"}) is None


def test_the_charts_keep_a_student_near_its_teacher_visible_and_show_each_point_s_spread():
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.container import ErrorbarContainer

    from dmd2.report import fid_nfe_figure, fid_step_figure

    rows = [{"model": "teacher", "nfe": 1, "fid": 22.9}, {"model": "teacher", "nfe": 35, "fid": 0.37},
            {"model": "student", "nfe": 1, "fid": 0.79}]
    wide, close = fid_nfe_figure(rows, True), fid_nfe_figure(rows[1:], True)
    assert wide.axes[0].get_yscale() == "log" and close.axes[0].get_yscale() == "linear"
    curve = fid_step_figure([{"step": 160, "fid": 1.8, "fid_std": 0.1}, {"step": 320, "fid": 1.5, "fid_std": 0.2}], True)
    bars = [c for c in curve.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and [np.ptp(seg[:, 1]) for seg in bars[0].lines[2][0].get_segments()] == pytest.approx([0.2, 0.4])
    plt.close("all")
