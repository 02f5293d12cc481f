"""How good the faces are and how well a detector tells them apart.

Detection: scores are P(fake) and labels are 1 for fake, 0 for real, so "positive" always
means "caught a fake". AUC, average precision and the ROC come from scikit-learn; the
equal error rate and the true-positive rate at 1% false positives are read off its ROC.

Generation: the sliced Wasserstein distance between Laplacian-pyramid patches (Karras et
al. 2018, "Progressive growing of GANs", appendix D) needs no pretrained network, so it
runs everywhere, every epoch. FID and KID use torch-fidelity's port of the TF Inception-v3
(2015-12-05) from a local weights file, because many machines cannot download it.
"""

import glob
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import checkpoint
import data
import detector
from cli import UserError

DETECTOR_BATCH = 64  # real images per fine-tuning step, plus as many fakes
SPECTRUM_TRAIN_IMAGES = 2000  # per class, for the baseline's logistic regression
# noise seeds, offset from the run's seed so that training, validation and test fakes never share a z
SEED_VALID, SEED_TEST, SEED_EPOCH = 1_000_001, 2_000_003, 3_000_017

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


def video_table(reports):
    """{part: detection_metrics at the threshold} -> a Markdown table."""
    rows = ["| part | videos (real + fake) | AUC | AP | EER | accuracy | fakes caught | real called fake | fake above its real twin |",
            "|---|---|---|---|---|---|---|---|---|"]
    for part, m in reports.items():
        wins, pairs = m.get("pairs_fake_above_real", (0, 0))
        rows.append(f"| {part} | {m['n_real']} + {m['n_fake']} | {m['auc']:.3f} | {m['ap']:.3f} | {m['eer']:.3f} | "
                    f"{m['accuracy']:.3f} | {m['tpr']:.3f} | {m['fpr']:.3f} | {f'{wins} of {pairs}' if pairs else '-'} |")
    return "\n".join(rows)


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


def video_evaluation(items, scores, threshold, root):
    """[(path, label 1 = fake)] and their video scores (NaN: no face) -> overall metrics and one entry per subfolder of root.

    A video without a face has no score: it is counted, and left out of the metrics.
    """
    scores, labels = np.asarray(scores, dtype=float), np.array([label for _, label in items])
    scored = ~np.isnan(scores)
    report = {"threshold": float(threshold), "videos": len(items), "no_face": int((~scored).sum()), "subfolders": {},
              "files": {path: {"label": int(label), "score": None if np.isnan(s) else float(s)} for (path, label), s in zip(items, scores)}}
    if len(set(labels[scored])) == 2:
        report["overall"] = detection_metrics(scores[scored], labels[scored], threshold)
    report["pairs_fake_above_real"] = pair_wins({p: v["score"] for p, v in report["files"].items()}, root)
    for sub in sorted({os.path.relpath(p, root).split(os.sep)[0] for p, _ in items}):
        inside = np.array([os.path.relpath(p, root).split(os.sep)[0] == sub for p, _ in items]) & scored
        s = scores[inside]
        report["subfolders"][sub] = {"label": "fake" if labels[inside].mean() > 0.5 else "real" if inside.any() else None,
                                     "videos": int(inside.sum()), "mean_score": float(s.mean()) if len(s) else None,
                                     "called_fake": int((s >= threshold).sum())}
    return report


def video_evaluation_table(report):
    rows = ["| subfolder | label | videos scored | mean P(fake) | called fake |", "|---|---|---|---|---|"]
    for sub, r in report["subfolders"].items():
        mean = "" if r["mean_score"] is None else f"{r['mean_score']:.3f}"
        rows.append(f"| {sub} | {r['label']} | {r['videos']} | {mean} | {r['called_fake']} of {r['videos']} |")
    if "overall" in report:
        rows.append("\n" + video_table({"overall": report["overall"]}))
    wins, pairs = report["pairs_fake_above_real"]
    if pairs:
        rows.append(f"\nreal/fake pairs of the same frames: the fake scored above its real twin in {wins} of {pairs}")
    rows.append(f"\nthreshold on P(fake) {report['threshold']:.4g}; {report['no_face']} of {report['videos']} videos without a face left out")
    return "\n".join(rows)


