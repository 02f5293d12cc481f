"""Reports built from metrics.py's numbers: the epoch's metrics, the end-of-run report, tables and charts.

The end-of-run report (`evaluate_run`, called by main.py after training and by evaluate.py)
fine-tunes a detector from the GAN's discriminator, picks its threshold on the valid split,
and scores the test split, clean and JPEG-compressed, with three detectors (the raw D, the
fine-tuned one, the spectrum baseline); then the generator's SWD, FID and KID. It writes
metrics.json and TensorBoard scalars, PR curves and score histograms.
"""

import glob
import json
import os

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import checkpoint
import data
import detector
import metrics
from blends import frame_augment, jpeg
from cli import make_folder, write_text
from detector import format_threshold
from metrics import detection_metrics, pick_threshold, sliced_wasserstein
from models import seeded_samples

DETECTOR_BATCH = 64  # real images per fine-tuning step, plus as many fakes
SPECTRUM_TRAIN_IMAGES = 2000  # per class, for the baseline's logistic regression
# noise seeds, offset from the run's seed so that training, validation and test fakes never share a z
SEED_VALID, SEED_TEST, SEED_EPOCH = 1_000_001, 2_000_003, 3_000_017


# -----------------------------------------------------------------------------
# tables and charts

def video_table(reports):
    """{part: detection_metrics at the threshold} -> a Markdown table."""
    rows = ["| part | videos (real + fake) | AUC | AP | EER | accuracy | fakes caught | real called fake | fake above its real twin |",
            "|---|---|---|---|---|---|---|---|---|"]
    for part, m in reports.items():
        wins, pairs = m.get("pairs_fake_above_real", (0, 0))
        rows.append(f"| {part} | {m['n_real']} + {m['n_fake']} | {m['auc']:.3f} | {m['ap']:.3f} | {m['eer']:.3f} | "
                    f"{m['accuracy']:.3f} | {m['tpr']:.3f} | {m['fpr']:.3f} | {f'{wins} of {pairs}' if pairs else '-'} |")
    return "\n".join(rows)


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
    report["pairs_fake_above_real"] = metrics.pair_wins({p: v["score"] for p, v in report["files"].items()}, root)
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


# What happens to a video on its way to a user, for evaluate.py --robustness: {name: (H.264 CRF, scale of each side)}.
# CRF 28 is a low-bitrate upload; x264's default CRF 23 at half the size is a messenger's or a small player's copy.
REENCODINGS = {"CRF 28": (28, 1.0), "half size, CRF 23": (23, 0.5)}


def robustness_report(items, scores, changed, threshold, root):
    """[(path, label)], their original scores and {re-encoding: scores of the re-encoded copies} -> for the originals and each
    re-encoding: AUC, real called fake, fakes caught, mean P(fake) of each class, pairs, and how far each score moved."""
    labels = np.array([label for _, label in items])
    out = {}
    for name, s in {"original": scores, **changed}.items():
        s = np.asarray(s, dtype=float)
        ok = ~np.isnan(s) & ~np.isnan(scores)  # a copy in which no face is found has nothing to compare
        entry = {"videos": int(ok.sum()), "real_called_fake": int((s[ok & (labels == 0)] >= threshold).sum()),
                 "real": int((ok & (labels == 0)).sum()), "fakes_caught": int((s[ok & (labels == 1)] >= threshold).sum()),
                 "fake": int((ok & (labels == 1)).sum()),
                 "mean_real": float(s[ok & (labels == 0)].mean()) if (ok & (labels == 0)).any() else None,
                 "mean_fake": float(s[ok & (labels == 1)].mean()) if (ok & (labels == 1)).any() else None,
                 "pairs_fake_above_real": metrics.pair_wins({p: (v if np.isfinite(v) else None) for (p, _), v in zip(items, s)}, root)}
        if len(set(labels[ok])) == 2:
            entry["auc"] = detection_metrics(s[ok], labels[ok])["auc"]
        moved = np.abs(s[ok] - scores[ok])
        entry["mean_abs_change"], entry["max_abs_change"] = (float(moved.mean()), float(moved.max())) if ok.any() else (None, None)
        entry["files"] = {p: None if np.isnan(v) else float(v) for (p, _), v in zip(items, s)}
        out[name] = entry
    return out


