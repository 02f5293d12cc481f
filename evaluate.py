"""Measure a trained GAN: how good its faces are and how well its fakes are caught.

    python evaluate.py runs/generative_model/001-celeba-64                      # metrics.json, TensorBoard
    python evaluate.py runs/generative_model/001-celeba-64 --detector-steps 2000  # (re)fine-tune detector.pt first
    python evaluate.py RUN --inception-weights weights-inception-2015-12-05-6726825d.pth   # adds FID and KID

Everything is written next to the checkpoint: detector.pt (when fine-tuning), metrics.json
and TensorBoard scalars, PR curves and score histograms under the run's own log.

Protocol. Splits are the dataset's own (CelebA's partition, or the fixed file-name hash):
the detector trains on the train split, its threshold is picked on the valid split, and
the report uses the test split, which nothing before has seen, against fakes from noise
seeds used nowhere else. Every fake is rounded to 8 bits like the real files. Each test is
run twice: on clean images and after JPEG re-compression at quality 50 (both classes).
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.tensorboard import SummaryWriter

import data
import detector
import metrics
from errors import UserError, run_cli
from models import Generator, load_checkpoint, load_state, models_from_checkpoint, resolve_checkpoint, save_checkpoint

DETECTOR_BATCH = 64  # real images per fine-tuning step, plus as many fakes
SPECTRUM_TRAIN_IMAGES = 2000  # per class, for the baseline's logistic regression
# noise seeds, offset from the run's seed so that training, validation and test fakes never share a z
SEED_VALID, SEED_TEST, SEED_EPOCH = 1_000_001, 2_000_003, 3_000_017


# -----------------------------------------------------------------------------
# images

def load_images(dataset, n, seed=0, workers=0):
    """Up to n decodable images of a dataset, a fixed random subset -> (n, C, S, S) tensor in [-1, 1]."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(dataset, batch_size=128, sampler=order, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))  # iterating must not draw from the global RNG (the training noise)
    return torch.cat([x[ok] for x, ok in loader])


def endless(dataset, batch, workers, seed=0, at_least=1):
    """Random batches forever (sampling with replacement), the undecodable items dropped: (tensor, ...) per batch.

    The dataset yields (..., ok); a batch is passed over when fewer than at_least items decode.
    """
    sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 30, generator=torch.Generator().manual_seed(seed))
    for *tensors, ok in DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True):
        if ok.sum() >= at_least:
            yield tuple(t[ok] for t in tensors)


