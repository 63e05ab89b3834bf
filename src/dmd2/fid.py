"""FID: the Fréchet distance, cached reference statistics and the two feature extractors.

Two extractors produce the features:
* `inception`: clean-fid's "clean" protocol (PIL bicubic resize to 299 in float, then the TorchScript
  Inception-v3 `inception-2015-12-05.pt`), run through clean-fid's own resizer and model wrapper. Its weights are
  downloaded by clean-fid at run time, so they exist only where someone fetched them.
* `proxy`: the penultimate features of a small CNN classifier trained here on the experiment's training images.
  Scores from it are a labelled *proxy FID*: useful to compare models within this pipeline, never comparable with
  published (Inception) FIDs.

The `fid-reference` stage trains the classifier and caches Gaussian statistics of the real images in
`models/<exp>/fid_reference/` as clean-fid-style `.npz` files (keys `mu`, `sigma`) with a JSON sidecar each.
"""

from __future__ import annotations

import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import nn

from dmd2.checkpoint import sha256_file
from dmd2.config import ClassifierConfig, ExperimentConfig, FIDConfig
from dmd2.errors import Dmd2Error
from dmd2.paths import ExperimentPaths
from dmd2.stage import StageContext
from dmd2.training import device

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# clean-fid's `feature_extractor("torchscript_inception")` downloads to (and loads from) this folder.
CLEANFID_CACHE_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
CLASSIFIER_FORMAT = "dmd2-feature-classifier/1"
REFERENCE_INDEX = "reference.json"


class FIDError(Dmd2Error, RuntimeError):
    """Missing weights or reference statistics; the message says which stage or setting fixes it."""