def score_chart(scores, labels, threshold=None, bins=20, width=320, height=120):
    """Real (green) and fake (red) score histograms on one chart, the threshold as a line -> (3, H, W) uint8 tensor for TensorBoard."""
    from PIL import Image, ImageDraw
    scores, labels = np.nan_to_num(np.asarray(scores, dtype=float)), np.asarray(labels)
    counts = [np.histogram(scores[labels == c], bins=bins, range=(0, 1))[0] for c in (0, 1)]
    top = max(1, max(c.max() for c in counts))
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    bw = width / bins
    for c, colour in ((0, (40, 160, 60)), (1, (210, 50, 40))):
        for b, n in enumerate(counts[c]):
            x0 = b * bw + (bw / 2 if c else 0)
            d.rectangle([x0, height - 1 - (height - 10) * n / top, x0 + bw / 2 - 1, height - 1], fill=colour)
    if threshold is not None:
        d.line([threshold * width, 0, threshold * width, height], fill=(0, 0, 0), width=2)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def roc_chart(scores, labels, size=160):
    """The ROC curve (false-positive rate across, true-positive rate up) with the chance diagonal -> (3, H, W) uint8 tensor."""
    from PIL import Image, ImageDraw
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.nan_to_num(np.asarray(scores, dtype=float)))
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    d.line([0, size - 1, size - 1, 0], fill=(180, 180, 180))
    d.line([(x * (size - 1), (1 - y) * (size - 1)) for x, y in zip(fpr, tpr)], fill=(30, 80, 200), width=2)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


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
        x = data.to_uint8(chunk)  # the 8-bit images it was made for
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


# -----------------------------------------------------------------------------
# every epoch: SWD and the raw discriminator as a detector

@torch.no_grad()
def epoch_metrics(G, D, valid_real, cfg, device, epoch):
    """SWD per pyramid level and the raw D's AUC and accuracy (threshold 1/2), valid images against fresh fakes."""
    fake = detector.fakes(G, len(valid_real), cfg["nz"], device, SEED_EPOCH + epoch)
    was_training = D.training
    scores = np.concatenate([detector.score_images(D, valid_real, device), detector.score_images(D, fake, device)])
    D.train(was_training)
    labels = np.r_[np.zeros(len(valid_real)), np.ones(len(fake))]
    m = detection_metrics(scores, labels, threshold=0.5)
    out = {"raw_D/auc": m["auc"], "raw_D/accuracy": m["accuracy"]}
    out.update({f"swd/{k}": v for k, v in sliced_wasserstein(valid_real, fake).items()})
    return out


# -----------------------------------------------------------------------------
# after training: fine-tune, pick the threshold, report on the test split

