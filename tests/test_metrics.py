import numpy as np
import pytest
import torch

import metrics


def labels_and_scores(kind, n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n + [1] * n)
    if kind == "perfect":
        scores = np.concatenate([rng.uniform(0.0, 0.4, n), rng.uniform(0.6, 1.0, n)])
    elif kind == "inverted":
        scores = np.concatenate([rng.uniform(0.6, 1.0, n), rng.uniform(0.0, 0.4, n)])
    elif kind == "random":
        scores = rng.uniform(0, 1, 2 * n)
    elif kind == "ties":
        scores = np.full(2 * n, 0.5)
    return scores, labels


def test_perfect_scores():
    m = metrics.detection_metrics(*labels_and_scores("perfect"), threshold=0.5)
    assert m["auc"] == 1.0 and m["ap"] == 1.0
    assert m["eer"] == 0.0 and m["tpr@1%fpr"] == 1.0
    assert m["accuracy"] == 1.0 and m["tpr"] == 1.0 and m["fpr"] == 0.0


def test_inverted_scores():
    m = metrics.detection_metrics(*labels_and_scores("inverted"), threshold=0.5)
    assert m["auc"] == 0.0
    assert m["eer"] == 1.0 and m["tpr@1%fpr"] == 0.0 and m["accuracy"] == 0.0


def test_random_scores_are_near_chance():
    m = metrics.detection_metrics(*labels_and_scores("random", n=5000), threshold=0.5)
    assert abs(m["auc"] - 0.5) < 0.02 and abs(m["ap"] - 0.5) < 0.02
    assert abs(m["eer"] - 0.5) < 0.02 and abs(m["accuracy"] - 0.5) < 0.02
    assert m["tpr@1%fpr"] < 0.03


def test_ties_count_half():
    m = metrics.detection_metrics(*labels_and_scores("ties"), threshold=0.5)
    assert m["auc"] == 0.5 and m["eer"] == 0.5 and m["tpr@1%fpr"] == 0.0
    assert m["ap"] == 0.5  # one operating point with precision 1/2
    assert m["accuracy"] == 0.5 and m["tpr"] == 1.0  # a score equal to the threshold counts as fake


def test_detection_metrics_refuse_one_class():
    with pytest.raises(ValueError):
        metrics.detection_metrics([0.1, 0.2], [1, 1])


def test_pick_threshold_separates_separable_scores():
    scores, labels = labels_and_scores("perfect")
    t = metrics.pick_threshold(scores, labels)
    assert scores[labels == 0].max() < t <= scores[labels == 1].min()
    assert metrics.detection_metrics(scores, labels, t)["accuracy"] == 1.0


def test_eer_interpolates_between_roc_points():
    # one real above one fake out of two each: the ROC crosses the EER line between points
    scores, labels = [0.1, 0.6, 0.4, 0.9], [0, 0, 1, 1]
    assert metrics.detection_metrics(scores, labels)["eer"] == pytest.approx(0.5)
    scores, labels = [0.1, 0.2, 0.3, 0.7, 0.4, 0.8, 0.9, 0.95], [0, 0, 0, 0, 1, 1, 1, 1]
    assert metrics.detection_metrics(scores, labels)["eer"] == pytest.approx(0.25)


