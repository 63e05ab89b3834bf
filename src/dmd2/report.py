"""`dmd2 report`: one self-contained HTML file (images as data URIs, inline CSS, no scripts, no network).

It reads only what earlier stages wrote (results/<exp>/evaluation.json, samples/, the stage.json and
metrics.jsonl files of the data and model directories, and the optional FID-versus-step curve) and writes
results/<exp>/report.html and nothing else.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from dmd2.checkpoint import sha256_file
from dmd2.config import ExperimentConfig, Params
from dmd2.errors import MissingInputError
from dmd2.paths import ExperimentPaths
from dmd2.stage import STAGE_PARAMS, StageContext, stage_settings
from dmd2.tracking import git_state, read_jsonl

PACKAGES = ("torch", "accelerate", "diffusers", "clean-fid", "open-clip-torch", "lmdb", "snakemake", "dvc", "wandb")

# Published numbers (DMD2 paper, Tables 1, 2 and 5; EDM paper for CIFAR-10) for settings an experiment here can
# reproduce; matched to our rows by model kind, generator/sampler steps (or NFE) and, where given, the sample count.
# Experiments without an entry show "—".
_CIFAR10 = {
    "source": "EDM paper (Karras et al. 2022) and NVIDIA FastGen's DMD2 reproduction",
    "protocol": "FID-50k against the CIFAR-10 training set, class-conditional 32x32",
    "rows": [
        {"model": "student", "steps": 1, "fid": 1.99, "num_samples": 50000,
         "note": "DMD2 reproduced by NVIDIA FastGen (README); the DMD2 paper has no CIFAR-10 run"},
        {"model": "teacher", "nfe": 35, "fid": 1.79, "num_samples": 50000,
         "note": "EDM's DDPM++ teacher (edm-cifar10-32x32-cond-vp), Heun 18 steps"},
    ],
}
PAPER_RESULTS: dict[str, dict[str, Any]] = {
    "imagenet64": {
        "source": "DMD2 paper",
        "protocol": "FID-50k, EDM protocol (StyleGAN3 Inception-v3 vs EDM's imagenet-64x64.npz), class-conditional 64x64",
        "rows": [
            {"model": "student", "steps": 1, "fid": 1.51, "num_samples": 50000, "note": "DMD2 (1.28 with longer training)"},
            {"model": "teacher", "nfe": 511, "fid": 2.32, "num_samples": 50000, "note": "EDM teacher, ODE sampler"},
        ],
    },
    "cifar10": _CIFAR10,
    "cifar10-edm": _CIFAR10,
    "sdv15": {
        "source": "DMD2 paper",
        "protocol": "zero-shot COCO-2014, 30k prompts, clean-fid FID at 256",
        "rows": [
            {"model": "student", "steps": 1, "fid": 8.35, "note": "DMD2, 512-px model"},
            {"model": "teacher", "steps": 50, "fid": 8.59, "note": "SD1.5 teacher, 50-step ODE, cfg 3"},
        ],
    },
    "sdxl": {
        "source": "DMD2 paper",
        "protocol": "10k COCO-2014 prompts, clean-fid FID; CLIP score with OpenCLIP ViT-g/14",
        "rows": [
            {"model": "student", "steps": 1, "fid": 19.01, "clip_score": 0.336, "note": "DMD2 1-step"},
            {"model": "student", "steps": 4, "fid": 19.32, "clip_score": 0.332, "note": "DMD2 4-step"},
            {"model": "teacher", "steps": 100, "fid": 19.36, "clip_score": 0.332, "note": "SDXL teacher, cfg 6"},
        ],
    },
}

CURVES = {
    "teacher": [("Denoising loss", ["loss"]), ("Gradient norm", ["grad_norm"]), ("Learning rate", ["lr"])],
    "regression": [("Regression loss (LPIPS or MSE)", ["loss"]), ("Gradient norm", ["grad_norm"])],
    "student": [
        ("Distribution-matching loss", ["loss_dm"]),
        ("Fake-score (critic) loss", ["loss_fake"]),
        ("GAN losses", ["loss_gan_generator", "loss_gan_critic"]),
        ("Gradient norms", ["grad_norm_generator", "grad_norm_guidance", "dm_grad_norm"]),
        ("Learning rates", ["lr_generator", "lr_guidance"]),
    ],
}


# ------------------------------------------------------------------------------------------------- inputs


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def sha256_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.exists() else None


# --------------------------------------------------------------------------------------------- provenance


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def settings_differences(exp: ExperimentConfig, paths: ExperimentPaths) -> list[dict[str, str]]:
    """Every key whose value in a stage's record (the settings its outputs were made with) differs from the
    parameters this report reads (params.yaml, with any --set given to `dmd2 report`): outputs left by
    `dvc exp run -S …` or a hand-run `--set`. Empty when every output matches params.yaml."""
    rows = []
    for stage in STAGE_PARAMS:
        record_file = paths.stage_record(stage.replace("_", "-"))
        recorded = (read_json(record_file) or {}).get("settings") if record_file else None
        if recorded is None:
            continue
        used, current = flatten(recorded), flatten(stage_settings(exp, stage))
        for key in sorted(set(used) | set(current)):
            if used.get(key) != current.get(key):
                rows.append({"key": key, "params": json.dumps(current.get(key)), "used": json.dumps(used.get(key)),
                             "stage": stage.replace("_", "-")})
    return rows


def package_versions() -> list[dict[str, str]]:
    rows = [{"package": "python", "version": platform.python_version()}]
    for pkg in PACKAGES:
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            version = "not installed"
        rows.append({"package": pkg, "version": version})
    return rows


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(float(seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h {minutes:02d}m {secs:04.1f}s" if hours else (f"{minutes}m {secs:04.1f}s" if minutes else f"{secs:.1f}s")


def stage_rows(paths: ExperimentPaths) -> list[dict[str, str]]:
    files = [("prepare-data", paths.data), ("teacher", paths.teacher), ("regression", paths.regression),
             ("distill", paths.student), ("fid-reference", paths.feature_net), ("evaluate", paths.results)]
    rows = []
    for stage, folder in files:
        record = read_json(folder / "stage.json") or {}
        if stage == "regression" and not record.get("enabled"):
            continue  # off for this experiment
        finished = record.get("finished_unix")
        hw = record.get("hardware", {})
        rows.append({"stage": stage, "wall": _duration(record.get("wall_s")),
                     "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime(finished)) if finished else "—",
                     "device": hw.get("gpu") or hw.get("device") or "—",
                     "processes": str(record.get("num_processes", 1)) if record else "—"})
    return rows


def provenance(params: Params, name: str, paths: ExperimentPaths) -> dict[str, Any]:
    from dmd2.families import read_config

    here = Path(__file__).resolve().parent
    try:
        config = read_config(paths.teacher)
    except Exception:  # a report should still render without the teacher directory
        config = None
    source = config.get("source") if config else None
    return {"git": git_state(here, paths.root),
            "teacher_source": json.dumps(source, sort_keys=True) if source is not None else "unknown",
            "teacher_sha256": sha256_or_none(paths.teacher / "model.safetensors") or _by_reference(config) or "missing",
            "student_sha256": sha256_or_none(paths.student / "model.safetensors") or "missing",
            "settings_diffs": settings_differences(params.current(name), paths), "versions": package_versions(),
            "stages": stage_rows(paths)}


# ------------------------------------------------------------------------------------------------- charts


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return data_uri(buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; also keeps a stray MPLBACKEND from opening windows
    import matplotlib.pyplot as plt

    return plt


def curve_chart(records: list[dict[str, Any]], panels: list[tuple[str, list[str]]], title: str) -> str | None:
    """One PNG with a panel per (title, keys); keys logged only on some steps are plotted where present."""
    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (panel, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and "step" in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4, label=key)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _figure_png(fig)


def fid_step_chart(curve: list[dict[str, Any]], proxy: bool) -> str | None:
    fig = fid_step_figure(curve, proxy)
    return _figure_png(fig) if fig is not None else None


def fid_step_figure(curve: list[dict[str, Any]], proxy: bool) -> Any:
    pts = sorted((r["step"], r["fid"], r.get("fid_std") or 0.0) for r in curve if "step" in r and r.get("fid") is not None)
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    xs, ys, spread = zip(*pts, strict=True)
    ax.errorbar(xs, ys, yerr=spread, marker="o", markersize=3, capsize=2)  # ± the bootstrap standard deviation
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel("proxy FID" if proxy else "FID")
    ax.set_title("Student FID versus step" + (" (proxy FID)" if proxy else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def fid_nfe_chart(rows: list[dict[str, Any]], proxy: bool) -> str | None:
    fig = fid_nfe_figure(rows, proxy)
    return _figure_png(fig) if fig is not None else None


def fid_nfe_figure(rows: list[dict[str, Any]], proxy: bool) -> Any:
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for kind, marker in (("teacher", "o"), ("student", "*")):
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["model"] == kind)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker=marker, markersize=9 if kind == "student" else 5, label=kind,
                    linestyle="-" if kind == "teacher" else "none")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per sample (NFE, log scale)")
    fids = [r["fid"] for r in rows if r.get("fid")]
    wide = bool(fids) and min(fids) > 0 and max(fids) / min(fids) > 10  # a 1-step teacher far above the rest
    if wide:
        ax.set_yscale("log")  # otherwise the student and the full-step teacher merge into the baseline
    ax.set_ylabel(("proxy FID" if proxy else "FID") + (" (log scale)" if wide else ""))
    ax.set_title("Quality versus sampling cost" + (" (proxy FID)" if proxy else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- tables


def paper_match(experiment: str, row: dict[str, Any]) -> dict[str, Any] | None:
    for ref in PAPER_RESULTS.get(experiment, {}).get("rows", []):
        same_count = "num_samples" not in ref or row.get("num_samples", ref["num_samples"]) == ref["num_samples"]
        same_steps = ref.get("steps") == row.get("steps") or ref.get("nfe") == row.get("nfe")
        if ref["model"] == row["model"] and same_steps and same_count:
            return ref
    return None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _coverage(row: dict[str, Any]) -> str:
    """Mean class coverage with its lowest class: '0.912 (0.850)'."""
    if row.get("class_coverage") is None:
        return "—"
    return f"{_fmt(row['class_coverage'])} ({_fmt(row.get('class_coverage_min'))})"


def _with_spread(value: float | None, std: float | None) -> str:
    return _fmt(value) if std is None or value is None else f"{_fmt(value)} ± {_fmt(std)}"


def metric_rows(metrics: dict[str, Any], experiment: str) -> list[dict[str, str]]:
    ref = metrics.get("fid_reference", {})
    extractor = (f"proxy CNN ({ref.get('feature_dim')}-d)" if metrics.get("fid_is_proxy")
                 else "Inception-v3 (clean-fid)")
    reference = f"{ref.get('dataset')} {ref.get('split')} ({ref.get('count')})"
    resolution = f"{metrics.get('resolution')}×{metrics.get('resolution')}"
    out = []
    for row in metrics.get("rows", []):
        paper = paper_match(experiment, row)
        out.append({"model": row["model"].capitalize(), "setting": row["setting"], "nfe": str(row["nfe"]),
                    "extractor": extractor, "reference": reference, "n": str(row.get("num_samples", metrics.get("num_samples"))),
                    "resolution": resolution, "fid": _with_spread(row.get("fid"), row.get("fid_std")),
                    "fid_at_floor": _with_spread(row.get("fid_at_floor_count"), row.get("fid_at_floor_count_std")),
                    "class_accuracy": _fmt(row.get("class_accuracy")),
                    "diversity": _fmt(row.get("diversity")), "clip_score": _fmt(row.get("clip_score")),
                    "precision": _fmt(row.get("precision")), "recall": _fmt(row.get("recall")),
                    "coverage": _coverage(row),
                    "paper_fid": _fmt(paper["fid"], 2) if paper else "—",
                    "paper_clip": _fmt(paper.get("clip_score"), 3) if paper else "—",
                    "paper_note": paper.get("note", "") if paper else ""})
    return out


def speed_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    teachers = [r for r in rows if r["model"] == "teacher"]
    full = max(teachers, key=lambda r: r["nfe"]) if teachers else None
    out = []
    for row in rows:
        speedup = latency_gain = "—"
        if full and row is not full:
            speedup = f"{row['images_per_s'] / full['images_per_s']:.1f}×"
            latency_gain = f"{full['latency_ms'] / row['latency_ms']:.1f}×"
        elif full:
            speedup = latency_gain = "1.0× (reference)"
        out.append({"model": row["model"].capitalize(), "steps": str(row["steps"]), "nfe": str(row["nfe"]),
                    "batch_size": str(row["batch_size"]), "images_per_s": _fmt(row["images_per_s"], 1),
                    "latency_ms": _fmt(row["latency_ms"], 2), "speedup": speedup, "latency_gain": latency_gain})
    return out


def sample_grids(metrics: dict[str, Any], results: Path) -> list[dict[str, str]]:
    grids = []
    for row in metrics.get("rows", []):
        path = results / row.get("sample_grid", f"samples/{row['model']}_nfe{row['nfe']}.png")
        if path.exists():
            grids.append({"title": f"{row['model'].capitalize()}: {row['setting']}, NFE {row['nfe']}",
                          "src": data_uri(path.read_bytes()), "fid": _fmt(row.get("fid"))})
    return grids


# ------------------------------------------------------------------------------------------------- render


def _by_reference(config: dict[str, Any] | None) -> str | None:
    """What a teacher recorded by reference (weights left where they are, no model.safetensors) says of them."""
    config = config or {}
    if isinstance(config.get("pretrained"), dict):
        ref = config["pretrained"]
        hashes = ", ".join(f"{name} {entry['sha256']}" for name, entry in ref.get("files", {}).items())
        return f"recorded by reference at {ref.get('path')}: {hashes}"
    if isinstance(config.get("pipeline"), dict):
        return f"recorded by reference: the pipeline at {config['pipeline'].get('path')} (its files are not hashed)"
    return None


def build_context(params: Params, name: str, paths: ExperimentPaths) -> dict[str, Any]:
    metrics_file = paths.results / "evaluation.json"
    metrics = read_json(metrics_file)
    if metrics is None:
        raise MissingInputError(f"{metrics_file} not found or unreadable; run `dmd2 evaluate` first")
    proxy = bool(metrics.get("fid_is_proxy"))
    teacher_log = read_jsonl(paths.teacher / "metrics.jsonl")
    student_log = read_jsonl(paths.student / "metrics.jsonl")
    regression_log = read_jsonl(paths.regression / "metrics.jsonl")
    fid_curve = read_jsonl(paths.student_run() / "fid_curve.jsonl")
    charts = [
        {"title": "Quality versus NFE", "src": fid_nfe_chart(metrics.get("rows", []), proxy)},
        {"title": "Teacher training", "src": curve_chart(teacher_log, CURVES["teacher"],
                                                          f"Teacher ({metrics.get('family', '?')} family) training")},
        *([{"title": "Regression pre-training", "src": curve_chart(regression_log, CURVES["regression"],
                                                                    "Regression onto teacher pairs")}]
          if regression_log else []),  # only where regression.enabled
        {"title": "Distillation", "src": curve_chart(student_log, CURVES["student"], "DMD2 distillation")},
        {"title": "FID versus step", "src": fid_step_chart(fid_curve, proxy)},
    ]
    paper = PAPER_RESULTS.get(name)
    return {
        "experiment": name, "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "metrics": metrics, "proxy": proxy,
        "fid_label": "Proxy FID" if proxy else "FID", "rows": metric_rows(metrics, name),
        "has_clip": any(r.get("clip_score") is not None for r in metrics.get("rows", [])),
        "has_floor_column": bool(metrics.get("real_data"))
        and any(r.get("fid_at_floor_count") is not None for r in metrics.get("rows", [])),
        "real": metrics.get("real_data"), "speed": speed_rows(metrics.get("rows", [])),
        "grids": sample_grids(metrics, paths.results), "charts": [c for c in charts if c["src"]],
        "missing_charts": [c["title"] for c in charts if not c["src"]], "paper": paper,
        "provenance": provenance(params, name, paths), "hardware": metrics.get("hardware", {}),
        "heldout_accuracy": metrics.get("feature_classifier_heldout_accuracy"),
    }


def render(context: dict[str, Any]) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("dmd2", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    return env.get_template("report.html.j2").render(**context)


def write_figures(charts: list[dict[str, Any]], folder: Path) -> None:
    """The report's charts as PNG files too (results/<exp>/figures/): `dvc plots show` draws them as images,
    which need no script from the network (its own charts load vega from a CDN: blank on an offline node)."""
    from dmd2.atomic import fresh_staging_dir, replace_directory

    tmp = fresh_staging_dir(folder)
    for chart in charts:
        name = re.sub(r"[^a-z0-9]+", "_", chart["title"].lower()).strip("_")
        (tmp / f"{name}.png").write_bytes(base64.b64decode(chart["src"].split(",", 1)[1]))
    replace_directory(tmp, folder)


def run_report(ctx: StageContext) -> dict[str, Any]:
    """Write results/<exp>/report.html and its charts as results/<exp>/figures/*.png (each atomically)."""
    context = build_context(ctx.params, ctx.experiment, ctx.paths)
    page = render(context)
    out = ctx.paths.results / "report.html"
    write_figures(context["charts"], ctx.paths.results / "figures")
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    print(f"wrote {out} and its charts in {ctx.paths.results / 'figures'}")
    return {"report": str(out)}
