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
import math
import os
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from tqdm import tqdm

from data import normalize_uint8, preprocess, quantize, to_uint8
from faces import CROP_SCALE, CROP_SHIFT, EXTRA_CANDIDATES, face_crops, keep_tracks
from models import draw_samples
from video import input_frames


@torch.no_grad()
def fake_scores(model, images):
    """P(fake) for each image in [-1, 1]; the model must be in eval mode so a score never depends on the batch."""
    return torch.sigmoid(-model(images).float())


# -----------------------------------------------------------------------------
# scoring the faces of a video or an image

NO_FACE = "no face"



def score_input(path, kind, model, device, image_size, finder, threshold, frames=32, every=None, batch=64, thumbnails=None):
    """Sample, find faces, score them in batches, follow them across frames -> the input's result dict (frames included).

    Every face found is scored as it comes, so nothing but numbers is kept per frame; which
    faces count is known only at the end, once the tracks are: the --max-faces tracks seen in
    the most frames. The others stay in each frame's "others", scored but left out, so a face
    seen in one frame (a false face, a passer-by) does not set the video's score.
    thumbnails: a dict to fill with {(frame index, track): the model's input as uint8 (S, S, 3)}, for report.html.
    """
    t0 = time.perf_counter()
    info, decoded = input_frames(path, kind, frames, every)
    transform = preprocess(image_size)
    limit = None if finder is None else finder.max_faces + EXTRA_CANDIDATES
    records, pending = [], []

    def flush():
        if pending:
            scores = fake_scores(model, torch.stack([t for _, t in pending]).to(device)).cpu().tolist()
            for (face, _), s in zip(pending, scores):
                face["score"] = s
            pending.clear()

    for index, seconds, frame in tqdm(decoded, total=info["frames_sampled"], desc=os.path.basename(path), unit="frame",
                                      leave=False, dynamic_ncols=True):
        faces = []
        for box, square, crop in face_crops(frame, finder, limit):
            faces.append({"box": list(box), "crop": list(square), "score": None})
            pending.append((faces[-1], transform(crop)))
        records.append({"index": index, "time": round(seconds, 3), "faces": faces})
        if thumbnails is not None:
            for face, x in pending[len(pending) - len(faces):]:
                face["_pixels"] = to_uint8(x[None])[0].permute(1, 2, 0).numpy()
        if len(pending) >= batch:
            flush()
    flush()
    keep_tracks(records, finder)
    if thumbnails is not None:
        for r in records:
            for face in r["others"]:
                del face["_pixels"]
            for face in r["faces"]:
                thumbnails[r["index"], face["track"]] = face.pop("_pixels")
    for r in records:
        r["score"] = max((f["score"] for f in r["faces"]), default=None)
    result = summarise(path, kind, info, records, threshold)
    result["seconds"] = time.perf_counter() - t0
    return result


def summarise(path, kind, info, records, threshold):
    """A frame scores its most fake-looking face of the main tracks; a video, the mean over frames with such a face."""
    frame_scores = [r["score"] for r in records if r["score"] is not None]
    score = float(np.mean(frame_scores)) if frame_scores else None
    verdict = NO_FACE if score is None else "fake" if score >= threshold else "real"
    return {
        "file": path, "kind": kind, **info,
        "frames_scored": len(records),  # below frames_sampled only when frames could not be decoded
        "frames_with_face": len(frame_scores),
        "frames_without_face": len(records) - len(frame_scores),
        "faces": sum(len(r["faces"]) for r in records),
        "faces_left_out": sum(len(r["others"]) for r in records),
        "score": score,
        "share_above_threshold": float(np.mean([s >= threshold for s in frame_scores])) if frame_scores else None,
        "threshold": threshold,
        "verdict": verdict,
        "frames": records,
    }


# -----------------------------------------------------------------------------
# what happens to a face on its way into a video frame

# Flip (p 1/2), a smaller capture scaled back up (p 1/2, side max(8, S/2)..S), Gaussian blur
# (p 0.3, sigma 0.1-1.5 px), JPEG re-compression at quality 30-95 (p 0.7; JPEG stands in for a
# video codec's block DCT). These are the probabilities and ranges of the per-image PIL
# transform this replaced (benchmark.py keeps it as the baseline).
P_FLIP, P_RESCALE, P_BLUR, P_JPEG = 0.5, 0.5, 0.3, 0.7
SIGMA = (0.1, 1.5)
QUALITY = (30, 95)
BLUR_RADIUS = math.ceil(3 * SIGMA[1])  # one kernel width for every sigma keeps the shapes fixed


