"""`dmd2 evaluate` (teacher versus student on the same seeds) and `dmd2 evaluate-folder` (FID versus step).

Every model is sampled from the same fixed noise (`eval.seed`) and the same balanced labels, so differences
between rows come from the models alone. Quality, class fidelity and diversity use the features cached by
`dmd2 fid-reference`. Throughput is the median time of the metric sampling's own full batches after the first
(a warm-up), so the slow full-step teacher is not sampled twice; batch-1 latency is timed separately.
It writes results/<exp>/evaluation.json (every row with its protocol and definitions, read by the report) and
results/<exp>/metrics.json (the headline as numbers only: student, full-step teacher and their comparison, for
`dvc metrics show/diff` and `dvc exp show`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmd2.atomic import fresh_staging_dir, replace_directory
from dmd2.config import ExperimentConfig, to_dict
from dmd2.families import Model, load_model
from dmd2.fid import FIDReference, class_diversity, classifier_accuracy, device
from dmd2.paths import ExperimentPaths
from dmd2.sampling import fixed_noise, sample, sample_grid, sample_images, save_grid
from dmd2.stage import StageContext
from dmd2.tracking import read_jsonl

THROUGHPUT_REPEATS = 3
GRID_SCALE = 3
DIVERSITY_DEFINITION = ("mean pairwise L2 distance between FID features of samples of the same class, averaged over "
                        "classes, divided by the same quantity for the real reference images (1.0 = as diverse as "
                        "real data; lower = mode collapse; above 1 = more spread than real data, e.g. residual noise)")
ACCURACY_DEFINITION = "fraction of samples that the feature classifier assigns to the class they were generated for"
MANIFOLD_DEFINITION = ("in the FID's feature space, every sample stands for a ball reaching its k-th nearest neighbour "
                       "of its own set (k = {k}; {n} real reference and {n} generated samples at most). Precision: the "
                       "share of generated samples inside some real ball (quality); recall: the share of real samples "
                       "inside some generated ball (diversity; Kynkäänniemi et al. 2019). Class coverage: per class, "
                       "the share of its real samples whose ball (among that class's real samples) holds a sample "
                       "generated for the class (Naeem et al. 2020), averaged over classes; the lowest class is given "
                       "too, since a dropped mode shows there first")


# --------------------------------------------------------------------------------------------- scoring


def score_images(ref: FIDReference, images: torch.Tensor, labels: torch.Tensor | None,
                 bootstrap: int = 0, floor_count: int = 0) -> dict[str, float | None]:
    """FID (with its bootstrap spread, and at the real floor's sample count), class accuracy and relative diversity
    of uint8 images generated for `labels`."""
    feats = ref.extractor(images.numpy())
    np_labels = labels.numpy() if labels is not None else None
    spread = ref.fid_spread(feats, bootstrap)
    at_floor = ref.fid_in_subsets(feats, floor_count) if 0 < floor_count < len(feats) else None
    return {
        "fid": round(ref.fid(feats), 4),
        "fid_std": round(spread, 4) if spread is not None else None,
        "fid_at_floor_count": round(at_floor[0], 4) if at_floor else None,
        "fid_at_floor_count_std": round(at_floor[1], 4) if at_floor else None,
        "class_accuracy": round(classifier_accuracy(ref.classifier, images, labels), 4) if labels is not None else None,
        "diversity": round(class_diversity(feats, np_labels) / ref.info["class_diversity"], 4),
        **ref.manifold_scores(feats, np_labels),
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed_call(model: Model, n: int, num_steps: int | None, seed: int) -> float:
    dev = next(model.net.parameters()).device  # the noise is on the device before the clock starts
    noise = fixed_noise(n, model.family.sample_shape, seed).to(dev)
    raw_cond = model.family.balanced_conditions(n)
    renoise = torch.Generator().manual_seed(seed + 1)
    _sync()
    start = time.perf_counter()
    sample(model, noise, raw_cond, num_steps, renoise)
    _sync()
    return time.perf_counter() - start


def throughput(batch_size: int, batch_seconds: list[float]) -> float | None:
    """Images per second from the wall times of full batches, the first (a warm-up) left out; None when fewer
    than THROUGHPUT_REPEATS remain."""
    timed = list(batch_seconds)[1:]
    return batch_size / statistics.median(timed) if len(timed) >= THROUGHPUT_REPEATS else None


def time_model(model: Model, batch_size: int, num_steps: int | None, latency_repeats: int, seed: int,
               batch_seconds: list[float] = ()) -> tuple[float, float]:
    """(images per second at `batch_size`, median batch-1 latency in ms), each after one warm-up call.

    `batch_seconds`, the full batches' times of the quality sampling that just ran, give the throughput when
    there are enough of them: the same calls, not run twice (the full-step teacher's are the slow ones)."""
    ips = throughput(batch_size, batch_seconds)
    if ips is None:
        ips = throughput(batch_size, [_timed_call(model, batch_size, num_steps, seed)
                                      for _ in range(THROUGHPUT_REPEATS + 1)])
    _timed_call(model, 1, num_steps, seed)
    latencies = [_timed_call(model, 1, num_steps, seed) for _ in range(latency_repeats)]
    return ips, 1000 * statistics.median(latencies)


def evaluate_model(kind: str, model: Model, num_steps: int | None, exp: ExperimentConfig,
                   ref: FIDReference) -> tuple[dict[str, Any], torch.Tensor]:
    """One metrics row (quality on `eval.num_samples` fixed-seed samples, then speed) and those samples."""
    cfg = exp.eval
    steps, nfe = model.steps(num_steps), model.nfe(num_steps)
    started = time.time()
    raw_cond = model.family.balanced_conditions(cfg.num_samples)
    batch_seconds: list[float] = []
    images = sample_images(model, cfg.num_samples, cfg.seed, cfg.batch_size, num_steps, raw_cond, batch_seconds)
    labels = model.family.balanced_labels(cfg.num_samples)
    row = {"model": kind, "steps": int(steps), "nfe": int(nfe), "setting": model.describe(num_steps),
           **score_images(ref, images, labels, cfg.fid.bootstrap, int(ref.other_info.get("count") or 0))}
    full_batches = batch_seconds[: cfg.num_samples // cfg.batch_size]  # a smaller last batch is not a throughput
    ips, latency = time_model(model, cfg.batch_size, num_steps, cfg.latency_repeats, cfg.seed, full_batches)
    row.update(images_per_s=round(ips, 2), latency_ms=round(latency, 3), batch_size=cfg.batch_size,
               num_samples=cfg.num_samples, eval_seconds=round(time.time() - started, 1))
    print(f"evaluate: {kind} {steps} step(s) (NFE {nfe}): FID {row['fid']:.3f}, class accuracy "
          f"{row['class_accuracy']}, diversity {row['diversity']:.3f}, precision {row['precision']:.3f}, recall "
          f"{row['recall']:.3f}, class coverage {row['class_coverage']} (lowest {row['class_coverage_min']}), "
          f"{ips:.1f} img/s, {latency:.1f} ms")
    return row, images


def save_sample_grid(model: Model, num_steps: int | None, exp: ExperimentConfig, path: Path) -> Path:
    """Class-major grid on the evaluation seed: column = class, row = one of `grid_per_class` seeds."""
    images = sample_grid(model, exp.eval.grid_per_class, exp.eval.seed, exp.eval.batch_size, num_steps)
    return save_grid(images, exp.eval.grid_per_class, path, scale=GRID_SCALE)


# ------------------------------------------------------------------------------------------------- output


def write_csv(path: Path, records: list[dict[str, Any]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def loss_table(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows with a step and loss-like columns (loss*, grad_norm*, lr*), in first-seen order."""
    keep = ("loss", "grad_norm", "lr", "dm_grad_norm")
    columns = ["step"]
    for rec in records:
        columns += [k for k in rec if k.startswith(keep) and k not in columns]
    return [r for r in records if "step" in r], columns


def write_plots(paths: ExperimentPaths, rows: list[dict[str, Any]]) -> None:
    """Small CSVs for `dvc plots`: student (and teacher) training curves, and FID versus NFE."""
    plots = paths.results / "plots"
    for kind, model_dir in (("student", paths.student), ("teacher", paths.teacher)):
        records, columns = loss_table(read_jsonl(model_dir / "metrics.jsonl"))
        write_csv(plots / f"{kind}_losses.csv", records, columns)
    write_csv(plots / "fid_vs_nfe.csv", rows, ["model", "nfe", "fid"])


def fid_protocol(ref: FIDReference, exp: ExperimentConfig, text_to_image: bool = False) -> str:
    info, n, res = ref.info, exp.eval.num_samples, exp.data.resolution
    conditions = "the held-out images' captions as prompts" if text_to_image else "balanced labels"
    what = ("PROXY FID: features are the {d}-d penultimate layer of a CNN classifier trained on the {ds} training "
            "split, not Inception-v3; comparable only within this pipeline, never with published FIDs").format(
        d=info.get("feature_dim"), ds=info.get("dataset"))
    if not ref.is_proxy:
        what = "clean-fid 'clean' mode (PIL bicubic resize to 299, TorchScript Inception-v3 pool3, 2048-d)"
    extra = f"; {exp.eval.fid.protocol}" if exp.eval.fid.protocol else ""
    return (f"{what}; reference: {info.get('dataset')} {info.get('split')} split ({info.get('count')} real images) at "
            f"{res}x{res}; {n} generated samples per model with {conditions} and noise seed {exp.eval.seed}{extra}")


def real_data_row(ref: FIDReference, exp: ExperimentConfig, paths) -> dict[str, Any]:
    from dmd2.data import open_split

    other = ref.other_info
    images, labels = open_split(paths.data, ref.other_split, exp.data.resolution).all_uint8()
    feats = ref.extractor(images)
    spread = ref.fid_spread(feats, exp.eval.fid.bootstrap)  # the floor's own spread
    return {"split": ref.other_split, "count": other.get("count"), "fid": round(ref.real_fid(), 4),
            "fid_std": round(spread, 4) if spread is not None else None,
            **ref.manifold_scores(feats, labels),
            "diversity": round(other["class_diversity"] / ref.info["class_diversity"], 4),
            "class_accuracy": ref.classifier_info.get("heldout_accuracy") if ref.other_split == "heldout" else
            ref.classifier_info.get("train_accuracy"),
            "note": f"real {ref.other_split} images scored against the {ref.reference_split} reference: the floor "
                    f"of this FID at {other.get('count')} samples (FID is biased upwards at small N)"}


def compare_student_with_teacher(ref: FIDReference, rows: list[dict[str, Any]], features: list[np.ndarray],
                                 bootstrap: int) -> dict[str, Any] | None:
    """Student FID − full-step teacher FID with its paired-bootstrap spread (`features`: each row's samples in the
    FID's feature space): both were sampled from the same noise and labels, so resampling the same indices for both
    cancels most of the seed noise in the comparison."""
    kinds = [r["model"] for r in rows]
    if "student" not in kinds or "teacher" not in kinds:
        return None
    full = max((i for i, k in enumerate(kinds) if k == "teacher"), key=lambda i: rows[i]["nfe"])
    student = kinds.index("student")
    difference, std = ref.paired_difference(features[student], features[full], bootstrap)
    if std is None:  # eval.fid.bootstrap: 0, no spread to judge by
        verdict = "no verdict: no bootstrap spread (eval.fid.bootstrap is 0)"
    else:
        verdict = ("indistinguishable at this sample count" if abs(difference) < 2 * std
                   else "student better" if difference < 0 else "teacher better")
    return {"fid_difference": round(difference, 4), "fid_difference_std": round(std, 4) if std is not None else None,
            "teacher_nfe": rows[full]["nfe"], "verdict": verdict,
            "definition": f"student FID − teacher FID (NFE {rows[full]['nfe']}) on the same noise and labels; ± the "
                          f"standard deviation over {bootstrap} paired bootstrap resamples (the same indices for "
                          "both); a verdict needs |difference| ≥ 2 standard deviations"}


HEADLINE = ("fid", "fid_std", "precision", "recall", "class_accuracy", "diversity", "clip_score", "coco_fid",
            "coco_clip_score")


def numeric_metrics(rows: list[dict[str, Any]], is_proxy: bool,
                    comparison: dict[str, Any] | None = None) -> dict[str, Any]:
    """The headline, as numbers, for `dvc metrics show` and `dvc exp show` (metrics.json): the student and the
    full-step teacher it is compared with, their paired FID difference, FID ratio and speed-up. DVC prints a metrics
    file as one table row with a column per number, so every row of evaluation.json here made a row of ~50 columns;
    the other rows, the real-data floor, the definitions and the protocol stay in evaluation.json."""
    teachers = [r for r in rows if r["model"] == "teacher"]
    student = next((r for r in rows if r["model"] == "student"), None)
    full = max(teachers, key=lambda r: r["nfe"]) if teachers else None
    out: dict[str, Any] = {name: {k: row[k] for k in HEADLINE if row.get(k) is not None}
                           for name, row in (("student", student), ("teacher", full)) if row is not None}
    if comparison is not None:
        out["fid_difference"] = comparison["fid_difference"]  # student − teacher, paired
        if comparison["fid_difference_std"] is not None:
            out["fid_difference_std"] = comparison["fid_difference_std"]
    if student and full:
        out["fid_ratio"] = round(student["fid"] / max(full["fid"], 1e-12), 4)
        out["speedup"] = round(student["images_per_s"] / full["images_per_s"], 2)
    out["fid_is_proxy"] = is_proxy
    return out


# ----------------------------------------------------------------------------------------------- the stage


def _clip_row_score(exp: ExperimentConfig, clip, model: Model, images: torch.Tensor,
                    class_names: list[str] | None) -> float:
    """CLIP score of one row's samples (eval.clip.enabled): against the prompts they were generated from, or the
    class names of their labels."""
    from dmd2.clip_score import clip_score

    raw = model.family.balanced_conditions(len(images))  # the conditions evaluate_model sampled with
    names = class_names or [str(c) for c in range(max(1, model.family.num_classes))]
    if isinstance(raw, list):  # prompts
        prompts = raw
    else:
        prompts = [names[int(c)] for c in raw] if raw is not None else [names[0]] * len(images)
    return round(clip_score(*clip, images, prompts, exp.eval.clip.prompt_prefix), 4)


def _grid_prompts(model: Model, rows: int) -> list[str] | None:
    """The prompts of the sample grids' columns (text-to-image), for the report; None for class grids."""
    raw, columns = model.family.grid_conditions(rows)
    return list(raw[:columns]) if isinstance(raw, list) else None


def _coco_captions(exp: ExperimentConfig, paths: ExperimentPaths, ref: FIDReference) -> list[str] | None:
    """The COCO protocol's captions when it is configured and its reference statistics exist (Inception)."""
    if not exp.eval.coco.enabled:
        return None
    if ref.coco is None:
        print("evaluate: eval.coco is set but there are no COCO reference statistics (no Inception weights when "
              "`dmd2 fid-reference` ran): the COCO FID is skipped")
        return None
    from dmd2.coco import coco_captions

    return coco_captions(exp.eval.coco, paths.root)


def coco_row(model: Model, num_steps: int | None, exp: ExperimentConfig, ref: FIDReference, captions: list[str],
             clip) -> dict[str, Any]:
    """The COCO protocol's FID (and CLIP score) of one model (`dmd2.coco`)."""
    from dmd2.coco import generated_features

    cfg = exp.eval
    patch_size = cfg.coco.patch_size if ref.coco_patch is not None else None
    feats, patch_feats, clip_mean = generated_features(model, ref.extractor, captions, cfg.coco.resolution, cfg.seed,
                                                       cfg.batch_size, num_steps, clip, cfg.clip.prompt_prefix,
                                                       patch_size)
    out = {"coco_fid": round(ref.coco_fid(feats), 4), "coco_num_samples": len(captions)}
    if patch_feats is not None:
        out["coco_patch_fid"] = round(ref.coco_fid(patch_feats, patch=True), 4)
    if clip_mean is not None:
        out["coco_clip_score"] = round(clip_mean, 4)
    print(f"evaluate: COCO FID-{len(captions)} at {cfg.coco.resolution}px {out['coco_fid']:.3f}"
          + (f", patch FID ({patch_size}px) {out['coco_patch_fid']:.3f}" if patch_feats is not None else "")
          + (f", CLIP score {out['coco_clip_score']:.4f}" if clip_mean is not None else ""))
    return out


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    """Score the teacher (at each of `eval.teacher_steps`) and the student; write results/<exp>/."""
    from dmd2.tracking import hardware_summary

    exp, paths, dev = ctx.exp, ctx.paths, device()
    ref = FIDReference(exp, paths)
    teacher = load_model(paths.teacher, dev, data_dir=paths.data)
    student = load_model(paths.student, dev, data_dir=paths.data)
    out = paths.results
    for folder in ("samples", "plots"):  # declared outputs: start clean so no stale grid or CSV survives
        shutil.rmtree(out / folder, ignore_errors=True)
    clip = class_names = None
    if exp.eval.clip.enabled:
        from dmd2.clip_score import load_clip
        from dmd2.data import read_meta

        clip, class_names = load_clip(exp.eval.clip, dev), read_meta(paths.data / "train.lmdb").get("class_names")
    runs = [("teacher", teacher, paths.teacher, s) for s in exp.eval.teacher_steps] + \
        [("student", student, paths.student, None)]
    coco = _coco_captions(exp, paths, ref)
    rows, features = [], []
    for kind, model, model_dir, steps in runs:
        cache = row_cache(paths, model_dir, steps, exp, dev)
        grid = f"samples/{kind}_nfe{model.nfe(steps)}.png"
        if cache is not None and (cache / "row.json").exists():  # the same weights, settings and reference
            row, feats = json.loads((cache / "row.json").read_text()), np.load(cache / "features.npy")
            (out / grid).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache / "grid.png", out / grid)
            print(f"evaluate: {kind} {row['steps']} step(s): reusing {cache} (FID {row['fid']:.3f})")
        else:
            row, images = evaluate_model(kind, model, steps, exp, ref)
            feats = ref.extractor(images.numpy())
            if clip is not None:  # on the same samples, not a second generation
                row["clip_score"] = _clip_row_score(exp, clip, model, images, class_names)
            if coco is not None:
                row.update(coco_row(model, steps, exp, ref, coco, clip))
            row["sample_grid"] = grid
            save_sample_grid(model, steps, exp, out / grid)
            if cache is not None:
                save_row(cache, row, feats, out / grid)
        features.append(feats)
        rows.append(row)
    write_plots(paths, rows)
    comparison = compare_student_with_teacher(ref, rows, features, exp.eval.fid.bootstrap)
    real = real_data_row(ref, exp, paths)
    checkpoints = paths.student_run() / "checkpoints"
    if exp.eval.fid_curve and checkpoints.is_dir():  # the report's FID-versus-step curve, from the kept checkpoints
        scan_once(CheckpointScorer(exp, paths), checkpoints, checkpoints.parent / "fid_curve.jsonl")
    record = {
        "experiment": paths.experiment,
        "family": teacher.family.name,
        "fid_protocol": fid_protocol(ref, exp, teacher.family.latent_space),
        "fid_is_proxy": ref.is_proxy,
        "fid_extractor": ref.extractor.name,
        "fid_reference": {k: ref.info.get(k) for k in ("dataset", "split", "count", "resolution", "source", "feature_dim")},
        "num_samples": exp.eval.num_samples, "seed": exp.eval.seed, "resolution": exp.data.resolution,
        "grid_prompts": _grid_prompts(teacher, exp.eval.grid_per_class),
        "coco_protocol": (f"COCO protocol: {exp.eval.coco.num_samples} images generated from the first captions of "
                          f"{exp.eval.coco.captions} in order, both sets centre-cropped and LANCZOS-resized to "
                          f"{exp.eval.coco.resolution}px, clean-fid Inception-v3 features; reference: "
                          f"{ref.coco[2].get('count')} images in {ref.coco[2].get('folder')}"
                          + (f"; patch FID: the centre {exp.eval.coco.patch_size}px crop of every image at full "
                             "resolution, not resized" if ref.coco_patch is not None else "")) if coco else None,
        "rows": rows,
        "student_vs_full_teacher": comparison,
        "real_data": real,
        "diversity_definition": DIVERSITY_DEFINITION,
        "class_accuracy_definition": ACCURACY_DEFINITION,
        "manifold_definition": MANIFOLD_DEFINITION.format(k=exp.eval.fid.neighbours, n=exp.eval.fid.manifold_samples),
        "feature_classifier_heldout_accuracy": ref.classifier_info.get("heldout_accuracy"),
        "timing": {"throughput": "median wall time of the quality sampling's full batches of eval.batch_size, the "
                                 "first (a warm-up) left out",
                   "latency": f"median of eval.latency_repeats={exp.eval.latency_repeats} batch-1 calls after one "
                              "warm-up call", "device": str(dev)},
        "hardware": hardware_summary(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(record, indent=2))
    (out / "metrics.json").write_text(json.dumps(numeric_metrics(rows, ref.is_proxy, comparison), indent=2))
    print(f"evaluate: wrote {out / 'evaluation.json'} and {out / 'metrics.json'}")
    return {"fid_is_proxy": ref.is_proxy, "rows": len(rows)}


# ------------------------------------------------------------------------------------ reusing rows


def row_cache(paths: ExperimentPaths, model_dir: Path, num_steps: int | None, exp: ExperimentConfig,
              dev: torch.device) -> Path | None:
    """Where a model's evaluation row is kept for reuse: keyed by its files (config and weights), the step count,
    the evaluation and data settings, the FID reference's files and the device (the row's speed figures). The
    teacher's rows, most of evaluate's time, are then computed once for all the students distilled from it. None
    for a model whose weights live elsewhere (recorded by reference): its files are not here to hash."""
    from dmd2.checkpoint import sha256_file

    if not (model_dir / "model.safetensors").exists():
        return None
    settings = {"eval": to_dict(exp.eval), "data": to_dict(exp.data), "steps": num_steps, "device": str(dev)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    # the model's own files (config and weights; not its training log, nor a text-to-image student's exported
    # pipeline copy beneath it) and the whole FID reference
    files = [f for f in sorted(model_dir.glob("*")) if f.is_file() and f.name != "metrics.jsonl"]
    files += [f for f in sorted(paths.feature_net.rglob("*")) if f.is_file()]
    for f in files:
        digest.update(f"{f.relative_to(paths.root)}:{sha256_file(f)}".encode())
    return paths.work("evaluate") / "rows" / digest.hexdigest()[:16]


def save_row(cache: Path, row: dict[str, Any], features: np.ndarray, grid: Path) -> None:
    """Keep a row, its samples' features and its grid for `row_cache` (written whole, then renamed into place)."""
    tmp = fresh_staging_dir(cache)
    np.save(tmp / "features.npy", features)
    shutil.copyfile(grid, tmp / "grid.png")
    (tmp / "row.json").write_text(json.dumps(row, indent=2))
    replace_directory(tmp, cache)


# ------------------------------------------------------------------------------------ continuous evaluation


class CheckpointScorer:
    """Holds the feature net and the reference statistics for checkpoint after checkpoint; each checkpoint's
    generator is loaded from its own `student/` directory, with the config of the run that wrote it."""

    def __init__(self, exp: ExperimentConfig, paths: ExperimentPaths):
        self.exp, self.paths, self.ref = exp, paths, FIDReference(exp, paths)

    def score(self, checkpoint: Path) -> dict[str, Any]:
        model = load_model(checkpoint / "student", device(), data_dir=self.paths.data)
        cfg = self.exp.eval
        raw_cond = model.family.balanced_conditions(cfg.num_samples)
        images = sample_images(model, cfg.num_samples, cfg.seed, cfg.batch_size, None, raw_cond)
        labels = model.family.balanced_labels(cfg.num_samples)
        return {**score_images(self.ref, images, labels), "fid_is_proxy": self.ref.is_proxy,
                "num_samples": cfg.num_samples}


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    with open(path, "a") as f:
        if text and not text.endswith("\n"):  # a torn line from a killed run: never glue a record onto it
            f.write("\n")
        f.write(json.dumps(record) + "\n")
        f.flush()


def scan_once(scorer: CheckpointScorer, folder: Path, output: Path) -> int:
    """Score every complete checkpoint in `folder` that `output` does not list yet; returns how many."""
    from dmd2.checkpoint import checkpoint_step, list_checkpoints

    done = {r.get("step") for r in read_jsonl(output)}
    scored = 0
    for ckpt in list_checkpoints(folder):
        step = checkpoint_step(ckpt)
        if step in done:
            continue
        try:
            result = scorer.score(ckpt)
        except (OSError, RuntimeError, ValueError) as err:
            if ckpt.exists():  # a real failure (mismatched weights, out of memory): say so
                raise
            # rotation deleted it between listing and loading: it is simply gone, not an error
            print(f"evaluate-folder: skipped {ckpt.name} ({type(err).__name__}: {err})")
            continue
        _append(output, {"step": step, "fid": result["fid"], "checkpoint": ckpt.name, **result,
                         "time_unix": round(time.time(), 1)})
        done.add(step)
        scored += 1
        print(f"evaluate-folder: {ckpt.name}: FID {result['fid']:.3f}" + (" (proxy)" if result["fid_is_proxy"] else ""))
    return scored


def evaluate_checkpoint_folder(ctx: StageContext, folder: Path, output_file: str | None, watch: bool,
                               poll_seconds: float) -> dict[str, Any]:
    """Score each checkpoint in `folder` once (across restarts too); with `watch`, sleep and scan again."""
    folder = Path(folder)
    # beside the checkpoints, not inside: rotation deletes checkpoint directories, never this file
    output = Path(output_file) if output_file else folder.parent / "fid_curve.jsonl"
    if not watch and not folder.is_dir():
        print(f"evaluate-folder: {folder} does not exist (no checkpoints yet)")
        return {"scored": 0}
    scorer, scored = CheckpointScorer(ctx.exp, ctx.paths), 0
    try:
        while True:
            scored += scan_once(scorer, folder, output)
            if not watch:
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        print("evaluate-folder: stopped")
    print(f"evaluate-folder: results in {output}")
    return {"scored": scored, "output": str(output)}

