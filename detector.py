"""The detector: a discriminator that scores images as generated (fake) or real.

Convention everywhere in this project: a score is P(fake) = sigmoid(-logit), where the
logit is the discriminator's (positive means real). A run folder's `detector.pt`, when
present, holds the fine-tuned detector and its threshold; otherwise the GAN's own
discriminator in `checkpoint.pt` is used with threshold 0.5.

A GAN's discriminator at equilibrium is a weak detector (in theory it says 1/2
everywhere). `fine_tune` turns a copy of it into a strong one: G frozen, real training
images against samples of the final generator and of snapshots kept during training, all
passed through what video frames go through (re-compression, blur, rescaling, flips).
`fit_spectrum_baseline` is the baseline to beat: the azimuthally averaged power spectrum
with a logistic regression (Durall, Keuper & Keuper 2020, "Watch your up-convolution").
"""

import copy
import io
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models import Discriminator, draw_samples, load_checkpoint, load_state, require, save_checkpoint

DETECTOR_FORMAT = 1


@torch.no_grad()
def fake_scores(model, images):
    """P(fake) for each image in [-1, 1]; the model must be in eval mode so a score never depends on the batch."""
    return torch.sigmoid(-model(images).float())


def load_detector(path, device="cpu"):
    """A run folder, checkpoint.pt or detector.pt -> (model in eval mode, threshold, kind, config)."""
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) == "checkpoint.pt" else None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "detector.pt")):
        path = os.path.join(run_dir, "detector.pt")  # the run's fine-tuned detector, whether given the folder or its checkpoint
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = Discriminator(ndf=cfg["ndf"], channels=cfg["channels"], image_size=cfg["image_size"])
    if "detector" in ckpt:
        load_state(model, ckpt["detector"], "detector", path)
        kind, threshold = "fine-tuned detector", float(ckpt["threshold"])
    else:
        require(ckpt, ("D",), path, "scoring")
        load_state(model, ckpt["D"], "discriminator", path)
        kind, threshold = "raw discriminator", float(ckpt.get("threshold", 0.5))
    return model.to(device).eval(), threshold, kind, cfg


def save_detector(path, model, threshold, cfg, **info):
    """detector.pt: the fine-tuned weights, the threshold on P(fake) and whatever describes how they were made."""
    save_checkpoint({"config": cfg, "detector": model.state_dict(), "threshold": float(threshold),
                     "detector_format": DETECTOR_FORMAT, **info}, path)


# -----------------------------------------------------------------------------
# what happens to a face on its way into a video frame

