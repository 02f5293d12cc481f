"""What a face goes through on its way into a video frame, and self-blended fakes made from real faces.

frame_augment degrades a batch the way a video frame would (flip, a smaller capture scaled
back up, blur, JPEG), as batched tensor operations on the batch's device. self_blend makes
the fakes of Self-Blended Images (Shiohara & Yamasaki, CVPR 2022): a real face pasted onto a
copy of itself whose colour, sharpness and scale are jittered, through a soft mask drawn from
the face's landmarks, deformed and blurred at random. The result differs from the real face
only inside the mask and carries no identity: what a detector learns from it is the blending
boundary that every face swap leaves.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from data import quantize


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
# self-blended faces (Shiohara & Yamasaki, CVPR 2022)

MASKS = ("landmarks", "ellipse")
WORK = 64  # masks are drawn, deformed and blurred at this side and scaled up: they are smooth, and a wide blur at full size costs more than the rest of a batch


def face_outline(marks, forehead):
    """Five landmarks (eye, eye, nose, mouth corner, mouth corner) -> a polygon around the face (K, 2).

    Five points do not outline a face, but they fix its proportions: the eye distance sets the
    width and the eye-to-mouth distance the height. The outline runs from the temples past the
    cheeks and the jaw to the chin and back, over the brows, or over the forehead when asked (the
    paper's landmark hulls come with and without it).
    """
    e1, e2, _, m1, m2 = marks
    eye, mouth = (e1 + e2) / 2, (m1 + m2) / 2
    up, across = eye - mouth, e2 - e1
    d, w = max(np.linalg.norm(up), 1e-6), max(np.linalg.norm(across), 1e-6)
    up, across = up / d, across / w
    at = lambda p, a, u: p + across * a * w + up * u * d  # a point a eye-distances across and u eye-to-mouth distances up from p
    return np.array([
        at(e1, -0.35, 0.35), at(e1, -0.5, -0.1), at(m1, -0.45, 0.05), at(m1, -0.2, -0.45), at(mouth, 0, -0.65),
        at(m2, 0.2, -0.45), at(m2, 0.45, 0.05), at(e2, 0.5, -0.1), at(e2, 0.35, 0.35),
        *([at(e2, 0.1, 0.9), at(e1, -0.1, 0.9)] if forehead else [at(e2, 0.05, 0.45), at(e1, -0.05, 0.45)]),
    ])


def default_landmarks(size, framing_scale):
    """Where the five landmarks of an upright face sit in a crop of side size framed at framing_scale YuNet box widths,
    centred on the box: for faces whose landmarks were not found (the Haar cascade gives none)."""
    box = size / framing_scale
    c = size / 2
    return np.array([[c - 0.22 * box, c - 0.12 * box], [c + 0.22 * box, c - 0.12 * box], [c, c + 0.05 * box],
                     [c - 0.17 * box, c + 0.25 * box], [c + 0.17 * box, c + 0.25 * box]])


def _smooth_noise(n, size, cells, generator):
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled smoothly to size x size."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


def blend_masks(landmarks, size, kind="landmarks", generator=None):
    """(n, 1, size, size) soft masks in [0, 1] over the faces whose landmarks (n, 5, 2), in pixels of a size x size crop, are given.

    landmarks: the convex outline of the face (face_outline, with the forehead half the time),
    enlarged or shrunk at random; ellipse: the ellipse that spans the same outline. Then, as
    in the paper, the mask is deformed by a smooth random displacement, its edge blurred by a
    random width, and its strength scaled by a random blend ratio (1 half the time).
    """
    n = len(landmarks)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=generator)
    forehead, grow = torch.rand(n, generator=generator) < 0.5, u(0.8, 1.05)
    work = min(size, WORK)
    hard = torch.zeros(n, 1, work, work)
    for i, marks in enumerate(np.asarray(landmarks, dtype=np.float64) * (work / size)):
        poly = face_outline(marks, bool(forehead[i]))
        centre = marks[2]  # the nose tip: the mask grows and shrinks around it
        poly = centre + (poly - centre) * float(grow[i])
        im = Image.new("L", (work, work), 0)
        draw = ImageDraw.Draw(im)
        if kind == "ellipse":
            (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
            draw.ellipse([x0, y0, x1, y1], fill=255)
        else:
            draw.polygon([tuple(p) for p in poly], fill=255)
        hard[i, 0] = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
    # deform: every pixel reads the mask a smooth random distance away (up to 6% of the side)
    shift = 0.12 * torch.cat([_smooth_noise(n, work, 4, generator), _smooth_noise(n, work, 4, generator)], 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, work), torch.linspace(-1, 1, work), indexing="ij")
    grid = torch.stack([xs, ys], -1)[None] + shift.permute(0, 2, 3, 1)
    mask = F.grid_sample(hard, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = torch.empty_like(mask)
    sigmas = u(0.01, 0.06) * work
    for i in range(n):  # a soft edge of its own width for every mask
        k = int(2 * round(3 * float(sigmas[i])) + 1)
        out[i] = TF.gaussian_blur(mask[i], [k, k], [float(sigmas[i])] * 2)
    out = out / out.flatten(1).amax(1).clamp_min(1e-6).view(n, 1, 1, 1)  # the blur lowers a small mask's peak: full strength inside
    if work < size:
        out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False)
    ratio = torch.where(torch.rand(n, generator=generator) < 0.5, torch.ones(n), u(0.4, 1.0))
    return out.clamp(0, 1) * ratio.view(n, 1, 1, 1)


def self_blend(faces, landmarks, kind="landmarks", generator=None):
    """Real faces (N, 3, S, S) in [-1, 1] and their landmarks (N, 5, 2) in pixels -> (self-blended fakes, their masks), 8-bit.

    Each face is pasted onto itself: a source copy whose colour, sharpness and scale are
    jittered (the mismatch a face swap leaves) is blended through a soft mask into the
    untouched face. Outside the mask the result is the real face, pixel for pixel.
    """
    n, _, s, _ = faces.shape
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=generator)
    src = faces * u(0.9, 1.1, 3, 1, 1) + u(-0.08, 0.08, 3, 1, 1)  # per-channel gain and shift: colour mismatch
    soft = torch.rand(n, generator=generator)
    blurred = TF.gaussian_blur(src, [5, 5], [1.0, 1.0])
    sharper = 2 * src - blurred
    src = torch.where((soft < 0.3).view(n, 1, 1, 1), blurred, torch.where((soft > 0.8).view(n, 1, 1, 1), sharper, src))
    scale, shift = u(0.94, 1.06), u(-0.03, 0.03, 2)  # the pasted face a little larger or smaller, a little off
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, (n, 3, s, s), align_corners=False)
    src = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = blend_masks(landmarks, s, kind, generator)
    return quantize(mask * src.clamp(-1, 1) + (1 - mask) * faces), mask
