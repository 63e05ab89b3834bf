"""FID maths against clean-fid, the stats file format, the proxy classifier and the Inception code path."""

import json

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image
from torch import nn

from dmd2 import fid
from dmd2.config import ClassifierConfig, FIDConfig

# torch warns that TorchScript is deprecated; clean-fid's Inception is a TorchScript file, so the tests use it anyway
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def random_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


@pytest.mark.parametrize("n1,n2,d", [(500, 400, 32), (300, 300, 64), (40, 50, 64)], ids=["tall", "square", "rank-deficient"])
def test_frechet_distance_matches_cleanfid(n1, n2, d):
    f1, f2 = random_features(n1, d, 0), random_features(n2, d, 1, shift=0.3)
    mu1, s1 = fid.feature_stats(f1)
    mu2, s2 = fid.feature_stats(f2)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    theirs = float(cleanfid_fid.frechet_distance(mu1, s1, mu2, s2))
    assert isinstance(ours, float)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert ours == pytest.approx(float(cleanfid_fid.fid_from_feats(f1, f2)), rel=1e-6)


@pytest.mark.parametrize("n,d", [(12, 256), (40, 64), (65, 64), (300, 64)], ids=["12x256", "40x64", "65x64", "300x64"])
def test_fid_of_few_features_takes_the_low_rank_route_to_clean_fids_number(n, d):
    """Fewer samples than dimensions: tr sqrt(S1 S2) from the N x N matrix, the same FID as clean-fid's D x D sqrtm."""
    f1, f2 = random_features(n, d, 5, shift=0.2), random_features(3 * d, d, 6)
    mu2, s2 = fid.feature_stats(f2)
    theirs = float(cleanfid_fid.frechet_distance(*fid.feature_stats(f1), mu2, s2))
    assert fid.fid_of_features(f1, mu2, s2) == pytest.approx(theirs, rel=1e-6)
    repeated = f1[np.arange(n) % (n // 2)]  # a bootstrap resample repeats samples: lower rank still
    assert fid.fid_of_features(repeated, mu2, s2) == pytest.approx(
        float(cleanfid_fid.frechet_distance(*fid.feature_stats(repeated), mu2, s2)), rel=1e-6)


def test_frechet_distance_basics():
    f = random_features(300, 16, 2)
    mu, sigma = fid.feature_stats(f)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # pure mean shift: FID = |Δμ|²
    assert fid.frechet_distance(mu + 2.0, sigma, mu, sigma) == pytest.approx(4.0 * 16, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])


def test_feature_stats_is_float64_mean_and_unbiased_covariance():
    f = random_features(100, 8, 3).astype(np.float32)
    mu, sigma = fid.feature_stats(f)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False))


def test_stats_npz_round_trip_in_cleanfid_format(tmp_path):
    mu, sigma = fid.feature_stats(random_features(200, 12, 4))
    info = {"extractor": "proxy", "dataset": "mnist", "split": "train", "count": 200, "resolution": 16}
    path = fid.save_stats(tmp_path / fid.stats_filename("mnist", "train", "proxy", 16), mu, sigma, info)
    assert path.name == "mnist_train_proxy_16.npz"
    # the way clean-fid reads its own stats files (get_reference_statistics)
    stats = np.load(path)
    assert set(stats.files) == {"mu", "sigma"}
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
    mu2, sigma2, info2 = fid.load_stats(path)
    np.testing.assert_array_equal(sigma2, sigma)
    assert info2 == info == json.loads(path.with_suffix(".json").read_text())


def test_class_diversity_scales_with_spread():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 50)
    feats = rng.normal(size=(200, 8))
    assert fid.class_diversity(3 * feats, labels) == pytest.approx(3 * fid.class_diversity(feats, labels))
    assert fid.class_diversity(np.zeros((200, 8)), labels) == 0.0