def fakes(G, n, nz, device, seed):
    """n samples of G from noise seed `seed`, rounded to 8 bits, on the CPU."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([detector.quantize(detector.sample(G, min(256, n - i), nz, device, g)) for i in range(0, n, 256)])


def check_detector_data(root):
    missing = [c for c in ("real", "fake") if not os.path.isdir(os.path.join(root, c))]
    if missing:
        raise UserError(f"--detector-data {root} needs two subfolders, real/ and fake/, of face images (it has no {' or '.join(missing)}/)")


class LabelledFolder(torch.utils.data.Dataset):
    """--detector-data DIR: DIR/real/** and DIR/fake/** -> (image, label 1 = real, ok), one split of them."""

    def __init__(self, root, split, image_size):
        self.items = []
        check_detector_data(root)
        for name, label in (("real", 1), ("fake", 0)):
            folder = os.path.join(root, name)
            files = data.list_images(folder)
            if not files:
                raise UserError(f"--detector-data: no images (jpg, png, webp, bmp) under {folder}")
            self.items += [(f, label) for f in files if data.hash_split(os.path.relpath(f, folder)) == split]
        self.images = data.ImageFiles([f for f, _ in self.items], image_size)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, ok = self.images[i]
        return x, self.items[i][1], ok


# -----------------------------------------------------------------------------
# generator snapshots, kept during training for the detector

def save_snapshot(G, cfg, epoch, step, run_dir):
    """A small G-only file per epoch: snapshots/G_epochNNN.pt."""
    os.makedirs(os.path.join(run_dir, "snapshots"), exist_ok=True)
    save_checkpoint({"config": cfg, "G": G.state_dict(), "epoch": epoch, "step": step},
                    os.path.join(run_dir, "snapshots", f"G_epoch{epoch:03d}.pt"))


def load_snapshots(run_dir, cfg, device, exclude_epoch=None):
    """Every snapshot in run_dir/snapshots (but the final epoch's, which is G itself) as generators in eval mode."""
    gens = []
    for path in sorted(glob.glob(os.path.join(run_dir, "snapshots", "G_epoch*.pt"))):
        if int(re.search(r"(\d+)\.pt$", path).group(1)) == exclude_epoch:
            continue
        snap = load_checkpoint(path)
        G = Generator(nz=cfg["nz"], ngf=cfg["ngf"], channels=cfg["channels"], image_size=cfg["image_size"])
        load_state(G, snap["G"], "generator snapshot", path)
        gens.append(G.to(device).eval())
    return gens


# -----------------------------------------------------------------------------
# every epoch: SWD and the raw discriminator as a detector

@torch.no_grad()
def epoch_metrics(G, D, valid_real, cfg, device, epoch):
    """SWD per pyramid level and the raw D's AUC and accuracy (threshold 1/2), valid images against fresh fakes."""
    fake = fakes(G, len(valid_real), cfg["nz"], device, SEED_EPOCH + epoch)
    was_training = D.training
    scores = np.concatenate([detector.score_images(D, valid_real, device), detector.score_images(D, fake, device)])
    D.train(was_training)
    labels = np.r_[np.zeros(len(valid_real)), np.ones(len(fake))]
    m = metrics.detection_metrics(scores, labels, threshold=0.5)
    out = {"raw_D/auc": m["auc"], "raw_D/accuracy": m["accuracy"]}
    out.update({f"swd/{k}": v for k, v in metrics.sliced_wasserstein(valid_real, fake).items()})
    return out


# -----------------------------------------------------------------------------
# after training: fine-tune, pick the threshold, report on the test split

def build_detector(cfg, G, D, snapshots, train_set, *, steps, device, detector_data=None, log=print):
    """Fine-tune a copy of D against G and its snapshots on train_set's real images; returns the detector in eval mode."""
    # two decodable images at least: the detector's BatchNorm trains on the batch
    real_batches = (x for (x,) in endless(train_set, DETECTOR_BATCH, cfg.get("workers", 0), seed=cfg["seed"], at_least=2))
    extra = None
    if detector_data:
        extra = endless(LabelledFolder(detector_data, "train", cfg["image_size"]), DETECTOR_BATCH // 2,
                        cfg.get("workers", 0), seed=cfg["seed"])
    log(f"fine-tuning the detector for {steps} steps: {DETECTOR_BATCH} real + {DETECTOR_BATCH} fake images a step, "
        f"fakes from the final G and {len(snapshots)} snapshots" + (f", plus {detector_data}" if detector_data else ""))
    return detector.fine_tune(D, [G] + snapshots, real_batches, steps=steps, nz=cfg["nz"], device=device,
                              image_size=cfg["image_size"], extra_batches=extra,
                              log=lambda s, loss, ips: log(f"  detector step {s}/{steps}  loss {loss:.4f}  {ips:.0f} images/s"),
                              log_every=max(1, steps // 10))


def with_frame_augment(images, image_size, seed):
    """A fixed, seeded draw of the training augmentations, for validation."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    out = detector.augment(images, detector.FrameAugment(image_size))
    torch.set_rng_state(state)
    return out


def evaluate_run(cfg, G, D, run_dir, *, step, epoch, detector_steps, eval_images, inception_weights=None, detector_data=None,
                 device="cpu", writer=None, log=print):
    """The whole report; writes detector.pt (when detector_steps > 0) and metrics.json into run_dir, returns the report."""
    G, D = G.to(device).eval(), D.to(device).eval()
    nz, size, workers = cfg["nz"], cfg["image_size"], cfg.get("workers", 0)
    split = lambda name: data.build_dataset(cfg["dataset"], cfg["data_root"], name, size, cfg["synthetic_size"])
    valid_real = load_images(split("valid"), eval_images, cfg["seed"], workers)
    test_real = load_images(split("test"), eval_images, cfg["seed"], workers)
    train_set = split("train")  # listed once: the detector and the baseline both train on it
    valid_fake = fakes(G, len(valid_real), nz, device, cfg["seed"] + SEED_VALID)
    test_fake = fakes(G, len(test_real), nz, device, cfg["seed"] + SEED_TEST)
    snapshots = load_snapshots(run_dir, cfg, device, exclude_epoch=epoch)
    report = {"protocol": {
        "real_images": cfg["dataset"] if cfg["dataset"] == "synthetic" else f"{cfg['dataset']} at {cfg['data_root']}",
        "detector_train": "train split real images vs fakes from the final G and its snapshots, frame augmentations",
        "threshold": f"best balanced accuracy on {len(valid_real)} valid-split real images + as many fakes, clean and augmented",
        "test": f"{len(test_real)} test-split real images vs {len(test_fake)} fakes from unseen noise; every fake rounded to 8 bits",
        "snapshots": len(snapshots), "gan_step": step, "gan_epoch": epoch, "image_size": size,
    }}

    # the fine-tuned detector: trained now, or the one already in run_dir
    det_path = os.path.join(run_dir, "detector.pt")
    det, threshold = None, None
    valid_x = torch.cat([valid_real, valid_fake, with_frame_augment(torch.cat([valid_real, valid_fake]), size, cfg["seed"])])
    valid_y = np.r_[np.zeros(len(valid_real)), np.ones(len(valid_fake))]
    valid_y = np.r_[valid_y, valid_y]
    if detector_steps > 0:
        torch.manual_seed(cfg["seed"])
        det = build_detector(cfg, G, D, snapshots, train_set, steps=detector_steps, device=device, detector_data=detector_data, log=log)
        threshold = metrics.pick_threshold(detector.score_images(det, valid_x, device), valid_y)
        detector.save_detector(det_path, det, threshold, cfg, kind="fine-tuned", steps=detector_steps, gan_step=step,
                               snapshots=len(snapshots), detector_data=detector_data or "")
        log(f"wrote {det_path} (threshold on P(fake): {threshold:.4f})")
    elif os.path.isfile(det_path):
        det, threshold, _, _ = detector.load_detector(det_path, device)
        log(f"using {det_path} (threshold {threshold:.4f}); pass --detector-steps N to fine-tune a new one")
    else:
        log("no detector.pt and --detector-steps 0: the report has the raw discriminator and the baseline only")

    # the baseline, trained on the same kind of data as the detector
    torch.manual_seed(cfg["seed"])
    n_spec = min(SPECTRUM_TRAIN_IMAGES, len(train_set))
    spec_real = detector.augment(load_images(train_set, n_spec, cfg["seed"], workers), detector.FrameAugment(size))
    gens = [G] + snapshots
    spec_fake = torch.cat([fakes(g, max(1, n_spec // len(gens)), nz, device, cfg["seed"] + 7 + i) for i, g in enumerate(gens)])
    spec_fake = detector.augment(spec_fake, detector.FrameAugment(size))
    spectrum = detector.fit_spectrum_baseline(spec_real, spec_fake, seed=cfg["seed"])
    spec_threshold = metrics.pick_threshold(detector.spectrum_scores(spectrum, valid_x), valid_y)
    report["protocol"]["spectrum_baseline"] = f"logistic regression on {len(spec_real)} + {len(spec_fake)} augmented train-split images"

    scorers = {"raw_D": (lambda x: detector.score_images(D, x, device), 0.5),
               "spectrum": (lambda x: detector.spectrum_scores(spectrum, x), spec_threshold)}
    if det is not None:
        scorers["fine_tuned"] = (lambda x: detector.score_images(det, x, device), threshold)
    labels = np.r_[np.zeros(len(test_real)), np.ones(len(test_fake))]
    report["detection"] = {}
    for condition, x in (("clean", torch.cat([test_real, test_fake])),
                         ("jpeg50", detector.jpeg(torch.cat([test_real, test_fake]), 50))):
        report["detection"][condition] = {}
        for name, (score, t) in scorers.items():
            s = score(x)
            report["detection"][condition][name] = metrics.detection_metrics(s, labels, threshold=t)
            if writer is not None:
                tag = f"test_{condition}/{name}"
                writer.add_pr_curve(tag, torch.from_numpy(labels).bool(), torch.from_numpy(np.clip(s, 0, 1)), step)
                writer.add_histogram(f"{tag}/scores_real", s[labels == 0], step)
                writer.add_histogram(f"{tag}/scores_fake", s[labels == 1], step)
                for k in ("auc", "ap", "eer", "tpr@1%fpr", "accuracy"):
                    writer.add_scalar(f"{tag}/{k}", report["detection"][condition][name][k], step)

    # how good the faces are
    quality = {"swd_x1e3": metrics.sliced_wasserstein(test_real, test_fake),
               "swd_protocol": f"{len(test_real)} test-split real vs {len(test_fake)} fakes, 128 7x7 patches per image and level, 512 directions"}
    inception, why = metrics.load_inception(inception_weights)
    if inception is None:
        quality["fid"] = None
        quality["fid_skipped"] = why
        log(why)
    else:
        feats = [metrics.inception_features(inception, x) for x in (test_real, test_fake)]
        quality.update(metrics.fid_kid(*feats))
        quality["fid_protocol"] = (f"{len(test_fake)} fakes against {len(test_real)} test-split real images at {size}x{size} "
                                   "(published CelebA-64 numbers use 50k samples against all images and are lower)")
    report["generator"] = quality
    if writer is not None:
        for k, v in quality["swd_x1e3"].items():
            writer.add_scalar(f"test/swd/{k}", v, step)
        if quality.get("fid") is not None:
            writer.add_scalar("test/fid", quality["fid"], step)
            writer.add_scalar("test/kid_x1e3", quality["kid_x1e3"], step)

    tmp = os.path.join(run_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "metrics.json"))
    log(summary_table(report))
    return report


def summary_table(report):
    rows = ["| test images | detector | AUC | AP | EER | TPR@1%FPR | accuracy @ threshold |", "|---|---|---|---|---|---|---|"]
    for condition, by_name in report["detection"].items():
        for name, m in by_name.items():
            rows.append(f"| {condition} | {name} | {m['auc']:.4f} | {m['ap']:.4f} | {m['eer']:.4f} | {m['tpr@1%fpr']:.4f} | "
                        f"{m['accuracy']:.4f} @ {m['threshold']:.3g} |")
    g = report["generator"]
    rows.append(f"\nSWD x1e3 (avg over levels): {g['swd_x1e3']['avg']:.2f}  "
                + ("FID: " + f"{g['fid']:.2f}, KID x1e3: {g['kid_x1e3']:.2f}" if g.get("fid") is not None else "FID: skipped"))
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# the command

def get_args_parser():
    from main import ArgumentParser, at_least
    p = ArgumentParser(description="Evaluate a trained GAN: SWD (and FID/KID), the raw D, a fine-tuned detector and the spectrum baseline.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder or its checkpoint.pt; results are written next to it")
    p.add_argument("--detector-steps", type=at_least(0), default=0,
                   help="fine-tune a new detector.pt for this many steps first (0: use the run's detector.pt if it has one)")
    p.add_argument("--detector-data", default=None, metavar="DIR",
                   help="extra labelled faces for fine-tuning: DIR/real/ and DIR/fake/ (e.g. FaceForensics++ crops)")
    p.add_argument("--eval-images", type=at_least(2), default=1000, help="valid and test images used (each split)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"Inception-v3 2015-12-05 weights for FID/KID ({metrics.INCEPTION_URL}); without them FID is skipped")
    p.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default=None, help="override the run's dataset")
    p.add_argument("--data-root", default=None, help="override the run's data root (the data moved)")
    p.add_argument("--workers", type=at_least(0), default=None, help="DataLoader processes (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return p


def main(argv=None):
    from main import pick_device
    args = get_args_parser().parse_args(argv)
    ckpt = load_checkpoint(args.run)
    path = resolve_checkpoint(args.run)
    run_dir = os.path.dirname(os.path.abspath(path))
    cfg = dict(ckpt["config"])
    for key in ("dataset", "data_root", "workers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = pick_device(args.device)
    G, D = models_from_checkpoint(ckpt, path, device)
    writer = SummaryWriter(run_dir)
    try:
        evaluate_run(cfg, G, D, run_dir, step=ckpt.get("step", 0), epoch=ckpt.get("epoch"), detector_steps=args.detector_steps,
                     eval_images=args.eval_images, inception_weights=args.inception_weights,
                     detector_data=args.detector_data, device=device, writer=writer)
    finally:
        writer.close()
    print(f"wrote {os.path.join(run_dir, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
