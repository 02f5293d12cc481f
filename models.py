"""The DCGAN generator and discriminator (Radford, Metz & Chintala 2015), and their checkpoints.

Both networks are built from the image size: the generator starts from a 4x4 map and
doubles it until it reaches `image_size`; the discriminator mirrors it. At 64x64 they are
exactly the networks of the paper and of the PyTorch DCGAN example.
"""

import os

import torch
import torch.nn as nn

from errors import UserError

IMAGE_SIZES = (32, 64, 128, 256)
CHECKPOINT_FORMAT = 1
SHAPE_KEYS = ("nz", "ngf", "ndf", "channels", "image_size")  # what a checkpoint's networks are built from


def _width(base, image_size, resolution):
    # Feature maps per layer: base at the largest hidden resolution, doubling as the map
    # halves, capped at 8x so that 128 and 256 grow in depth, not in width.
    return base * min(8, image_size // (2 * resolution))


def _check_size(image_size):
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")


class Generator(nn.Module):
    """z (N, nz) -> image (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, *, nz=100, ngf=64, channels=3, image_size=64):
        super().__init__()
        _check_size(image_size)
        self.nz = nz
        resolution = 4
        width = _width(ngf, image_size, resolution)
        # nz x 1 x 1 -> width x 4 x 4
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        while resolution * 2 < image_size:
            resolution *= 2
            out = _width(ngf, image_size, resolution)
            # width x r/2 x r/2 -> out x r x r
            layers += [nn.ConvTranspose2d(width, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            width = out
        # ngf x size/2 x size/2 -> channels x size x size
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z):
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, channels, image_size, image_size) -> logit (N,); D(x) = sigmoid(logit)."""

    def __init__(self, *, ndf=64, channels=3, image_size=64):
        super().__init__()
        _check_size(image_size)
        resolution = image_size // 2
        width = _width(ndf, image_size, resolution)
        # channels x size x size -> ndf x size/2 x size/2; no BatchNorm on the input layer (paper)
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        while resolution > 4:
            resolution //= 2
            out = _width(ndf, image_size, resolution)
            # width x 2r x 2r -> out x r x r
            layers += [nn.Conv2d(width, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        # width x 4 x 4 -> 1 x 1 x 1; the sigmoid lives in the loss (BCEWithLogitsLoss)
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.main(x).flatten()


@torch.no_grad()
def draw_samples(G, z):
    """G(z) in eval mode (BatchNorm running statistics), as a deployed generator draws; sampling never changes G."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def init_weights(module):
    """The paper's initialisation: conv weights from N(0, 0.02), BatchNorm scales from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_models(cfg):
    """Both networks from a config dict holding SHAPE_KEYS."""
    G = Generator(nz=cfg["nz"], ngf=cfg["ngf"], channels=cfg["channels"], image_size=cfg["image_size"])
    D = Discriminator(ndf=cfg["ndf"], channels=cfg["channels"], image_size=cfg["image_size"])
    return G, D


# -----------------------------------------------------------------------------
# checkpoints: one dict, written atomically, read with weights_only=True

def save_checkpoint(state, path):
    """Write to a temporary file and rename it, so a crash mid-write never destroys the last good one."""
    state = {"format": CHECKPOINT_FORMAT, **state}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, or a power cut could publish an empty file
    os.replace(tmp, path)


def resolve_checkpoint(path):
    """A run folder or a checkpoint file -> the checkpoint file."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(candidate):
            raise UserError(f"{path} holds no checkpoint.pt; point at a run folder that finished at least one epoch or was stopped with Ctrl-C")
        return candidate
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; give a run folder (runs/generative_model/NAME) or its checkpoint.pt")
    return path


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by main.py and check that it is one; returns the dict."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated files, other pickles, text files: all the user's to fix
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}); it may be truncated or not a PyTorch file") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by main.py (it has no format and config); train one with main.py or point --resume at a run folder")
    if ckpt["format"] > CHECKPOINT_FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']}, newer than this code understands ({CHECKPOINT_FORMAT}); update the code")
    missing = [k for k in SHAPE_KEYS if k not in ckpt["config"]]
    if missing:
        raise UserError(f"{path} has no {', '.join(missing)} in its config, so the model cannot be rebuilt from it")
    return ckpt


def load_state(module, state, what, path):
    """load_state_dict(strict=True), with a one-line account of what does not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"the {what} in {path} does not fit the model built from its config: {detail[:300]}") from None


def require(ckpt, keys, path, use):
    """Say in one sentence when a checkpoint-format file (a snapshot, detector.pt) lacks what a command needs."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise UserError(f"{path} holds no {' or '.join(missing)} (it has {', '.join(sorted(k for k in ckpt if k != 'format'))}); "
                        f"{use} needs a run folder or its checkpoint.pt")


def models_from_checkpoint(ckpt, path, device="cpu"):
    """Rebuild G and D with the checkpoint's shape and load their weights."""
    require(ckpt, ("G", "D"), path, "this command")
    G, D = build_models(ckpt["config"])
    load_state(G, ckpt["G"], "generator", path)
    load_state(D, ckpt["D"], "discriminator", path)
    return G.to(device), D.to(device)