def draw_frame_augment(n, image_size, generator=None):
    """What happens to each of n images: a dict of CPU tensors (masks, sides, sigmas, qualities).

    Drawn on the CPU from generator (torch's global RNG when None), so that a seed gives the
    same draw on every device, and the JPEG groups are known without waiting for a GPU.
    """
    u = torch.rand(7, n, generator=generator)
    lo = max(8, image_size // 2)
    return {
        "flip": u[0] < P_FLIP,
        "rescale": u[1] < P_RESCALE,
        "side": lo + (u[2] * (image_size - lo + 1)).long(),  # uniform over lo..image_size
        "blur": u[3] < P_BLUR,
        "sigma": SIGMA[0] + (SIGMA[1] - SIGMA[0]) * u[4],
        "jpeg": u[5] < P_JPEG,
        "quality": QUALITY[0] + (u[6] * (QUALITY[1] - QUALITY[0] + 1)).long(),  # uniform over 30..95
    }


def frame_augment(images, generator=None, draw=None):
    """A batch in [-1, 1] (N, C, S, S) -> the same faces as a video frame would hold them, 8-bit-valued, on images' device.

    Each image gets its own draw (draw_frame_augment, or the draw given). The work is batched
    tensor ops on the batch's device; between operations the pixels are rounded to 8 bits,
    as every image on its way into a frame is.
    """
    n, _, s, _ = images.shape
    d = draw if draw is not None else draw_frame_augment(n, s, generator)
    x = images.detach().float().add(1).mul_(127.5).round_().clamp_(0, 255)  # 8-bit pixel values, kept as floats
    # Each operation touches only the images drawn for it, in place. The indices come from the
    # CPU, so choosing them does not wait for the GPU.
    rows = d["flip"].nonzero().flatten().to(x.device)
    x.index_copy_(0, rows, x[rows].flip(-1))
    chosen = d["rescale"].nonzero().flatten()
    if len(chosen):
        _apply_rows(x, chosen.to(x.device), _rescale_matrices(d["side"][chosen], s, x.device))
    chosen = d["blur"].nonzero().flatten()
    if len(chosen):
        _apply_rows(x, chosen.to(x.device), _blur_matrices(d["sigma"][chosen], s).to(x.device))
    chosen = d["jpeg"].nonzero().flatten()
    if len(chosen):
        rows = chosen.to(x.device)
        x.index_copy_(0, rows, _recompress(x[rows].to(torch.uint8), d["quality"][chosen].tolist()).float())
    return x.div_(127.5).sub_(1)


def _apply_rows(x, rows, m):
    """x[rows] <- M X M^T, rounded to 8 bits, in place, for each chosen image's (S, S) matrix M: a
    separable linear filter (down-and-up scaling, blur) as two batched matrix products."""
    x.index_copy_(0, rows, (m[:, None] @ x[rows] @ m[:, None].transpose(-1, -2)).round_().clamp_(0, 255))


_RESCALE_TABLES = {}


def _rescale_matrices(sides, size, device):
    """(k, S, S): for each side, scaling a row of S pixels bilinearly down to side pixels and back up, as one matrix.

    F.interpolate with antialias, as PIL's BILINEAR resize does on the way down; written as a
    matrix so that images of different sides go through one batched product. The table holds
    every side and is built once per size and device.
    """
    key = (size, str(device))
    if key not in _RESCALE_TABLES:
        lo = max(8, size // 2)
        eye = torch.eye(size).view(size, 1, 1, size)  # S one-pixel impulses, each a 1 x S image
        scale = lambda t, w: F.interpolate(t, size=(1, w), mode="bilinear", antialias=True, align_corners=False)
        # row i of the result is the response to impulse i, i.e. column i of the operator: transpose it
        _RESCALE_TABLES[key] = torch.stack([scale(scale(eye, side), size).view(size, size).T
                                            for side in range(lo, size + 1)]).to(device)
    return _RESCALE_TABLES[key][(sides - max(8, size // 2)).to(device)]


def _blur_matrices(sigmas, size):
    """(k, S, S) Gaussian blurs of the given sigmas along one axis, the edge pixel repeated beyond the border."""
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=torch.float32)
    w = torch.exp(-taps[None] ** 2 / (2 * sigmas[:, None] ** 2))
    w = w / w.sum(1, keepdim=True)
    cols = (torch.arange(size)[:, None] + taps.long()[None]).clamp(0, size - 1)  # (S, taps): where each tap reads
    m = torch.zeros(len(sigmas), size, size)
    return m.scatter_add_(2, cols.expand(len(sigmas), -1, -1).contiguous(), w[:, None, :].expand(-1, size, -1).contiguous())


def _recompress(pixels, qualities):
    """uint8 (N, C, S, S) -> each image JPEG-encoded at its quality and decoded, on pixels' device.

    On the CPU this is libjpeg, one image at a time as torchvision does it there, as PIL does
    it. On CUDA it is nvJPEG, which takes a list at one quality, so images are grouped by
    quality; how its output differs from libjpeg's is in docs/speed.md.
    """
    out = torch.empty_like(pixels)
    with warnings.catch_warnings():  # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        if not pixels.is_cuda:
            # image by image: grouping would only add batch copies, each a wait for the other cores
            for i, (image, quality) in enumerate(zip(pixels, qualities)):
                out[i] = decode_jpeg(encode_jpeg(image, quality=quality), mode=ImageReadMode.UNCHANGED)
            return out
        q = torch.tensor(qualities)
        for quality in q.unique().tolist():
            rows = (q == quality).nonzero().flatten().to(pixels.device)
            encoded = encode_jpeg(list(pixels[rows]), quality=quality)
            # decode_jpeg reads the bytes from the CPU whatever the device it decodes on
            decoded = decode_jpeg([e.cpu() for e in encoded], mode=ImageReadMode.UNCHANGED, device=pixels.device)
            out[rows] = torch.stack(decoded)
    return out


def jpeg(images, quality):
    """Re-compress a batch in [-1, 1] at one JPEG quality (the test condition 'JPEG 50'); 8-bit-valued, on images' device."""
    pixels = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return _recompress(pixels, [int(quality)] * len(images)).float() / 127.5 - 1


# -----------------------------------------------------------------------------
# fine-tuning a copy of D

@torch.no_grad()
def sample(G, n, nz, device, generator=None):
    """n fakes from G in eval mode, from noise drawn with generator (the global RNG if None)."""
    return draw_samples(G, torch.randn(n, nz, generator=generator).to(device)).float()



def fine_tune(D, generators, real_batches, *, steps, nz, device, lr=1e-4, extra_batches=None, log=None, log_every=50):
    """A copy of D trained to tell real from fake; D and the generators are left untouched.

    generators: [final G, snapshot, ...]; half of every fake batch comes from the final G,
    the other half from one generator drawn at random, so earlier artefacts are caught too.
    real_batches: an endless iterator of real image batches in [-1, 1].
    extra_batches: optional endless iterator of (images, labels 1 = real) from --detector-data.
    A progress bar shows the steps, with the loss and images/s every log_every steps, when
    log(step, loss, images_per_second) is also called.
    Real and fake images share one batch, so BatchNorm's running statistics describe the mix
    that eval-mode scoring will see. Returns the detector in eval mode.
    """
    det = copy.deepcopy(D).to(device).train().requires_grad_(True)
    opt = torch.optim.Adam(det.parameters(), lr=lr, betas=(0.5, 0.999))
    t0 = time.time()
    bar = tqdm(range(1, steps + 1), desc="detector fine-tuning", unit="step", dynamic_ncols=True)
    for step in bar:
        x, y = _mixed_batch(generators, real_batches, extra_batches, nz, device)
        # label 1 = real: the GAN's own convention, so P(fake) = sigmoid(-logit) still holds
        loss = F.binary_cross_entropy_with_logits(det(frame_augment(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            value, speed = loss.item(), step * len(x) / (time.time() - t0)  # .item() waits for a GPU: only every log_every steps
            bar.set_postfix(loss=f"{value:.4f}", images_per_s=f"{speed:.0f}")
            if log is not None:
                log(step, value, speed)
    bar.set_postfix_str("recomputing BatchNorm statistics")
    recalibrate_batchnorm(det, generators, real_batches, extra_batches, nz, device)
    bar.close()
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
def recalibrate_batchnorm(det, generators, real_batches, extra_batches, nz, device, batches=20):
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
        det(frame_augment(x))
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
    from sklearn.linear_model import LogisticRegression  # here, not at the top: detect.py starts faster without it
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    x = np.concatenate([spectrum_features(real), spectrum_features(fake)])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(fake))])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, random_state=seed))
    return model.fit(x, y)


def spectrum_scores(model, images):
    return model.predict_proba(spectrum_features(images))[:, 1]


# -----------------------------------------------------------------------------
# self-blended faces (Shiohara & Yamasaki, CVPR 2022): fakes made from real faces alone

# Where the face sits in a crop framed by faces.crop_square (and, by design, in a CelebA
# image after the DCGAN preprocessing): centred across, a little below the middle (the box
# centre is 0.14 box widths below the crop centre), the box 1/1.7 of the side.
FACE_CENTRE_Y = 0.5 + CROP_SHIFT / CROP_SCALE
FACE_HALF = 0.5 / CROP_SCALE


def _smooth_noise(n, size, cells, generator):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled smoothly to size x size."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


def blend_masks(n, size, generator=None):
    """(n, 1, size, size) soft masks in [0, 1]: an ellipse over the inner face, its outline bent by smooth noise,
    its edge blurred by a random width, and its strength scaled by a random blend ratio (1 half the time).

    Drawn and blurred at 64 px at most and scaled up: the mask is smooth, and a wide blur at full size costs more
    than the rest of a training batch.
    """
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator)
    work = min(size, 64)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, work), torch.linspace(0, 1, work), indexing="ij")
    cx, cy = 0.5 + u(-0.03, 0.03), FACE_CENTRE_Y + u(-0.05, 0.03)
    rx, ry = FACE_HALF * u(0.75, 1.05), FACE_HALF * u(0.95, 1.3)  # from the cheeks, brow to chin
    d = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
    d = d + 0.35 * _smooth_noise(n, work, 5, generator)  # a deformed outline, as the paper's landmark hull is
    hard = (d < 1).float()
    out = torch.empty_like(hard)
    for i in range(n):  # a soft edge of its own width for every mask
        sigma = float(u(0.01, 0.06)[0]) * work
        k = int(2 * round(3 * sigma) + 1)
        out[i] = TF.gaussian_blur(hard[i], [k, k], [sigma, sigma])
    if work < size:
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    ratio = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, torch.ones(n, 1, 1, 1), u(0.4, 1.0))
    return out * ratio


