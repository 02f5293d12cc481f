"""blends.py: the frame augmentations, and self-blended faces made from landmarks."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import blends
import data


def drawn_faces(n, seed, size=32):
    ds = data.SyntheticFaces(n, size, seed=seed)
    return torch.stack([ds[i][0] for i in range(n)])


def textured_ramps(n, size=32):
    """A left-to-right ramp under a fine checkerboard: a flip reverses the ramp, and every other
    operation (scaling, blur, JPEG) blunts the checkerboard."""
    ramp = torch.linspace(-0.8, 0.8, size)
    checker = 0.15 * (1 - 2 * ((torch.arange(size)[:, None] + torch.arange(size)[None]) % 2))
    return (ramp + checker).expand(n, 3, size, size).contiguous()


def only(op, n, **values):
    """A draw in which every image gets op alone, with the given parameters."""
    d = {"flip": torch.zeros(n, dtype=torch.bool), "rescale": torch.zeros(n, dtype=torch.bool), "side": torch.full((n,), 32),
         "blur": torch.zeros(n, dtype=torch.bool), "sigma": torch.ones(n), "jpeg": torch.zeros(n, dtype=torch.bool),
         "quality": torch.full((n,), 50)}
    d[op] = torch.ones(n, dtype=torch.bool)
    d.update({k: torch.as_tensor(v).expand(n).clone() for k, v in values.items()})
    return d


def test_frame_augment_applies_each_operation_at_its_probability():
    n = 600
    x = textured_ramps(n)
    out = blends.frame_augment(x, torch.Generator().manual_seed(0))
    drawn = blends.draw_frame_augment(n, 32, torch.Generator().manual_seed(0))  # the draw frame_augment made
    flipped = out[..., :16].mean((1, 2, 3)) > out[..., 16:].mean((1, 2, 3))
    assert torch.equal(flipped, drawn["flip"])  # the flip seen in the pixels is the one drawn
    for op, p in (("flip", 0.5), ("rescale", 0.5), ("blur", 0.3), ("jpeg", 0.7)):
        assert abs(drawn[op].float().mean() - p) < 0.07, op  # 3.5 standard deviations at n = 600
    assert drawn["side"].min() == 16 and drawn["side"].max() == 32  # uniform over max(8, S/2)..S, both ends included
    assert drawn["quality"].min() == 30 and drawn["quality"].max() == 95
    assert 0.1 <= drawn["sigma"].min() < 0.2 and 1.4 < drawn["sigma"].max() <= 1.5
    as_drawn = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    untouched = (as_drawn == data.quantize(x)).flatten(1).all(1)
    flip_alone = ~(drawn["rescale"] | drawn["blur"] | drawn["jpeg"])
    assert untouched[flip_alone].all()  # nothing else drawn: nothing else done
    assert not untouched[drawn["jpeg"]].any()  # JPEG always leaves its mark on the checkerboard
    assert 0.05 < untouched.float().mean() < 0.2  # (1/2)(7/10)(3/10) = 0.105, and a few no-op draws (side S, sigma 0.1)


def test_frame_augment_is_8_bit_keeps_shape_and_device_and_repeats_with_its_seed():
    x = drawn_faces(24, 0)
    out = blends.frame_augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.device == x.device and out.dtype == torch.float32
    assert torch.equal(out, data.quantize(out))  # 8-bit values, like a frame's pixels
    assert torch.equal(blends.frame_augment(x, torch.Generator().manual_seed(3)), out)
    assert not torch.equal(blends.frame_augment(x, torch.Generator().manual_seed(4)), out)
    torch.manual_seed(5)  # without a generator: torch's global RNG, which torch.manual_seed repeats
    first = blends.frame_augment(x)
    torch.manual_seed(5)
    assert torch.equal(blends.frame_augment(x), first)


def test_each_operation_alone_degrades_as_it_should():
    x = textured_ramps(4)
    contrast = lambda y: (y[..., 1:] - y[..., :-1]).abs().mean().item()  # the checkerboard's strength
    base = contrast(data.quantize(x))
    scaled = blends.frame_augment(x, draw=only("rescale", 4, side=16))
    direct = F.interpolate(F.interpolate((x + 1) * 127.5, size=16, mode="bilinear", antialias=True), size=32, mode="bilinear")
    assert (scaled - data.quantize(direct / 127.5 - 1)).abs().max() <= 1 / 127.5 + 1e-6  # F.interpolate's, to one level
    assert contrast(scaled) < 0.5 * base
    assert torch.equal(blends.frame_augment(x, draw=only("rescale", 4, side=32)), data.quantize(x))  # full size: a no-op
    blurs = [contrast(blends.frame_augment(x, draw=only("blur", 4, sigma=s))) for s in (0.1, 0.6, 1.5)]
    assert blurs[0] == base and blurs[0] > blurs[1] > blurs[2]
    errors = [(blends.frame_augment(x, draw=only("jpeg", 4, quality=q)) - data.quantize(x)).abs().mean() for q in (30, 95)]
    assert errors[0] > errors[1] > 0
    mirrored = blends.frame_augment(x, draw=only("flip", 4))
    assert torch.equal(mirrored, data.quantize(x).flip(-1))


def pil_round_trip(images, op):
    return data.to_float(torch.stack([torch.from_numpy(np.array(op(Image.fromarray(p.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
                                      for p in data.to_uint8(images)]))


def test_frame_augment_matches_the_pil_transform_it_replaced():
    # the same operations as the per-image PIL loop this replaced, to within rounding: the
    # detector sees the same distribution of degradations
    faces = drawn_faces(8, 0)
    n, level = len(faces), 1 / 127.5
    pil = pil_round_trip(faces, lambda im: im.resize((21, 21), Image.BILINEAR).resize((32, 32), Image.BILINEAR))
    assert (blends.frame_augment(faces, draw=only("rescale", n, side=21)) - pil).abs().mean() < 0.3 * level
    pil = pil_round_trip(faces, lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))
    assert (blends.frame_augment(faces, draw=only("blur", n, sigma=1.2)) - pil).abs().mean() < 0.3 * level
    def pil_jpeg(im):
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=50)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    pil = pil_round_trip(faces, pil_jpeg)
    assert torch.equal(blends.frame_augment(faces, draw=only("jpeg", n, quality=50)), pil)  # libjpeg on both sides
    j = blends.jpeg(faces, 50)
    assert torch.equal(j, pil)  # the 'JPEG 50' test condition is what it was
    assert j.shape == faces.shape and 0 < (j - data.quantize(faces)).abs().mean() < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frame_augment_on_the_gpu_draws_and_degrades_as_on_the_cpu():
    faces = drawn_faces(64, 0)
    cpu = blends.frame_augment(faces, torch.Generator().manual_seed(0))
    gpu = blends.frame_augment(faces.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda" and gpu.shape == faces.shape and torch.equal(gpu, data.quantize(gpu))
    drawn = blends.draw_frame_augment(64, 32, torch.Generator().manual_seed(0))
    same = ~drawn["jpeg"]  # flips, scaling and blur agree to a level; nvJPEG is not libjpeg (4:4:4 colour)
    assert (gpu.cpu()[same] - cpu[same]).abs().max() <= 1 / 127.5 + 1e-6
    assert (gpu.cpu()[~same] - cpu[~same]).abs().mean() < 4 / 127.5


def landmarks_at(n, size, dx=0.0):
    """Five landmarks of an upright face in a size x size crop, moved dx of the side across."""
    marks = blends.default_landmarks(size, 1.6)
    marks[:, 0] += dx * size
    return np.repeat(marks[None], n, 0)


def test_a_landmark_self_blend_differs_from_its_face_only_inside_the_mask():
    faces = data.quantize(drawn_faces(6, 0, 64))
    blended, mask = blends.self_blend(faces, landmarks_at(6, 64), "landmarks", torch.Generator().manual_seed(0))
    changed = (blended - faces).abs().amax(dim=1, keepdim=True) > 1e-6
    assert changed.any()
    assert not (changed & (mask < 1e-3)).any()  # outside the mask every pixel is the real face's
    assert torch.equal(blended, data.quantize(blended))  # 8-bit, like a frame


@pytest.mark.parametrize("kind", blends.MASKS)
def test_the_mask_follows_the_landmarks(kind):
    g = lambda: torch.Generator().manual_seed(1)
    left = blends.blend_masks(landmarks_at(8, 64, -0.15), 64, kind, g())
    right = blends.blend_masks(landmarks_at(8, 64, 0.15), 64, kind, g())
    centre_x = lambda m: (m[:, 0].sum(1) * torch.arange(64)).sum(1) / m[:, 0].sum((1, 2))
    assert (centre_x(right) - centre_x(left) > 0.2 * 64).all()  # moved with the face, 0.3 of the side
    assert (left[:, :, :, -8:].amax((1, 2, 3)) < 0.05).all()  # and nothing of it left at the far edge
    outline = blends.face_outline(landmarks_at(1, 64)[0], forehead=False)
    inside = torch.from_numpy(outline.mean(0)).round().long()
    assert (blends.blend_masks(landmarks_at(4, 64), 64, kind, g())[:, 0, inside[1], inside[0]] > 0.3).all()  # the face itself is blended
