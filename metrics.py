"""The numbers: how good the faces are and how well a detector tells them apart.

Only numbers live here, from scores, labels and images; the reports built from them (tables,
charts, the end-of-run report) are in reports.py. Nothing of the project is imported but
cli's UserError, so every module may use these.

Detection: scores are P(fake) and labels are 1 for fake, 0 for real, so "positive" always
means "caught a fake". AUC, average precision and the ROC come from scikit-learn; the
equal error rate and the true-positive rate at 1% false positives are read off its ROC.

Generation: the sliced Wasserstein distance between Laplacian-pyramid patches (Karras et
al. 2018, "Progressive growing of GANs", appendix D) needs no pretrained network, so it
runs everywhere, every epoch. FID and KID use torch-fidelity's port of the TF Inception-v3
(2015-12-05) from a local weights file, because many machines cannot download it.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cli import UserError

INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_HELP = ("get the Inception-v3 2015-12-05 weights (weights-inception-2015-12-05-6726825d.pth, 91 MB) from "
                  f"{INCEPTION_URL} and pass --inception-weights PATH")


# -----------------------------------------------------------------------------
# detection

def detection_metrics(scores, labels, threshold=None):
    """scores = P(fake), labels 1 = fake -> AUC, AP, EER, TPR@1%FPR and, given a threshold, accuracy.

    An image counts as fake when its score is >= threshold (scikit-learn's convention for roc_curve).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) != 2:
        raise ValueError("detection metrics need both real (0) and fake (1) labels")
    fpr, tpr, _ = roc_curve(labels, scores)
    out = {
        "auc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "eer": equal_error_rate(fpr, tpr),
        "tpr@1%fpr": float(tpr[fpr <= 0.01].max()),
        "n_real": int((labels == 0).sum()),
        "n_fake": int((labels == 1).sum()),
    }
    if threshold is not None:
        predicted = scores >= threshold
        out["threshold"] = float(threshold)
        out["accuracy"] = float((predicted == labels.astype(bool)).mean())
        out["tpr"] = float(predicted[labels == 1].mean())  # fakes caught
        out["fpr"] = float(predicted[labels == 0].mean())  # real faces flagged
    return out


def pair_wins(scores, root):
    """{path: score} -> (pairs where the fake scored above its real twin, pairs), for real/NAME and fake/NAME under root.

    Where a fake is made from a real video (the same frames, the face swapped), this is the
    cleanest test: scene, camera and compression are the same on both sides.
    """
    pairs = []
    for path, s in scores.items():
        rel = os.path.relpath(path, root).split(os.sep)
        twin = os.path.join(root, "fake", *rel[1:])
        if rel[0] == "real" and twin in scores and s is not None and scores[twin] is not None:
            pairs.append(scores[twin] > s)
    return int(sum(pairs)), len(pairs)


def equal_error_rate(fpr, tpr):
    """Where the miss rate (1 - TPR) equals the false-positive rate, linearly interpolated on the ROC."""
    fnr = 1 - tpr
    i = int(np.argmax(fnr <= fpr))  # the first ROC point past the crossing (the last point always is)
    if i == 0:
        return float(fpr[0])
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]  # d0 > 0 >= d1
    t = d0 / (d0 - d1)
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def pick_threshold(scores, labels):
    """The threshold on P(fake) with the best balanced accuracy (Youden's J = TPR - FPR) on these scores.

    It lies halfway between the lowest score counted fake and the next score below it, not on
    the first: a few validation videos place the boundary only that precisely, and a threshold
    equal to one validation score would sit on the edge of every new video like it.
    Meant for validation scores: a threshold picked on the test set would flatter the test accuracy.
    """
    scores = np.asarray(scores, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(np.asarray(labels).astype(int), scores, drop_intermediate=False)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # thresholds[0] is +inf (nothing flagged); never useful
    below = scores[scores < thresholds[best]]
    return float((thresholds[best] + below.max()) / 2) if len(below) else float(thresholds[best])


def false_alarm_threshold(real_scores, rate):
    """The lowest threshold on P(fake) at which at most `rate` of these real files' scores are called fake (score >= threshold).

    With k = floor(rate * n) real files allowed above it, it lies just above the (k+1)-th highest
    real score, so those k, and no more, are called fake. Few files mean few allowed: with 4
    real videos and rate 0.05 none is, and the threshold lies above all four.
    """
    s = np.sort(np.asarray(real_scores, dtype=np.float64))[::-1]
    if len(s) == 0:
        raise ValueError("a false-alarm threshold needs real scores")
    if not 0 <= rate < 1:
        raise ValueError(f"a false-alarm rate is in [0, 1), got {rate}")
    allowed = int(np.floor(rate * len(s) + 1e-9))  # 0.29 * 100 is 28.999...: 29 files may be called fake, not 28
    return float(min(1.0, np.nextafter(s[allowed], np.inf)))  # a real file at P(fake) 1.0 cannot be spared


# -----------------------------------------------------------------------------
# sliced Wasserstein distance on Laplacian pyramids (Karras et al. 2018)

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # the 5-tap kernel of their pyramid


def _blur(x):
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :]).to(x)
    k = k.expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def laplacian_pyramid(images, min_size=16):
    """images (N, C, S, S) -> [band at S, band at S/2, ..., Gaussian level at min_size]."""
    levels = []
    x = images
    while x.shape[-1] > min_size:
        small = _blur(x)[..., ::2, ::2]
        up = _blur(F.interpolate(small, scale_factor=2, mode="nearest"))  # zero-insertion upsampling, approximately
        levels.append(x - up)
        x = small
    levels.append(x)
    return levels