def self_blend(faces, generator=None):
    """Real faces (N, 3, S, S) in [-1, 1] -> (self-blended fakes, their masks), the pixels 8-bit like a frame's.

    Each face is pasted onto itself: a source copy whose colour, sharpness and scale are
    jittered (the mismatch a face swap leaves) blended through a soft, deformed face mask
    into the untouched target. The result differs from the input only where the mask is not
    zero, and it teaches the blending boundary without a single fake from any method.
    """
    n, _, s, _ = faces.shape
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=generator)
    src = faces * u(0.9, 1.1, 3, 1, 1) + u(-0.08, 0.08, 3, 1, 1)  # per-channel gain and shift: colour mismatch
    soft = torch.rand(n, generator=generator)
    blurred = TF.gaussian_blur(src, [5, 5], [1.0, 1.0])
    src = torch.where((soft < 0.3).view(n, 1, 1, 1), blurred, torch.where((soft > 0.8).view(n, 1, 1, 1), 2 * src - blurred, src))
    scale, shift = u(0.94, 1.06), u(-0.03, 0.03, 2)  # the pasted face a little larger or smaller, a little off
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (n, 3, s, s), align_corners=False)
    src = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = blend_masks(n, s, generator)
    return quantize(mask * src.clamp(-1, 1) + (1 - mask) * faces), mask