def digits(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two easy synthetic classes (bright top half vs bright bottom half) at 16x16."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 1, 16, 16))
    for i, y in enumerate(labels):
        images[i, 0, :8] += 180 * (y == 0)
        images[i, 0, 8:] += 180 * (y == 1)
    return images.astype(np.uint8), labels


def _points(*values: float) -> np.ndarray:
    return np.array(values, np.float64)[:, None]


def test_kth_neighbour_distance_leaves_the_point_itself_out():
    points = torch.from_numpy(_points(0, 1, 3, 7))
    assert fid.kth_neighbour_distance(points, 1).tolist() == [1, 1, 2, 4]
    assert fid.kth_neighbour_distance(points, 2, chunk=3).tolist() == [3, 2, 3, 6]


def test_precision_and_recall_by_hand():
    """Real 0, 1, 2, 3 (k = 1: every real ball has radius 1); generated 0.5 and 10. Precision: 0.5 lies in a real
    ball, 10 in none → 1/2. Recall: the two generated points are each other's nearest (9.5 apart), so their balls
    (radius 9.5) hold every real point → 1."""
    assert fid.precision_recall(_points(0, 1, 2, 3), _points(0.5, 10), k=1) == (0.5, 1.0)
    # generated 0.5, 0.6, 2.9, 3.2: all in real balls; their own balls are 0.1, 0.1, 0.3, 0.3 wide, so only real 3
    # (0.1 from 2.9) is reached
    assert fid.precision_recall(_points(0, 1, 2, 3), _points(0.5, 0.6, 2.9, 3.2), k=1) == (1.0, 0.25)


def test_class_coverage_by_hand():
    """Class 0: reals 0, 1, 2, 3 with k = 1 balls of radius 1; the one sample generated for it, at 0.2, reaches
    reals 0 and 1 → 0.5. Class 1: reals 10, 11, and its sample at 10.5 reaches both → 1. A sample generated for
    class 0 near class 1's reals does not count for class 1."""
    real, real_labels = _points(0, 1, 2, 3, 10, 11), np.array([0, 0, 0, 0, 1, 1])
    coverage = fid.class_coverage(real, real_labels, _points(0.2, 10.5), np.array([0, 1]), k=1)
    assert coverage == {0: 0.5, 1: 1.0}
    assert fid.class_coverage(real, real_labels, _points(0.2, 10.5), np.array([0, 0]), k=1) == {0: 0.5}


def test_the_kept_real_features_are_class_balanced_in_every_prefix():
    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    order = fid.balanced_order(labels)
    assert sorted(order.tolist()) == list(range(10))
    assert labels[order[:3]].tolist() == [0, 1, 2] and sorted(labels[order[3:5]].tolist()) == [0, 1]
    assert labels[order[-3:]].tolist() == [0, 0, 0]  # the largest class fills the end once the others run out


def test_proxy_classifier_is_deterministic_and_learns():
    images, labels = digits()
    cfg = ClassifierConfig(width=8, feature_dim=16, steps=40, batch_size=32, lr=5e-3, seed=3)
    a = fid.train_classifier(images, labels, 2, cfg)
    b = fid.train_classifier(images, labels, 2, cfg)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    test_images, test_labels = digits(128, seed=1)
    assert fid.classifier_accuracy(a, test_images, test_labels) > 0.9
    feats = fid.ProxyExtractor(a, "x")(test_images)
    assert feats.shape == (128, 16) and feats.dtype == np.float64


# ------------------------------------------------------------------------------------- Inception code path


class _FakeInceptionLayers(nn.Module):
    """Stands in for the TorchScript Inception's `layers` (B×3×299×299 → B×2048); the real file is not shipped."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=3)
        self.pool = nn.AdaptiveAvgPool2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.tanh(self.conv(x))).flatten(1)


class _FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _FakeInceptionLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture
def fake_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights" / fid.INCEPTION_FILENAME
    path.parent.mkdir()
    torch.jit.script(_FakeInception()).save(str(path))
    return path


def test_inception_features_follow_cleanfids_own_file_pipeline(fake_weights, tmp_path):
    """Our in-memory path (uint8 grey → RGB → clean resize → model) equals clean-fid reading the same PNGs."""
    from cleanfid.inception_torchscript import InceptionV3W

    images, _ = digits(12)
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(img[0]).save(files[-1])
    model = InceptionV3W(str(fake_weights.parent), download=False).eval()
    theirs = cleanfid_fid.get_files_features([str(f) for f in files], model=model, num_workers=0, batch_size=5,
                                             device=torch.device("cpu"), mode="clean", verbose=False)
    ours = fid.InceptionExtractor(fake_weights)(images, batch_size=5)
    assert ours.shape == (12, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_inception_weights_lookup(fake_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fid, "CLEANFID_CACHE_DIR", tmp_path / "empty-cache")
    # auto without weights: the labelled proxy, announced in exactly one line
    assert fid.choose_extractor(FIDConfig(feature_extractor="auto")) == ("proxy", None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "Inception weights not found" in lines[0] and "proxy" in lines[0]
    assert "eval.fid.inception_weights is not set" in lines[0] and fid.INCEPTION_URL in lines[0]
    # inception without weights: an error naming where it looked and the fix
    with pytest.raises(fid.FIDError, match="inception_weights") as err:
        fid.choose_extractor(FIDConfig(feature_extractor="inception", inception_weights=str(tmp_path / "nope.pt")))
    assert str(tmp_path / "nope.pt") in str(err.value)
    # the configured path (file or folder)
    assert fid.choose_extractor(FIDConfig(inception_weights=str(fake_weights))) == ("inception", fake_weights)
    assert fid.choose_extractor(FIDConfig(inception_weights=str(fake_weights.parent)))[0] == "inception"
    assert fid.choose_extractor(FIDConfig(feature_extractor="proxy")) == ("proxy", None)


def test_a_file_in_the_shared_cache_folder_is_not_loaded_unless_named(fake_weights, monkeypatch, capsys):
    """The TorchScript file runs when loaded: one that anyone could have put in /tmp is named, never used."""
    monkeypatch.setattr(fid, "CLEANFID_CACHE_DIR", fake_weights.parent)
    assert fid.choose_extractor(FIDConfig()) == ("proxy", None)
    out = capsys.readouterr().out
    assert f"{fake_weights} exists" in out and f"eval.fid.inception_weights={fake_weights}" in out


def test_inception_weights_under_another_file_name(fake_weights, tmp_path):
    other = tmp_path / "my-inception.pt"
    other.write_bytes(fake_weights.read_bytes())
    images, _ = digits(4)
    np.testing.assert_allclose(fid.InceptionExtractor(other)(images), fid.InceptionExtractor(fake_weights)(images))


def test_paired_fid_difference_cancels_the_shared_seed_noise():
    from dmd2.fid import FIDReference

    ref = object.__new__(FIDReference)  # only the reference statistics are needed here
    ref.mu, ref.sigma = np.array([0.7, 0, 0, 0]), np.eye(4)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 4))  # a model 0.7 off the reference mean
    b = a + np.array([0.1, 0, 0, 0]) + 0.05 * rng.standard_normal((400, 4))  # the same seeds, a model 0.6 off

    difference, std = ref.paired_difference(b, a, repeats=50)
    assert difference == pytest.approx(ref.fid(b) - ref.fid(a))
    assert difference == pytest.approx(0.6**2 - 0.7**2, abs=0.05)
    # the two FIDs' own spreads are several times the paired spread of their difference
    assert std < 0.5 * min(ref.fid_spread(a, 50), ref.fid_spread(b, 50))
    assert ref.paired_difference(a, a, repeats=50) == (0.0, 0.0)
    assert ref.paired_difference(a, b[:300], repeats=50)[1] is None  # unpaired counts: no paired spread