def to_uint8(images):
    """[-1, 1] floats -> 8-bit pixels, as every image in a file or a video frame is."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(pixels):
    return pixels.float() / 127.5 - 1


def quantize(images):
    """Round to 8 bits. Real images come from 8-bit files and fakes would not: without this a
    detector could learn the rounding instead of the faces."""
    return to_float(to_uint8(images))


def _uniform(lo, hi):
    return lo + (hi - lo) * float(torch.rand(()))  # torch's RNG, so torch.manual_seed makes a run repeatable


def jpeg_pil(im, quality):
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as out:
        return out.convert("RGB")


class FrameAugment:
    """What a face goes through on its way into a video frame, drawn anew for every image.

    Flip (p 1/2), a smaller capture scaled back up (p 1/2, down to half size), blur (p 0.3,
    sigma 0.1-1.5 px), JPEG re-compression at quality 30-95 (p 0.7; JPEG stands in for a
    video codec's block DCT). PIL does the work: one call per image is cheap there, and
    torchvision's tensor blur is slow on small images.
    """

    def __init__(self, image_size):
        self.size = image_size

    def __call__(self, im):
        if torch.rand(()) < 0.5:
            im = ImageOps.mirror(im)
        if torch.rand(()) < 0.5:
            side = int(torch.randint(max(8, self.size // 2), self.size + 1, ()))
            im = im.resize((side, side), Image.BILINEAR).resize((self.size, self.size), Image.BILINEAR)
        if torch.rand(()) < 0.3:
            im = im.filter(ImageFilter.GaussianBlur(_uniform(0.1, 1.5)))
        if torch.rand(()) < 0.7:
            im = jpeg_pil(im, int(torch.randint(30, 96, ())))
        return im


def augment(images, transform):
    """Apply a per-image PIL transform to a batch in [-1, 1]; returns 8-bit-valued floats on the same device."""
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    out = [np.asarray(transform(Image.fromarray(p))) for p in pixels]
    return to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)).to(images.device)


def jpeg(images, quality):
    """Re-compress a batch in [-1, 1] at one JPEG quality (the test condition 'JPEG 50')."""
    return augment(images, lambda im: jpeg_pil(im, quality))


# -----------------------------------------------------------------------------
# fine-tuning a copy of D

@torch.no_grad()
def sample(G, n, nz, device, generator=None):
    """n fakes from G in eval mode, from noise drawn with generator (the global RNG if None)."""
    return draw_samples(G, torch.randn(n, nz, generator=generator).to(device)).float()


def fine_tune(D, generators, real_batches, *, steps, nz, device, image_size, lr=1e-4, extra_batches=None, log=None, log_every=50):
    """A copy of D trained to tell real from fake; D and the generators are left untouched.

    generators: [final G, snapshot, ...]; half of every fake batch comes from the final G,
    the other half from one generator drawn at random, so earlier artefacts are caught too.
    real_batches: an endless iterator of real image batches in [-1, 1].
    extra_batches: optional endless iterator of (images, labels 1 = real) from --detector-data.
    log(step, loss, images_per_second) is called every log_every steps.
    Real and fake images share one batch, so BatchNorm's running statistics describe the mix
    that eval-mode scoring will see. Returns the detector in eval mode.
    """
    det = copy.deepcopy(D).to(device).train().requires_grad_(True)
    opt = torch.optim.Adam(det.parameters(), lr=lr, betas=(0.5, 0.999))
    transform = FrameAugment(image_size)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = _mixed_batch(generators, real_batches, extra_batches, nz, device)
        # label 1 = real: the GAN's own convention, so P(fake) = sigmoid(-logit) still holds
        loss = F.binary_cross_entropy_with_logits(det(augment(x, transform)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and (step % log_every == 0 or step == steps):
            log(step, loss.item(), step * len(x) / (time.time() - t0))
    recalibrate_batchnorm(det, generators, real_batches, extra_batches, nz, device, transform)
    return det.eval()


def _mixed_batch(generators, real_batches, extra_batches, nz, device):
    real = next(real_batches).to(device)
    b = len(real)
    half = b // 2
    other = generators[int(torch.randint(len(generators), ()))]
    fake = torch.cat([sample(generators[0], b - half, nz, device), sample(other, half, nz, device)])
    x = torch.cat([real, quantize(fake).to(device)])
    y = torch.cat([torch.ones(b), torch.zeros(b)]).to(device)
    if extra_batches is not None:
        ex, ey = next(extra_batches)
        x, y = torch.cat([x, ex.to(device)]), torch.cat([y, ey.float().to(device)])
    return x, y


@torch.no_grad()
def recalibrate_batchnorm(det, generators, real_batches, extra_batches, nz, device, transform, batches=20):
    """Replace BatchNorm's running statistics by their exact average over fresh training batches.

    The momentum average lags behind the last weight updates; scoring in eval mode uses these
    statistics, so they should belong to the final weights.
    """
    bns = [m for m in det.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    det.train()
    for _ in range(batches):
        x, _ = _mixed_batch(generators, real_batches, extra_batches, nz, device)
        det(augment(x, transform))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    det.eval()


@torch.no_grad()
def score_images(model, images, device, batch=256):
    """P(fake) for a (N, C, S, S) tensor, in batches, model in eval mode -> numpy array."""
    model.eval()
    return torch.cat([fake_scores(model, chunk.to(device)).cpu() for chunk in images.split(batch)]).numpy()


# -----------------------------------------------------------------------------
# the baseline: 1-D power spectrum + logistic regression (Durall et al. 2020)

def spectrum_features(images):
    """(N, 3, S, S) in [-1, 1] -> (N, R) azimuthal average of the log power spectrum of the grey image, each row scaled to [0, 1]."""
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).double().cpu().numpy()
    power = 20 * np.log(np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(-2, -1))) + 1e-8)
    s = grey.shape[-1]
    yy, xx = np.indices((s, s))
    radius = np.hypot(yy - s // 2, xx - s // 2).astype(int).ravel()
    counts = np.bincount(radius)
    profile = np.stack([np.bincount(radius, weights=p.ravel()) / counts for p in power])
    lo, hi = profile.min(axis=1, keepdims=True), profile.max(axis=1, keepdims=True)
    return (profile - lo) / np.maximum(hi - lo, 1e-12)


def fit_spectrum_baseline(real, fake, seed=0):
    """A logistic regression on spectrum features; predict_proba[:, 1] is P(fake)."""
    x = np.concatenate([spectrum_features(real), spectrum_features(fake)])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(fake))])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return model.fit(x, y)


def spectrum_scores(model, images):
    return model.predict_proba(spectrum_features(images))[:, 1]