# ------------------------------------------------------------------------------------------ statistics


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians, in float64, with clean-fid's handling of numerical trouble.

    Its structure (sqrtm of the product, a diagonal offset when that is singular, the imaginary round-off check)
    follows clean-fid's `frechet_distance` (MIT, © 2021 Gaurav Parmar) and pytorch-fid's `calculate_frechet_distance`
    (Apache-2.0); see NOTICE."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a nearly singular product: regularise both covariances, as clean-fid (and pytorch-fid) do
        print(f"fid: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # round-off gives tiny imaginary parts; large ones mean the statistics are broken
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 @ sigma2)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_of_features(features: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID of N×D features against reference statistics (mu2, sigma2).

    With fewer samples than dimensions (N − 1 < D, e.g. a few hundred images in Inception's 2048-d space) their
    covariance Σ₁ = AᵀA/(N − 1) (A: the centred features) has rank below D, and the nonzero eigenvalues of Σ₁Σ₂ are
    those of the N×N matrix AΣ₂Aᵀ/(N − 1), so tr √(Σ₁Σ₂) is the sum of their square roots: the same number as the
    D×D matrix square root (tested against clean-fid), in milliseconds instead of seconds."""
    feats = np.asarray(features, np.float64)
    n, d = feats.shape
    if n - 1 >= d or n < 2:
        return frechet_distance(*feature_stats(feats), mu2, sigma2)
    mu1 = feats.mean(axis=0)
    centred = feats - mu1
    small = centred @ np.asarray(sigma2, np.float64) @ centred.T / (n - 1)
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)  # symmetric positive semi-definite, up to round-off
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - np.asarray(mu2, np.float64)
    return float(diff @ diff + (centred * centred).sum() / (n - 1) + np.trace(sigma2) - 2 * trace_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of N×D features, in float64 (clean-fid's `fid_from_feats` convention)."""
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need an N×D feature matrix with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, info: dict[str, Any]) -> Path:
    """clean-fid's stats format (`.npz` with `mu`, `sigma`) plus a `.json` sidecar describing them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    path.with_suffix(".json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        raise FIDError(f"FID reference statistics {path} not found; run `dmd2 fid-reference` first")
    with np.load(path) as stats:
        mu, sigma = stats["mu"], stats["sigma"]
    sidecar = path.with_suffix(".json")
    info = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return mu, sigma, info


def stats_filename(dataset: str, split: str, extractor: str, resolution: int) -> str:
    """One cache file per (dataset, split, extractor, resolution), named like clean-fid's stats files."""
    return f"{dataset}_{split}_{extractor}_{resolution}.npz".lower()


def class_diversity(features: np.ndarray, labels: np.ndarray | None, max_per_class: int = 1000) -> float:
    """Mean pairwise L2 feature distance between samples of the same class, averaged over classes.

    The expected pairwise distance does not depend on the sample count, so generated and real sets of
    different sizes compare fairly; large classes are subsampled (deterministically) to bound the cost.
    """
    feats = np.asarray(features, np.float64)
    groups = [np.arange(len(feats))] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    rng = np.random.default_rng(0)
    means = []
    for idx in groups:
        if len(idx) < 2:
            continue
        if len(idx) > max_per_class:
            idx = rng.choice(idx, max_per_class, replace=False)
        x = torch.from_numpy(feats[idx])
        dist = torch.cdist(x, x)
        means.append(float(dist.sum() / (len(idx) * (len(idx) - 1))))
    return float(np.mean(means)) if means else float("nan")


# ------------------------------------------------------------------------------- precision, recall, coverage
# Kynkäänniemi et al. 2019 (precision/recall) and Naeem et al. 2020 (coverage): each real (or generated) sample
# stands for a ball reaching its k-th nearest neighbour in its own set; a sample of the other set inside some ball is
# on that set's manifold. Distances are in the FID's feature space.


def kth_neighbour_distance(points: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """For every point, the distance to its k-th nearest *other* point of the set."""
    radii = []
    for start in range(0, len(points), chunk):
        dist = torch.cdist(points[start:start + chunk], points)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # the point itself is its own nearest, at distance 0
    return torch.cat(radii)


def inside_balls(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Whether each query lies in at least one ball (centre, radius)."""
    inside = [(torch.cdist(queries[start:start + chunk], centres) <= radii[None]).any(dim=1)
              for start in range(0, len(queries), chunk)]
    return torch.cat(inside) if inside else torch.zeros(0, dtype=torch.bool)


def _on_device(features: np.ndarray) -> torch.Tensor:
    """Features as float32 on the accelerator if there is one: 10,000 Inception features are 10⁸ distances."""
    return torch.from_numpy(np.asarray(features, np.float32)).to(device())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """(precision, recall): the share of generated samples on the real manifold, and of real samples on the
    generated one, each manifold the union of its samples' k-nearest-neighbour balls."""
    real_t, fake_t = _on_device(real), _on_device(fake)
    precision = inside_balls(fake_t, real_t, kth_neighbour_distance(real_t, k)).double().mean()
    recall = inside_balls(real_t, fake_t, kth_neighbour_distance(fake_t, k)).double().mean()
    return float(precision), float(recall)


def class_coverage(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
                   k: int = 3) -> dict[int, float]:
    """Per class c, the share of the real samples of c whose k-nearest-neighbour ball (among the real samples of c)
    holds at least one sample generated for c: 1 when every part of the class is reached, low when the generator
    drops modes of it. Classes with fewer than k + 1 real or no generated samples are left out."""
    coverage = {}
    for c in np.unique(real_labels):
        r, f = _on_device(real[real_labels == c]), _on_device(fake[fake_labels == c])
        if len(r) > k and len(f):
            reached = (torch.cdist(r, f).min(dim=1).values <= kth_neighbour_distance(r, k))
            coverage[int(c)] = float(reached.double().mean())
    return coverage


# ---------------------------------------------------------------------------------------- proxy classifier


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), _norm(c_out), nn.SiLU()]


class FeatureClassifier(nn.Module):
    """A small CNN; `features()` (its penultimate layer) gives the proxy-FID embedding.

    One conv per resolution keeps training at 16x16 to seconds on two CPU cores. GroupNorm rather than
    BatchNorm, so features never depend on batch composition; adaptive pooling makes the same network work
    at any resolution.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            *_conv(in_channels, width), nn.AvgPool2d(2),
            *_conv(width, 2 * width), nn.AvgPool2d(2),
            *_conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float in [-1, 1] (the convention of the datasets and the generators)."""
    x = torch.as_tensor(np.asarray(images))
    return x.float() / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, cfg: ClassifierConfig) -> FeatureClassifier:
    """Adam on the real training images, deterministic in `cfg.seed` (own generator; global RNG untouched)."""
    dev = device()
    x_all, y_all = to_unit_range(images), torch.as_tensor(labels, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = FeatureClassifier(x_all.shape[1], num_classes, cfg.width, cfg.feature_dim).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # cosine decay: a short schedule that still ends at a well-converged, stable feature map
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    model.train()
    for _ in range(cfg.steps):
        idx = torch.randint(len(x_all), (cfg.batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_all[idx].to(dev)), y_all[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_logits(model: FeatureClassifier, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    x, dev = to_unit_range(images), next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)])


def classifier_accuracy(model: FeatureClassifier, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of images the classifier assigns to `labels`."""
    pred = classifier_logits(model, images).argmax(1)
    return round(float((pred == torch.as_tensor(np.asarray(labels))).double().mean()), 6)


def save_classifier(out_dir: Path, model: FeatureClassifier, info: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out_dir / "classifier.safetensors")
    (out_dir / "classifier.json").write_text(json.dumps({"format": CLASSIFIER_FORMAT, **info}, indent=2, sort_keys=True))


def load_classifier(out_dir: Path) -> tuple[FeatureClassifier, dict[str, Any]]:
    from safetensors.torch import load_file

    cfg_file = out_dir / "classifier.json"
    if not cfg_file.exists():
        raise FIDError(f"no feature classifier at {out_dir} (missing {cfg_file.name}); run `dmd2 fid-reference` first")
    info = json.loads(cfg_file.read_text())
    model = FeatureClassifier(info["in_channels"], info["num_classes"], info["width"], info["feature_dim"])
    model.load_state_dict(load_file(out_dir / "classifier.safetensors"))
    return model.to(device()).eval().requires_grad_(False), info


# ------------------------------------------------------------------------------------------- extractors


class ProxyExtractor:
    """Penultimate features of the experiment's own classifier (a labelled proxy for Inception features)."""

    name, is_proxy = "proxy", True

    def __init__(self, model: FeatureClassifier, weights_sha256: str):
        self.model, self.weights_sha256 = model, weights_sha256

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int = 500) -> np.ndarray:
        x, dev = to_unit_range(images), next(self.model.parameters()).device
        out = [self.model.features(x[i : i + batch_size].to(dev)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).double().numpy()


class InceptionExtractor:
    """clean-fid "clean" mode: 3-channel uint8 → clean-fid's PIL-bicubic resizer → its TorchScript Inception."""

    name, is_proxy = "inception", False

    def __init__(self, weights: Path):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.weights, self.weights_sha256 = weights, sha256_file(weights)
        with tempfile.TemporaryDirectory() as tmp:
            folder = weights.parent
            if weights.name != INCEPTION_FILENAME:  # InceptionV3W wants the folder that holds the canonical name
                (Path(tmp) / INCEPTION_FILENAME).symlink_to(weights.resolve())
                folder = Path(tmp)
            self.model = InceptionV3W(str(folder), download=False, resize_inside=False).to(device()).eval()
        self.resize = build_resizer("clean")

    def _prepare(self, image: np.ndarray) -> torch.Tensor:
        hwc = np.ascontiguousarray(image.transpose(1, 2, 0))
        if hwc.shape[-1] == 1:  # grey → RGB, as clean-fid's PIL .convert("RGB") does for files
            hwc = np.repeat(hwc, 3, axis=-1)
        return torch.from_numpy(np.asarray(self.resize(hwc), np.float32).transpose(2, 0, 1).copy())

    @torch.no_grad()
    def __call__(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        arr = np.asarray(images, dtype=np.uint8)
        out = []
        for i in range(0, len(arr), batch_size):
            batch = torch.stack([self._prepare(img) for img in arr[i : i + batch_size]])
            out.append(self.model(batch.to(device())).cpu())
        return torch.cat(out).double().numpy()


def inception_candidates(cfg: FIDConfig) -> list[Path]:
    """Where Inception weights are used from: only the configured path (file or folder). The TorchScript file is
    executed when loaded, so a copy that merely sits in clean-fid's world-writable cache folder is not trusted."""
    if not cfg.inception_weights:
        return []
    p = Path(cfg.inception_weights).expanduser()
    return [p / INCEPTION_FILENAME if p.is_dir() else p]


def find_inception_weights(cfg: FIDConfig) -> Path | None:
    return next((p for p in inception_candidates(cfg) if p.is_file()), None)


def _untrusted_cache_note() -> str:
    cached = CLEANFID_CACHE_DIR / INCEPTION_FILENAME
    if not cached.is_file():
        return ""
    return (f" ({cached} exists, but {CLEANFID_CACHE_DIR} is writable by every user, so it is not loaded unless you "
            f"name it: eval.fid.inception_weights={cached})")


def _fetch_hint(where: list[Path]) -> str:
    looked = f"looked in: {', '.join(map(str, where))}" if where else "eval.fid.inception_weights is not set"
    return (f"{looked}{_untrusted_cache_note()}. To get them, on a connected machine run "
            f"`curl -L -o {INCEPTION_FILENAME} {INCEPTION_URL}` and copy the file here, then set "
            f"eval.fid.inception_weights=/path/to/{INCEPTION_FILENAME}")


def choose_extractor(cfg: FIDConfig) -> tuple[str, Path | None]:
    """('inception', weights) or ('proxy', None), following `eval.fid.feature_extractor`."""
    if cfg.feature_extractor == "proxy":
        return "proxy", None
    weights = find_inception_weights(cfg)
    if weights is not None:
        return "inception", weights
    where = inception_candidates(cfg)
    if cfg.feature_extractor == "inception":
        raise FIDError(f"eval.fid.feature_extractor is 'inception' but {INCEPTION_FILENAME} was not found; "
                       f"{_fetch_hint(where)}. Or set eval.fid.feature_extractor=auto to fall back to the proxy.")
    print(f"fid: Inception weights not found ({_fetch_hint(where)}); using the labelled proxy FID "
          "(classifier features, not comparable with published FIDs)")
    return "proxy", None


def build_extractor(kind: str, weights: Path | None, feature_dir: Path) -> ProxyExtractor | InceptionExtractor:
    if kind == "inception":
        assert weights is not None
        return InceptionExtractor(weights)
    model, _ = load_classifier(feature_dir)
    return ProxyExtractor(model, sha256_file(feature_dir / "classifier.safetensors"))


# ---------------------------------------------------------------------------------------------- the stage


def manifold_path(stats_path: Path) -> Path:
    """Where a split's sample of real features (for precision, recall and coverage) sits beside its statistics."""
    return stats_path.with_name(stats_path.stem + "_manifold.npz")


def balanced_order(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices in an order whose every prefix is as class-balanced as the data allows (classes taken in turn, each
    shuffled), like the generated samples' labels 0, 1, …, 0, 1, …"""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    rounds = max(len(idx) for idx in per_class)
    return np.array([idx[i] for i in range(rounds) for idx in per_class if i < len(idx)], dtype=np.int64)


def _split_stats(extractor, images: np.ndarray, labels: np.ndarray, path: Path, info: dict[str, Any],
                 manifold_samples: int = 0) -> dict[str, Any]:
    """Compute (or reuse, when the sidecar matches exactly) one split's statistics; returns its sidecar. With
    `manifold_samples`, also keep the features of that many of its images (a fixed random draw) with their labels."""
    sidecar = path.with_suffix(".json")
    info = {**info, "manifold_samples": min(manifold_samples, len(labels))}
    if path.exists() and sidecar.exists() and (not manifold_samples or manifold_path(path).exists()):
        old = json.loads(sidecar.read_text())
        if {k: old.get(k) for k in info} == info:
            print(f"fid: reusing cached {path.name}")
            return old
    feats = extractor(images)
    mu, sigma = feature_stats(feats)
    full = {**info, "feature_dim": int(feats.shape[1]), "class_diversity": class_diversity(feats, labels)}
    if manifold_samples:
        keep = balanced_order(labels)[: info["manifold_samples"]]
        np.savez(manifold_path(path), features=feats[keep].astype(np.float32), labels=labels[keep])
    save_stats(path, mu, sigma, full)
    return full


def run_fid_reference(ctx: StageContext) -> dict[str, Any]:
    """Train + save the proxy classifier; cache reference statistics for both splits."""
    from dmd2.data import open_split

    exp, paths = ctx.exp, ctx.paths
    out, res = paths.feature_net, exp.data.resolution
    out.mkdir(parents=True, exist_ok=True)
    splits = {name: open_split(paths.data, name, res) for name in ("train", "heldout")}
    arrays = {name: ds.all_uint8() for name, ds in splits.items()}
    num_classes = max(1, splits["train"].num_classes)
    (x_tr, y_tr), (x_ho, y_ho) = arrays["train"], arrays["heldout"]

    t0, ccfg = time.time(), exp.eval.classifier
    model = train_classifier(x_tr, y_tr, num_classes, ccfg)
    train_seconds = round(time.time() - t0, 2)
    heldout_acc, train_acc = classifier_accuracy(model, x_ho, y_ho), classifier_accuracy(model, x_tr, y_tr)
    save_classifier(out, model, {"in_channels": int(x_tr.shape[1]), "num_classes": num_classes, "resolution": res,
                                 "width": ccfg.width, "feature_dim": ccfg.feature_dim, "steps": ccfg.steps,
                                 "batch_size": ccfg.batch_size, "lr": ccfg.lr, "seed": ccfg.seed,
                                 "trained_on": "train", "train_count": len(y_tr), "train_accuracy": train_acc,
                                 "heldout_accuracy": heldout_acc, "train_seconds": train_seconds})
    print(f"fid: feature classifier trained in {train_seconds}s; held-out accuracy {heldout_acc:.4f}")

    kind, weights = choose_extractor(exp.eval.fid)
    extractor = build_extractor(kind, weights, out)
    stats = {}
    for split, (x, y) in arrays.items():
        meta = splits[split].meta
        info = {"extractor": kind, "extractor_sha256": extractor.weights_sha256, "dataset": paths.experiment,
                "split": split, "count": int(len(y)), "resolution": res, "source": meta.get("source"),
                "source_sha256": meta.get("source_sha256"),
                "protocol": "clean-fid clean (PIL bicubic to 299, Inception-v3 pool3)" if kind == "inception"
                else f"proxy: {ccfg.feature_dim}-d penultimate features of the feature classifier"}
        name = stats_filename(paths.experiment, split, kind, res)
        keep = exp.eval.fid.manifold_samples if split == exp.eval.fid.reference_split else 0
        stats[split] = {"file": name, **_split_stats(extractor, x, y, out / name, info, keep)}
    index = {"extractor": kind, "is_proxy": extractor.is_proxy, "weights": str(weights) if weights else None,
             "weights_sha256": extractor.weights_sha256, "reference_split": exp.eval.fid.reference_split,
             "dataset": paths.experiment, "resolution": res, "stats": stats,
             "coco": _coco_stats(exp, paths, extractor, out) if exp.eval.coco.enabled else None}
    (out / REFERENCE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return {"extractor": kind, "is_proxy": extractor.is_proxy, "reference_split": exp.eval.fid.reference_split,
            "heldout_accuracy": heldout_acc, "train_accuracy": train_acc, "classifier_train_seconds": train_seconds,
            "stats_files": [s["file"] for s in stats.values()]}


def _coco_stats(exp: ExperimentConfig, paths: ExperimentPaths, extractor, out: Path) -> dict[str, Any] | None:
    """The COCO protocol's reference statistics (`dmd2.coco`), cached once; None without Inception weights."""
    from dmd2.coco import reference_features

    if extractor.is_proxy:
        print("fid: eval.coco is set, but the COCO protocol needs Inception features (eval.fid.inception_weights); "
              "its FID is skipped and the proxy rows stand")
        return None
    feats, patch_feats, info = reference_features(extractor, exp.eval.coco, paths.root)
    files = {"file": f"coco_{exp.eval.coco.resolution}.npz"}
    if patch_feats is not None:
        files["patch_file"] = f"coco_patch_{exp.eval.coco.patch_size}.npz"
    for key, features in (("file", feats), ("patch_file", patch_feats)):
        if key in files:
            save_stats(out / files[key], *feature_stats(features), {**info, "extractor_sha256": extractor.weights_sha256})
    print(f"fid: COCO reference statistics of {info['count']} images at {info['resolution']}px"
          + (f" (and of their centre {info['patch_size']}px patches)" if patch_feats is not None else "")
          + f" cached in {out}")
    return {**files, **info}


# ----------------------------------------------------------------------------------------- for evaluation


class FIDReference:
    """What evaluation needs from the `fid-reference` stage: extractor, classifier and reference statistics."""

    def __init__(self, exp: ExperimentConfig, paths: ExperimentPaths):
        out = paths.feature_net
        index_file = out / REFERENCE_INDEX
        if not index_file.exists():
            raise FIDError(f"{index_file} not found; run `dmd2 fid-reference` first")
        self.index = json.loads(index_file.read_text())
        self.classifier, self.classifier_info = load_classifier(out)
        weights = Path(self.index["weights"]) if self.index.get("weights") else None
        self.extractor = build_extractor(self.index["extractor"], weights, out)
        if self.extractor.weights_sha256 != self.index["weights_sha256"]:
            raise FIDError(f"the {self.extractor.name} weights changed since {index_file} was written; "
                           "rerun `dmd2 fid-reference`")
        ref_split = exp.eval.fid.reference_split
        if ref_split != self.index["reference_split"]:
            raise FIDError(f"eval.fid.reference_split is '{ref_split}' but {out} holds '{self.index['reference_split']}' "
                           "as the reference; rerun `dmd2 fid-reference`")
        self.reference_split = ref_split
        self.other_split = "heldout" if ref_split == "train" else "train"
        self.mu, self.sigma, self.info = load_stats(out / self.index["stats"][ref_split]["file"])
        self.manifold_file = manifold_path(out / self.index["stats"][ref_split]["file"])
        self.neighbours, self.manifold_samples = exp.eval.fid.neighbours, exp.eval.fid.manifold_samples
        self._manifold: tuple[np.ndarray, np.ndarray] | None = None
        self.other_mu, self.other_sigma, self.other_info = load_stats(out / self.index["stats"][self.other_split]["file"])
        coco = self.index.get("coco")
        self.coco = load_stats(out / coco["file"]) if coco else None  # (mu, sigma, info) of the COCO protocol
        self.coco_patch = load_stats(out / coco["patch_file"]) if coco and coco.get("patch_file") else None
        for key in ("resolution", "patch_size"):
            wanted = getattr(exp.eval.coco, key)
            if exp.eval.coco.enabled and coco and coco.get(key) != wanted:
                raise FIDError(f"eval.coco.{key} is {wanted} but {out} holds COCO statistics for {coco.get(key)}; "
                               "rerun `dmd2 fid-reference`")

    def coco_fid(self, features: np.ndarray, patch: bool = False) -> float:
        """The COCO protocol's FID of generated features (`patch`: of their centre patches, patch FID)."""
        reference = self.coco_patch if patch else self.coco
        return fid_of_features(features, reference[0], reference[1])

    @property
    def is_proxy(self) -> bool:
        return self.extractor.is_proxy

    def fid(self, features: np.ndarray) -> float:
        return fid_of_features(features, self.mu, self.sigma)

    def fid_bootstrap(self, features: np.ndarray, repeats: int, seed: int = 0) -> list[float]:
        """The FID of `repeats` bootstrap resamples (with replacement, same size) of `features`. The resampled
        indices depend only on the seed and the count, so two models sampled from the same noise are resampled
        alike: their differences are paired."""
        rng = np.random.default_rng(seed)
        return [self.fid(features[rng.integers(0, len(features), len(features))]) for _ in range(repeats)]

    def fid_spread(self, features: np.ndarray, repeats: int, seed: int = 0) -> float | None:
        """How much the draw of samples moves the FID: the standard deviation over `repeats` bootstrap resamples;
        None when `repeats` < 2."""
        if repeats < 2:
            return None
        return float(np.std(self.fid_bootstrap(features, repeats, seed), ddof=1))

    def paired_difference(self, features_a: np.ndarray, features_b: np.ndarray, repeats: int,
                          seed: int = 0) -> tuple[float, float | None]:
        """FID(a) − FID(b) and its standard deviation over paired bootstrap resamples, for two models sampled
        from the same noise and labels (sample i of a and of b share them). Much tighter than the two FIDs'
        own spreads, which mostly move together with the draw of seeds."""
        difference = self.fid(features_a) - self.fid(features_b)
        if repeats < 2 or len(features_a) != len(features_b):
            return difference, None
        paired = np.subtract(self.fid_bootstrap(features_a, repeats, seed), self.fid_bootstrap(features_b, repeats, seed))
        return difference, float(np.std(paired, ddof=1))

    def fid_in_subsets(self, features: np.ndarray, n: int) -> tuple[float, float] | None:
        """Mean and standard deviation of the FID over disjoint subsets of `n` samples: a model's FID at the real
        floor's sample count (FID is biased upwards at small N, so only equal counts compare); None without at
        least two subsets."""
        k = len(features) // n if n > 0 else 0
        if k < 2:
            return None
        values = [self.fid(features[i * n:(i + 1) * n]) for i in range(k)]
        return float(np.mean(values)), float(np.std(values, ddof=1))

    def manifold_scores(self, features: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
        """Precision, recall and per-class coverage of generated `features` (sampled for `labels`) against the
        reference split's kept features, on at most `eval.fid.manifold_samples` of each."""
        if self._manifold is None:
            if not self.manifold_file.exists():
                raise FIDError(f"{self.manifold_file} not found (reference statistics from an older version); "
                               "rerun `dmd2 fid-reference`")
            with np.load(self.manifold_file) as kept:
                self._manifold = kept["features"], kept["labels"]
        real, real_labels = self._manifold
        n = min(len(features), len(real), self.manifold_samples)
        k = self.neighbours
        precision, recall = precision_recall(real[:n], features[:n], k)
        fake_labels = labels[:n] if labels is not None else np.zeros(n, np.int64)
        if labels is None:  # unconditional: one class, the whole set
            real_labels = np.zeros(len(real_labels), np.int64)
        per_class = class_coverage(real[:n], real_labels[:n], features[:n], fake_labels, k)
        values = list(per_class.values())
        return {"precision": round(precision, 4), "recall": round(recall, 4),
                "class_coverage": round(float(np.mean(values)), 4) if values else None,
                "class_coverage_min": round(min(values), 4) if values else None,
                "class_coverage_per_class": {str(c): round(v, 4) for c, v in per_class.items()},
                "manifold_samples": n}

    def real_fid(self) -> float:
        """FID of the other real split against the reference: the floor of this metric at that sample size."""
        return frechet_distance(self.other_mu, self.other_sigma, self.mu, self.sigma)