def robustness_table(report):
    rows = ["| videos | AUC | real called fake | fakes caught | pairs: fake above its twin | mean P(fake) real / fake | mean (max) change of P(fake) |",
            "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    for name, e in report.items():
        wins, pairs = e["pairs_fake_above_real"]
        change = "-" if name == "original" else f"{fmt(e['mean_abs_change'])} ({fmt(e['max_abs_change'])})"
        rows.append(f"| {name} | {fmt(e.get('auc'))} | {e['real_called_fake']} of {e['real']} | {e['fakes_caught']} of {e['fake']} | "
                    f"{f'{wins} of {pairs}' if pairs else '-'} | {fmt(e['mean_real'])} / {fmt(e['mean_fake'])} | {change} |")
    return "\n".join(rows)


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
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.nan_to_num(np.asarray(scores, dtype=float)))
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    d.line([0, size - 1, size - 1, 0], fill=(180, 180, 180))
    d.line([(x * (size - 1), (1 - y) * (size - 1)) for x, y in zip(fpr, tpr)], fill=(30, 80, 200), width=2)
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


def report_writer(folder):
    """A TensorBoard writer for one report in folder, replacing the events file of any earlier report there.

    A report's tags are the same every time, so two events files in one folder would show every
    test_* scalar twice; only files this function wrote (named *.report) are removed.
    """
    for old in glob.glob(os.path.join(folder, "events.out.tfevents.*.report")):
        os.remove(old)
    return SummaryWriter(folder, filename_suffix=".report")


# -----------------------------------------------------------------------------
# every epoch: SWD and the raw discriminator as a detector

@torch.no_grad()
def epoch_metrics(G, D, valid_real, device, epoch):
    """SWD per pyramid level and the raw D's AUC and accuracy (threshold 1/2), valid images against fresh fakes."""
    fake = seeded_samples(G, len(valid_real), SEED_EPOCH + epoch, device)
    was_training = D.training
    scores = np.concatenate([detector.discriminator_scores(D, valid_real, device), detector.discriminator_scores(D, fake, device)])
    D.train(was_training)
    labels = np.r_[np.zeros(len(valid_real)), np.ones(len(fake))]
    m = detection_metrics(scores, labels, threshold=0.5)
    out = {"raw_D/auc": m["auc"], "raw_D/accuracy": m["accuracy"]}
    out.update({f"swd/{k}": v for k, v in sliced_wasserstein(valid_real, fake).items()})
    return out


# -----------------------------------------------------------------------------
# after training: fine-tune, pick the threshold, report on the test split