# -----------------------------------------------------------------------------
# training a detector on labelled videos, self-blended faces and the GAN's fakes

SOURCES = ("labelled", "sbi", "gan")  # where the fakes come from: fake/ videos, self-blended reals, the GAN's samples


def init_from(model, D):
    """Copy every weight of D whose name and shape fit model (the first blocks, when the sizes differ) -> names copied."""
    own = model.state_dict()
    fit = {k: v for k, v in D.state_dict().items() if k in own and own[k].shape == v.shape}
    own.update(fit)
    model.load_state_dict(own)
    return sorted(fit)


@torch.no_grad()
def video_scores(model, videos, device, batch=128):
    """[(faces uint8 (N, S, S, 3), frame positions (N,))] -> one score per video, as detect.py scores it: a frame
    takes its most fake-looking face, the video the mean over frames with a face (NaN for none)."""
    model.eval()
    out = []
    for faces, frames in videos:
        if len(faces) == 0:
            out.append(float("nan"))
            continue
        x = normalize_uint8(np.ascontiguousarray(faces))
        scores = torch.cat([fake_scores(model, c.to(device)) for c in x.split(batch)]).cpu().numpy()
        per_frame = [scores[frames == f].max() for f in np.unique(frames)]
        out.append(float(np.mean(per_frame)))
    return np.array(out)