def _patches(level, patches_per_image, patch, generator):
    """Random patch x patch descriptors from every image, normalised per channel (their finalize_descriptors)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - patch + 1, (n, patches_per_image), generator=generator)
    xs = torch.randint(0, w - patch + 1, (n, patches_per_image), generator=generator)
    offsets = torch.arange(patch)
    rows = (ys[..., None] + offsets)[..., :, None]  # n, p, patch, 1
    cols = (xs[..., None] + offsets)[..., None, :]  # n, p, 1, patch
    idx = torch.arange(n)[:, None, None, None]
    desc = level.permute(0, 2, 3, 1)[idx, rows, cols]  # n, p, patch, patch, c
    desc = desc.reshape(-1, patch, patch, c)
    desc = (desc - desc.mean(dim=(0, 1, 2))) / desc.std(dim=(0, 1, 2)).clamp_min(1e-8)
    return desc.reshape(len(desc), -1)


def _sliced_wasserstein(a, b, directions, repeats, generator):
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the projections."""
    a, b = a.numpy(), b.numpy()
    results = []
    for _ in range(repeats):
        d = torch.randn(a.shape[1], directions, generator=generator).numpy()
        d /= np.linalg.norm(d, axis=0, keepdims=True)
        # sorted projections pair up the quantiles; numpy sorts these columns several times faster than torch on CPU
        pa, pb = np.sort((a @ d).T, axis=1), np.sort((b @ d).T, axis=1)
        results.append(np.abs(pa - pb).mean())
    return float(np.mean(results))


@torch.no_grad()
def sliced_wasserstein(real, fake, *, patches_per_image=128, patch=7, directions=128, repeats=4, seed=0):
    """SWD x 1e3 per pyramid level (keyed by resolution) and averaged, as Karras et al. report it.

    real and fake: (N, C, S, S) in [-1, 1]; the larger set is cut to the smaller one's size so that
    both give the same number of descriptors. Smaller is closer; two samples of one distribution
    give a small positive number that shrinks as N grows, so compare values at the same N.
    """
    n = min(len(real), len(fake))
    if n < 2:
        raise ValueError("SWD needs at least two images on each side")
    g = torch.Generator().manual_seed(seed)
    out = {}
    pyramids = laplacian_pyramid(real[:n].float().cpu()), laplacian_pyramid(fake[:n].float().cpu())
    for level_real, level_fake in zip(*pyramids):
        a = _patches(level_real, patches_per_image, patch, g)
        b = _patches(level_fake, patches_per_image, patch, g)
        out[str(level_real.shape[-1])] = 1e3 * _sliced_wasserstein(a, b, directions, repeats, g)
    out["avg"] = float(np.mean(list(out.values())))
    return out


# -----------------------------------------------------------------------------
# FID and KID (Inception-v3 2015-12-05 through torch-fidelity)

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2): torch-fidelity's implementation (from the TTUR reference code)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    stats = [{"mu": np.asarray(m, np.float64), "sigma": np.asarray(s, np.float64)} for m, s in ((mu1, sigma1), (mu2, sigma2))]
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID]


def check_inception_weights(path):
    if not os.path.isfile(path):
        raise UserError(f"--inception-weights {path} does not exist or is not a file; {INCEPTION_HELP}")


def load_inception(path):
    """The Inception-v3 feature extractor from a local weights file, or (None, why) when there is none."""
    if not path:
        return None, f"FID/KID skipped: no --inception-weights; {INCEPTION_HELP}"
    check_inception_weights(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        return None, "FID/KID skipped: torch-fidelity is not installed (pip install -r requirements.txt)"
    try:
        # torch-fidelity itself loads with weights_only=False; refuse anything that is not plain tensors first.
        torch.load(path, map_location="cpu", weights_only=True)
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path), None
    except Exception as e:
        raise UserError(f"--inception-weights {path} is not the Inception-v3 2015-12-05 weights torch-fidelity expects "
                        f"({type(e).__name__}); {INCEPTION_HELP}") from None


@torch.no_grad()
def inception_features(model, images, batch=50):
    """images (N, 3, S, S) in [-1, 1] -> (N, 2048) pool features; the network resizes to 299 itself."""
    feats = []
    for chunk in images.split(batch):
        x = ((chunk.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # the 8-bit images it was made for
        feats.append(model(x)[0])
    return torch.cat(feats).double()


def fid_kid(real_features, fake_features, kid_subset_size=1000, seed=0):
    """FID and KID (mean, std over 100 subsets, x 1e3 as usually printed) from Inception features."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    r, f = real_features.numpy(), fake_features.numpy()
    fid = frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))
    size = min(kid_subset_size, len(r), len(f))
    kid = kid_features_to_metric(real_features.float(), fake_features.float(), kid_subsets=100, kid_subset_size=size,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1, rng_seed=seed, verbose=False)
    return {"fid": fid, "kid_x1e3": 1e3 * kid[KEY_METRIC_KID_MEAN], "kid_std_x1e3": 1e3 * kid[KEY_METRIC_KID_STD],
            "kid_subset_size": size}