def fine_tune_detector(cfg, G, D, snapshots, train_set, *, steps, device, log=print):
    """A copy of D fine-tuned by detector.fit against G and its snapshots on train_set's real images; in eval mode."""
    # two decodable images at least: the detector's BatchNorm trains on the batch
    real_batches = (x for (x,) in data.endless(train_set, DETECTOR_BATCH, cfg.workers, seed=cfg.seed, at_least=2))
    log(f"detector: fine-tuning a copy of the discriminator to tell real images from this GAN's fakes, for detect.py "
        f"({steps} steps of {DETECTOR_BATCH} real + {DETECTOR_BATCH} fake images, fakes from the final G and "
        f"{len(snapshots)} snapshots)")
    return detector.train_on_gan(D, cfg.ndf, cfg.image_size, [G] + snapshots, real_batches, steps=steps, nz=cfg.nz, device=device,
                                 log_every=max(1, min(50, steps // 10)))


def with_frame_augment(images, seed):
    """A fixed, seeded draw of the training augmentations, for validation; the global RNG is left alone."""
    return frame_augment(images, torch.Generator().manual_seed(seed))


class _Parts:
    """A progress bar over the report's parts: it counts the finished ones and names the one under way."""
    NAMES = ("real images", "detector", "spectrum baseline", "test scores", "SWD and FID", "done")

    def __init__(self):
        self.bar = tqdm(total=len(self.NAMES) - 1, desc="report", dynamic_ncols=True,
                        bar_format="{desc}: {n}/{total} parts{postfix} [{elapsed}]")

    def start(self, name):
        self.bar.n = self.NAMES.index(name)
        self.bar.set_postfix_str(name)


def evaluate_run(cfg, G, D, run_dir, *, step, epoch, detector_steps, eval_images, inception_weights=None,
                 device="cpu", writer=None, log=print, out_dir=None):
    """The whole report for a run of config cfg (config.Config); returns it. Writes metrics.json (and detector.pt when
    detector_steps > 0) into out_dir.

    out_dir (default run_dir) is for reports on other data; a detector.pt there is preferred to the run's.
    """
    out_dir = out_dir or run_dir
    parts = _Parts()
    if log is print:
        log = tqdm.write  # lines go above the bar, not through it

    parts.start("real images")
    G, D = G.to(device).eval(), D.to(device).eval()
    images = report_images(cfg, G, eval_images, device)
    snapshots = checkpoint.load_snapshots(run_dir, cfg.to_dict(), device, exclude_epoch=epoch)
    report = {"protocol": protocol(cfg, images, snapshots, step, epoch)}

    parts.start("detector")
    valid_x = torch.cat([images["valid_real"], images["valid_fake"],
                         with_frame_augment(torch.cat([images["valid_real"], images["valid_fake"]]), cfg.seed)])
    valid_y = np.r_[np.zeros(len(images["valid_real"])), np.ones(len(images["valid_fake"]))]
    valid_y = np.r_[valid_y, valid_y]
    det, threshold = report_detector(cfg, G, D, snapshots, images["train_set"], valid_x, valid_y, run_dir, out_dir,
                                     steps=detector_steps, step=step, device=device, log=log)

    parts.start("spectrum baseline")
    spectrum, spec_threshold, report["protocol"]["spectrum_baseline"] = spectrum_baseline(
        cfg, [G] + snapshots, images["train_set"], valid_x, valid_y, device)
    scorers = {"raw_D": (lambda x: detector.discriminator_scores(D, x, device), 0.5),
               "spectrum": (lambda x: detector.spectrum_scores(spectrum, x), spec_threshold)}
    if det is not None:
        scorers["fine_tuned"] = (lambda x: detector.score_images(det, x, device), threshold)

    parts.start("test scores")
    report["detection"] = detection_on_test_split(scorers, images["test_real"], images["test_fake"], writer, step)

    parts.start("SWD and FID")
    report["generator"] = generator_quality(images["test_real"], images["test_fake"], cfg.image_size, inception_weights, log)
    log_quality(report["generator"], writer, step)

    make_folder(out_dir, "report folder")
    write_text(os.path.join(out_dir, "metrics.json"), json.dumps(report, indent=2))
    parts.start("done")
    parts.bar.close()
    log(summary_table(report))
    return report


def report_images(cfg, G, eval_images, device):
    """The report's images: valid and test real images, as many fakes from noise seeds of their own, the train split."""
    split = lambda name: data.build_dataset(cfg.dataset, cfg.data_root, name, cfg.image_size, cfg.synthetic_size)
    valid_real = data.load_images(split("valid"), eval_images, cfg.seed, cfg.workers)
    test_real = data.load_images(split("test"), eval_images, cfg.seed, cfg.workers)
    return {"valid_real": valid_real, "test_real": test_real,
            "train_set": split("train"),  # listed once: the detector and the baseline both train on it
            "valid_fake": seeded_samples(G, len(valid_real), cfg.seed + SEED_VALID, device),
            "test_fake": seeded_samples(G, len(test_real), cfg.seed + SEED_TEST, device)}


def protocol(cfg, images, snapshots, step, epoch):
    """How the report was made, in words, for metrics.json."""
    n_valid, n_test, n_fake = len(images["valid_real"]), len(images["test_real"]), len(images["test_fake"])
    return {
        "real_images": cfg.dataset if cfg.dataset == "synthetic" else f"{cfg.dataset} at {cfg.data_root}",
        "detector_train": "train split real images vs fakes from the final G and its snapshots, frame augmentations",
        "threshold": f"best balanced accuracy on {n_valid} valid-split real images + as many fakes, clean and augmented",
        "test": f"{n_test} test-split real images vs {n_fake} fakes from unseen noise; every fake rounded to 8 bits",
        "snapshots": len(snapshots), "gan_step": step, "gan_epoch": epoch, "image_size": cfg.image_size,
    }


def report_detector(cfg, G, D, snapshots, train_set, valid_x, valid_y, run_dir, out_dir, *, steps, step, device, log):
    """The fine-tuned detector and its threshold: trained now (steps > 0), or the one already in out_dir or run_dir,
    or (None, None) when there is neither."""
    det_path = os.path.join(out_dir, "detector.pt")
    if steps > 0:
        torch.manual_seed(cfg.seed)
        det = fine_tune_detector(cfg, G, D, snapshots, train_set, steps=steps, device=device, log=log)
        threshold = pick_threshold(detector.score_images(det, valid_x, device), valid_y)
        checkpoint.save_detector(det_path, det, threshold, checkpoint.gan_detector_config(cfg.to_dict()), method="fine-tuned",
                                 config=cfg.to_dict(), steps=steps, gan_step=step, snapshots=len(snapshots))
        log(f"wrote {det_path} (threshold on P(fake): {format_threshold(threshold)})")
        return det, threshold
    found = next((p for p in (det_path, os.path.join(run_dir, "detector.pt")) if os.path.isfile(p)), None)
    if found:
        det, threshold, _, _ = checkpoint.load_detector(found, device)
        log(f"using {found} (threshold {format_threshold(threshold)}); pass --detector-steps N to fine-tune a new one")
        return det, threshold
    log("no detector.pt and --detector-steps 0: the report has the raw discriminator and the baseline only")
    return None, None


def spectrum_baseline(cfg, generators, train_set, valid_x, valid_y, device):
    """The baseline, trained on the same kind of data as the detector -> (model, its threshold, how it was trained)."""
    torch.manual_seed(cfg.seed)
    n_spec = min(SPECTRUM_TRAIN_IMAGES, len(train_set))
    spec_real = frame_augment(data.load_images(train_set, n_spec, cfg.seed, cfg.workers))
    spec_fake = torch.cat([seeded_samples(g, max(1, n_spec // len(generators)), cfg.seed + 7 + i, device)
                           for i, g in enumerate(generators)])
    spec_fake = frame_augment(spec_fake)
    spectrum = detector.fit_spectrum_baseline(spec_real, spec_fake, seed=cfg.seed)
    threshold = pick_threshold(detector.spectrum_scores(spectrum, valid_x), valid_y)
    return spectrum, threshold, f"logistic regression on {len(spec_real)} + {len(spec_fake)} augmented train-split images"


def detection_on_test_split(scorers, test_real, test_fake, writer, step):
    """{condition: {scorer: detection_metrics}} on the test split, clean and re-compressed at JPEG 50."""
    labels = np.r_[np.zeros(len(test_real)), np.ones(len(test_fake))]
    out = {}
    for condition, x in (("clean", torch.cat([test_real, test_fake])),
                         ("jpeg50", jpeg(torch.cat([test_real, test_fake]), 50))):
        out[condition] = {}
        for name, (score, t) in scorers.items():
            s = score(x)
            out[condition][name] = detection_metrics(s, labels, threshold=t)
            if writer is not None:
                tag = f"test_{condition}/{name}"
                writer.add_pr_curve(tag, torch.from_numpy(labels).bool(), torch.from_numpy(np.clip(s, 0, 1)), step)
                writer.add_histogram(f"{tag}/scores_real", s[labels == 0], step)
                writer.add_histogram(f"{tag}/scores_fake", s[labels == 1], step)
                for k in ("auc", "ap", "eer", "tpr@1%fpr", "accuracy"):
                    writer.add_scalar(f"{tag}/{k}", out[condition][name][k], step)
    return out


def generator_quality(test_real, test_fake, size, inception_weights, log):
    """How good the faces are: SWD always, FID and KID when there are Inception weights."""
    quality = {"swd_x1e3": sliced_wasserstein(test_real, test_fake),
               "swd_protocol": f"{len(test_real)} test-split real vs {len(test_fake)} fakes, 128 7x7 patches per image and level, "
                               "128 random directions drawn 4 times"}
    inception, why = metrics.load_inception(inception_weights)
    if inception is None:
        quality["fid"] = None
        quality["fid_skipped"] = why
        log(why)
        return quality
    feats = [metrics.inception_features(inception, x) for x in (test_real, test_fake)]
    quality.update(metrics.fid_kid(*feats))
    quality["fid_protocol"] = (f"{len(test_fake)} fakes against {len(test_real)} test-split real images at {size}x{size} "
                               "(published CelebA-64 numbers use 50k samples against all images and are lower)")
    return quality


def log_quality(quality, writer, step):
    if writer is None:
        return
    for k, v in quality["swd_x1e3"].items():
        writer.add_scalar(f"test/swd/{k}", v, step)
    if quality.get("fid") is not None:
        writer.add_scalar("test/fid", quality["fid"], step)
        writer.add_scalar("test/kid_x1e3", quality["kid_x1e3"], step)