def smooth_images(n, seed, shift=0.0):
    """Blurred noise in [-1, 1]: natural-ish images whose statistics a shift changes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1) * 1.5
    return (x + shift).clamp(-1, 1)


def test_swd_same_distribution_small_shifted_large():
    a, b = smooth_images(96, 0), smooth_images(96, 1)
    same = metrics.sliced_wasserstein(a, b, patches_per_image=32)
    # a difference that the per-channel normalisation cannot remove: a coarser texture
    g = torch.Generator().manual_seed(2)
    coarse = torch.nn.functional.interpolate(torch.randn(96, 3, 4, 4, generator=g), size=32, mode="bilinear").clamp(-1, 1)
    shifted = metrics.sliced_wasserstein(a, coarse, patches_per_image=32)
    assert set(same) == {"32", "16", "avg"}
    assert same["avg"] < 0.5 * shifted["avg"]
    assert same["32"] < 0.5 * shifted["32"] and same["16"] < 0.5 * shifted["16"]


def test_swd_is_deterministic_for_a_seed():
    a, b = smooth_images(32, 0), smooth_images(32, 1)
    assert metrics.sliced_wasserstein(a, b, seed=3, patches_per_image=16) == metrics.sliced_wasserstein(a, b, seed=3, patches_per_image=16)


def test_laplacian_pyramid_sizes():
    x = smooth_images(4, 0)
    levels = metrics.laplacian_pyramid(x, min_size=8)
    assert [l.shape[-1] for l in levels] == [32, 16, 8]


def test_frechet_distance_closed_form_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # diagonal covariances commute: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)
    # a full covariance against c times itself: FD = Tr(S) (1 + c - 2 sqrt(c))
    m = rng.normal(size=(d, d))
    s = m @ m.T + np.eye(d)
    c = 2.5
    assert metrics.frechet_distance(mu1, s, mu1, c * s) == pytest.approx(np.trace(s) * (1 + c - 2 * np.sqrt(c)), rel=1e-6)
    assert metrics.frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-6)


def test_no_inception_weights_says_where_to_get_them():
    model, why = metrics.load_inception(None)
    assert model is None
    assert "skipped" in why and "weights-inception-2015-12-05" in why and "--inception-weights" in why


def test_fid_and_kid_from_a_local_weights_file(random_inception_weights):
    model, why = metrics.load_inception(random_inception_weights)
    assert why is None
    images = torch.cat([smooth_images(2, 0), smooth_images(2, 1), torch.rand(2, 3, 32, 32) * 2 - 1])
    features = metrics.inception_features(model, images)  # one call: the network costs about a second an image on 2 cores
    assert features.shape == (6, 2048)
    # The features' first 64 dimensions: the 2048-dimensional matrix square root costs 25 s a call on 2 cores,
    # and the maths is tested on its own above; what is left to show is that the pieces fit together.
    fa, fb, fn = features[:, :64].split(2)
    assert metrics.fid_kid(fa, fa)["fid"] == pytest.approx(0.0, abs=1e-3)
    same, other = metrics.fid_kid(fa, fb), metrics.fid_kid(fa, fn)
    assert same["fid"] < other["fid"] and same["kid_x1e3"] < other["kid_x1e3"]


def test_a_wrong_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(metrics.UserError, match="Inception-v3 2015-12-05"):
        metrics.load_inception(str(path))
    with pytest.raises(metrics.UserError, match="does not exist"):
        metrics.load_inception(str(tmp_path / "missing.pth"))


def test_the_threshold_is_the_one_validation_picks():
    scores = [0.05, 0.2, 0.3, 0.62, 0.4, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    t = metrics.pick_threshold(scores, labels)
    # best balanced accuracy: all fakes caught with one false alarm (0.62) at 0.4, or none at 0.7 with one fake missed;
    # the first point of the tie, 0.7 (J = 0.75), sits halfway to the next score below it, 0.62
    assert t == pytest.approx((0.7 + 0.62) / 2)
    assert metrics.detection_metrics(scores, labels, t)["accuracy"] == 7 / 8


def test_pairs_compare_each_fake_with_its_own_real_video():
    scores = {"/d/real/a.mp4": 0.2, "/d/fake/a.mp4": 0.5,   # caught
              "/d/real/b.mp4": 0.6, "/d/fake/b.mp4": 0.4,   # the fake looks more real than its twin
              "/d/real/c.mp4": 0.1, "/d/fake/x.mp4": 0.9,   # no twins
              "/d/real/d.mp4": None, "/d/fake/d.mp4": 0.3}  # no face in the real one: not a pair
    assert metrics.pair_wins(scores, "/d") == (1, 2)


def test_the_false_alarm_threshold_calls_exactly_the_allowed_share_of_reals_fake():
    real = np.random.default_rng(0).random(1000)
    t = metrics.false_alarm_threshold(real, 0.05)
    assert (real >= t).sum() == 50 and (real >= np.nextafter(t, 0)).sum() == 51  # the lowest that allows only 50
    assert metrics.false_alarm_threshold([0.1, 0.9, 0.3, 0.2], 0.05) > 0.9  # 5% of 4 is none: above every real file
    assert metrics.false_alarm_threshold([0.1, 1.0], 0.05) == 1.0  # P(fake) cannot exceed 1: a real file at 1.0 stays called fake
    assert (real[:100] >= metrics.false_alarm_threshold(real[:100], 0.29)).sum() == 29  # 0.29 * 100 is 28.99... in floating point