def to_size(images, size):
    """(N, C, s, s) -> (N, C, size, size), bilinear with antialiasing: the GAN's images and fakes at the detector's size alike."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class Batches:
    """Training batches: `batch` real faces against `batch` fakes shared among the chosen sources, augmented.

    real_video, fake_video: uint8 (N, S, S, 3) faces from the labelled videos; real_images:
    more real faces (the GAN's training images) or None; generators: the GAN's generators
    (empty when its fakes are off). Half the reals come from videos and half from the
    images when both exist, so neither drowns the other.
    """

    def __init__(self, real_video, fake_video, real_images, generators, sources, *, batch, image_size, nz, device, seed):
        self.real = [r for r in (real_video, real_images) if r is not None and len(r)]
        self.fake_video, self.generators, self.sources = fake_video, generators, sources
        self.batch, self.size, self.nz, self.device = batch, image_size, nz, device
        self.g = torch.Generator().manual_seed(seed)

    def _pick(self, pool, n):
        idx = torch.randint(len(pool), (n,), generator=self.g).numpy()
        return normalize_uint8(np.ascontiguousarray(pool[np.sort(idx)]))

    @staticmethod
    def _shares(n, k):
        """n split into k near-equal whole parts, the larger first."""
        return [n // k + (i < n % k) for i in range(k)]

    def _reals(self, n):
        return torch.cat([self._pick(pool, k) for pool, k in zip(self.real, self._shares(n, len(self.real))) if k])

    def __next__(self):
        b = self.batch
        real = self._reals(b)
        fakes = []
        for source, n in zip(self.sources, self._shares(b, len(self.sources))):
            if n == 0:
                continue
            if source == "labelled":
                fakes.append(self._pick(self.fake_video, n))
            elif source == "sbi":
                fakes.append(self_blend(self._reals(n), self.g)[0])
            else:
                G = self.generators[int(torch.randint(len(self.generators), (), generator=self.g))]
                z = torch.randn(n, self.nz, generator=self.g)
                x = draw_samples(G, z.to(next(G.parameters()).device)).float().cpu()
                fakes.append(quantize(to_size(x, self.size)))
        x = torch.cat([real, *fakes])
        y = torch.cat([torch.zeros(len(real)), torch.ones(len(x) - len(real))])  # 1 = fake
        return frame_augment(x.to(self.device), self.g), y.to(self.device)


def train_detector(model, batches, valid, *, steps, lr, device, eval_every, on_eval=None, on_log=None, log_every=10,
                   should_stop=lambda: False):
    """Train model (label 1 = fake) on batches; every eval_every steps score the validation videos and keep the best.

    valid: (list of face arrays, labels 1 = fake), one per video. Model choice and, later, the
    threshold use video-level scores, the unit the detector is judged on. Returns (best model
    in eval mode, its validation AUC, its step, the last step run).
    """
    from metrics import detection_metrics
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
    best, best_auc, best_step, step = copy.deepcopy(model.state_dict()), -1.0, 0, 0
    t0, seen = time.time(), 0
    for step in range(1, steps + 1):
        x, y = next(batches)
        # the discriminator's logit is positive for real, so P(fake) = sigmoid(-logit): train -logit on "fake"
        loss = F.binary_cross_entropy_with_logits(-model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
        if on_log is not None and (step % log_every == 0 or step == steps):
            on_log(step, loss.item(), seen / (time.time() - t0))
        stop = should_stop()
        if step % eval_every == 0 or step == steps or stop:
            scores = video_scores(model, valid[0], device)
            ok = ~np.isnan(scores)
            m = detection_metrics(scores[ok], np.asarray(valid[1])[ok])
            if m["auc"] > best_auc:
                best, best_auc, best_step = copy.deepcopy(model.state_dict()), m["auc"], step
            if on_eval is not None:
                on_eval(step, m, scores)
            model.train()
        if stop:
            break
    model.load_state_dict(best)
    return model.eval(), best_auc, best_step, step