def build_detector(cfg, G, D, snapshots, train_set, *, steps, device, detector_data=None, log=print):
    """Fine-tune a copy of D against G and its snapshots on train_set's real images; returns the detector in eval mode."""
    # two decodable images at least: the detector's BatchNorm trains on the batch
    real_batches = (x for (x,) in data.endless(train_set, DETECTOR_BATCH, cfg.get("workers", 0), seed=cfg["seed"], at_least=2))
    extra = None
    if detector_data:
        extra = data.endless(data.LabelledFolder(detector_data, "train", cfg["image_size"]), DETECTOR_BATCH // 2,
                        cfg.get("workers", 0), seed=cfg["seed"])
    log(f"detector: fine-tuning a copy of the discriminator to tell real images from this GAN's fakes, for detect.py "
        f"({steps} steps of {DETECTOR_BATCH} real + {DETECTOR_BATCH} fake images, fakes from the final G and "
        f"{len(snapshots)} snapshots" + (f", plus {detector_data}" if detector_data else "") + ")")
    return detector.fine_tune(D, [G] + snapshots, real_batches, steps=steps, nz=cfg["nz"], device=device,
                              extra_batches=extra, log_every=max(1, min(50, steps // 10)))


def with_frame_augment(images, seed):
    """A fixed, seeded draw of the training augmentations, for validation; the global RNG is left alone."""
    return detector.frame_augment(images, torch.Generator().manual_seed(seed))


def format_threshold(t):
    """A threshold with the digits it needs: 0.99995 stays 0.999950, never "1"."""
    gap = min(t, 1 - t)
    return f"{t:.{max(3, math.ceil(-math.log10(gap)) + 1) if gap > 0 else 3}f}"


def report_writer(folder):
    """A TensorBoard writer for one report in folder, replacing the events file of any earlier report there.

    A report's tags are the same every time, so two events files in one folder would show every
    test_* scalar twice; only files this function wrote (named *.report) are removed.
    """
    for old in glob.glob(os.path.join(folder, "events.out.tfevents.*.report")):
        os.remove(old)
    return SummaryWriter(folder, filename_suffix=".report")


def evaluate_run(cfg, G, D, run_dir, *, step, epoch, detector_steps, eval_images, inception_weights=None, detector_data=None,
                 device="cpu", writer=None, log=print, out_dir=None):
    """The whole report; returns it. Writes metrics.json (and detector.pt when detector_steps > 0) into out_dir.

    out_dir (default run_dir) is for reports on other data; a detector.pt there is preferred to the run's.
    """
    out_dir = out_dir or run_dir
    parts = ["real images", "detector", "spectrum baseline", "test scores", "SWD and FID", "done"]
    progress = tqdm(total=len(parts) - 1, desc="report", dynamic_ncols=True, bar_format="{desc}: {n}/{total} parts{postfix} [{elapsed}]")
    def start(i):  # the bar counts the finished parts and names the one under way
        progress.n = i
        progress.set_postfix_str(parts[i])
    if log is print:
        log = tqdm.write  # lines go above the bar, not through it

    start(0)
    G, D = G.to(device).eval(), D.to(device).eval()
    nz, size, workers = cfg["nz"], cfg["image_size"], cfg.get("workers", 0)
    split = lambda name: data.build_dataset(cfg["dataset"], cfg["data_root"], name, size, cfg["synthetic_size"])
    valid_real = data.load_images(split("valid"), eval_images, cfg["seed"], workers)
    test_real = data.load_images(split("test"), eval_images, cfg["seed"], workers)
    train_set = split("train")  # listed once: the detector and the baseline both train on it
    valid_fake = detector.fakes(G, len(valid_real), nz, device, cfg["seed"] + SEED_VALID)
    test_fake = detector.fakes(G, len(test_real), nz, device, cfg["seed"] + SEED_TEST)
    snapshots = checkpoint.load_snapshots(run_dir, cfg, device, exclude_epoch=epoch)
    report = {"protocol": {
        "real_images": cfg["dataset"] if cfg["dataset"] == "synthetic" else f"{cfg['dataset']} at {cfg['data_root']}",
        "detector_train": "train split real images vs fakes from the final G and its snapshots, frame augmentations",
        "threshold": f"best balanced accuracy on {len(valid_real)} valid-split real images + as many fakes, clean and augmented",
        "test": f"{len(test_real)} test-split real images vs {len(test_fake)} fakes from unseen noise; every fake rounded to 8 bits",
        "snapshots": len(snapshots), "gan_step": step, "gan_epoch": epoch, "image_size": size,
    }}

    # the fine-tuned detector: trained now, or the one already in out_dir or run_dir
    start(1)
    det_path = os.path.join(out_dir, "detector.pt")
    found = next((p for p in (det_path, os.path.join(run_dir, "detector.pt")) if os.path.isfile(p)), None)
    det, threshold = None, None
    valid_x = torch.cat([valid_real, valid_fake, with_frame_augment(torch.cat([valid_real, valid_fake]), cfg["seed"])])
    valid_y = np.r_[np.zeros(len(valid_real)), np.ones(len(valid_fake))]
    valid_y = np.r_[valid_y, valid_y]
    if detector_steps > 0:
        torch.manual_seed(cfg["seed"])
        det = build_detector(cfg, G, D, snapshots, train_set, steps=detector_steps, device=device, detector_data=detector_data, log=log)
        threshold = pick_threshold(detector.score_images(det, valid_x, device), valid_y)
        checkpoint.save_detector(det_path, det, threshold, cfg, method="fine-tuned", steps=detector_steps, gan_step=step,
                               snapshots=len(snapshots), detector_data=detector_data or "")
        log(f"wrote {det_path} (threshold on P(fake): {format_threshold(threshold)})")
    elif found:
        det, threshold, _, _ = checkpoint.load_detector(found, device)
        log(f"using {found} (threshold {format_threshold(threshold)}); pass --detector-steps N to fine-tune a new one")
    else:
        log("no detector.pt and --detector-steps 0: the report has the raw discriminator and the baseline only")

    # the baseline, trained on the same kind of data as the detector
    start(2)
    torch.manual_seed(cfg["seed"])
    n_spec = min(SPECTRUM_TRAIN_IMAGES, len(train_set))
    spec_real = detector.frame_augment(data.load_images(train_set, n_spec, cfg["seed"], workers))
    gens = [G] + snapshots
    spec_fake = torch.cat([detector.fakes(g, max(1, n_spec // len(gens)), nz, device, cfg["seed"] + 7 + i) for i, g in enumerate(gens)])
    spec_fake = detector.frame_augment(spec_fake)
    spectrum = detector.fit_spectrum_baseline(spec_real, spec_fake, seed=cfg["seed"])
    spec_threshold = pick_threshold(detector.spectrum_scores(spectrum, valid_x), valid_y)
    report["protocol"]["spectrum_baseline"] = f"logistic regression on {len(spec_real)} + {len(spec_fake)} augmented train-split images"

    scorers = {"raw_D": (lambda x: detector.score_images(D, x, device), 0.5),
               "spectrum": (lambda x: detector.spectrum_scores(spectrum, x), spec_threshold)}
    if det is not None:
        scorers["fine_tuned"] = (lambda x: detector.score_images(det, x, device), threshold)
    start(3)
    labels = np.r_[np.zeros(len(test_real)), np.ones(len(test_fake))]
    report["detection"] = {}
    for condition, x in (("clean", torch.cat([test_real, test_fake])),
                         ("jpeg50", detector.jpeg(torch.cat([test_real, test_fake]), 50))):
        report["detection"][condition] = {}
        for name, (score, t) in scorers.items():
            s = score(x)
            report["detection"][condition][name] = detection_metrics(s, labels, threshold=t)
            if writer is not None:
                tag = f"test_{condition}/{name}"
                writer.add_pr_curve(tag, torch.from_numpy(labels).bool(), torch.from_numpy(np.clip(s, 0, 1)), step)
                writer.add_histogram(f"{tag}/scores_real", s[labels == 0], step)
                writer.add_histogram(f"{tag}/scores_fake", s[labels == 1], step)
                for k in ("auc", "ap", "eer", "tpr@1%fpr", "accuracy"):
                    writer.add_scalar(f"{tag}/{k}", report["detection"][condition][name][k], step)

    # how good the faces are
    start(4)
    quality = {"swd_x1e3": sliced_wasserstein(test_real, test_fake),
               "swd_protocol": f"{len(test_real)} test-split real vs {len(test_fake)} fakes, 128 7x7 patches per image and level, "
                               "128 random directions drawn 4 times"}
    inception, why = load_inception(inception_weights)
    if inception is None:
        quality["fid"] = None
        quality["fid_skipped"] = why
        log(why)
    else:
        feats = [inception_features(inception, x) for x in (test_real, test_fake)]
        quality.update(fid_kid(*feats))
        quality["fid_protocol"] = (f"{len(test_fake)} fakes against {len(test_real)} test-split real images at {size}x{size} "
                                   "(published CelebA-64 numbers use 50k samples against all images and are lower)")
    report["generator"] = quality
    if writer is not None:
        for k, v in quality["swd_x1e3"].items():
            writer.add_scalar(f"test/swd/{k}", v, step)
        if quality.get("fid") is not None:
            writer.add_scalar("test/fid", quality["fid"], step)
            writer.add_scalar("test/kid_x1e3", quality["kid_x1e3"], step)

    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "metrics.json"))
    start(5)
    progress.close()
    log(summary_table(report))
    return report


def summary_table(report):
    rows = ["| test images | detector | AUC | AP | EER | TPR@1%FPR | accuracy @ threshold |", "|---|---|---|---|---|---|---|"]
    for condition, by_name in report["detection"].items():
        for name, m in by_name.items():
            rows.append(f"| {condition} | {name} | {m['auc']:.4f} | {m['ap']:.4f} | {m['eer']:.4f} | {m['tpr@1%fpr']:.4f} | "
                        f"{m['accuracy']:.4f} @ {format_threshold(m['threshold'])} |")
    g = report["generator"]
    rows.append(f"\nSWD x1e3 (avg over levels): {g['swd_x1e3']['avg']:.2f}  "
                + ("FID: " + f"{g['fid']:.2f}, KID x1e3: {g['kid_x1e3']:.2f}" if g.get("fid") is not None else "FID: skipped"))
    return "\n".join(rows)
