import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import data
import detector
import metrics
import checkpoint
from models import Discriminator, Generator

SHAPE = {"nz": 16, "ngf": 8, "ndf": 8, "channels": 3, "image_size": 32}


def drawn_faces(n, seed):
    ds = data.SyntheticFaces(n, 32, seed=seed)
    return torch.stack([ds[i][0] for i in range(n)])


def endless(images, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield images[torch.randint(len(images), (batch,), generator=g)]


def auc(model, real, fake):
    scores = np.r_[detector.score_images(model, real, "cpu"), detector.score_images(model, fake, "cpu")]
    return metrics.detection_metrics(scores, np.r_[np.zeros(len(real)), np.ones(len(fake))])["auc"]


def tiny_gan(seed=0):
    torch.manual_seed(seed)
    G = Generator(nz=SHAPE["nz"], ngf=SHAPE["ngf"], image_size=32)
    D = Discriminator(ndf=SHAPE["ndf"], image_size=32)
    return G, D


def test_fine_tuning_raises_auc_over_the_raw_discriminator():
    G, D = tiny_gan()
    snapshot = Generator(nz=SHAPE["nz"], ngf=SHAPE["ngf"], image_size=32)
    train, test = drawn_faces(128, 0), drawn_faces(64, 2)
    test_fake = data.quantize(detector.sample(G, 64, SHAPE["nz"], "cpu", torch.Generator().manual_seed(5)))
    before = auc(D.eval(), test, test_fake)
    D_state = {k: v.clone() for k, v in D.state_dict().items()}
    torch.manual_seed(1)
    det = detector.fine_tune(D, [G, snapshot], endless(train, 16), steps=25, nz=SHAPE["nz"], device="cpu")
    after = auc(det, test, test_fake)
    assert after > 0.95 and after > before + 0.1, (before, after)
    assert not det.training
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in D_state.items())  # the GAN's own D is left alone


def test_detector_and_threshold_survive_save_and_load(tmp_path):
    _, D = tiny_gan()
    cfg = dict(SHAPE, dataset="synthetic")
    det = D.eval()
    images = drawn_faces(8, 3)
    checkpoint.save_detector(str(tmp_path / "detector.pt"), det, 0.37, cfg, method="fine-tuned", steps=5)
    assert {"format", "config", "detector", "threshold"} <= set(checkpoint.load(str(tmp_path / "detector.pt"), kinds=("detector",)))
    loaded, threshold, kind, loaded_cfg = checkpoint.load_detector(str(tmp_path), "cpu")  # the run folder finds detector.pt
    assert threshold == 0.37 and kind == "fine-tuned detector" and loaded_cfg["image_size"] == 32
    assert torch.equal(detector.fake_scores(loaded, images), detector.fake_scores(det, images))
    assert not (tmp_path / "detector.pt.tmp").exists()


def test_a_face_scores_the_same_alone_and_in_a_batch():
    G, D = tiny_gan()
    torch.manual_seed(0)
    det = detector.fine_tune(D, [G], endless(drawn_faces(32, 0), 8), steps=3, nz=SHAPE["nz"], device="cpu")
    faces = drawn_faces(16, 4)
    alone = torch.cat([detector.fake_scores(det, f[None]) for f in faces])
    together = detector.fake_scores(det, faces)
    with_fakes = detector.fake_scores(det, torch.cat([faces, G(torch.randn(16, SHAPE["nz"])).detach()]))[:16]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, with_fakes, rtol=1e-5, atol=1e-6)


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
    out = detector.frame_augment(x, torch.Generator().manual_seed(0))
    drawn = detector.draw_frame_augment(n, 32, torch.Generator().manual_seed(0))  # the draw frame_augment made
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
    out = detector.frame_augment(x, torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.device == x.device and out.dtype == torch.float32
    assert torch.equal(out, data.quantize(out))  # 8-bit values, like a frame's pixels
    assert torch.equal(detector.frame_augment(x, torch.Generator().manual_seed(3)), out)
    assert not torch.equal(detector.frame_augment(x, torch.Generator().manual_seed(4)), out)
    torch.manual_seed(5)  # without a generator: torch's global RNG, which torch.manual_seed repeats
    first = detector.frame_augment(x)
    torch.manual_seed(5)
    assert torch.equal(detector.frame_augment(x), first)


def test_each_operation_alone_degrades_as_it_should():
    x = textured_ramps(4)
    contrast = lambda y: (y[..., 1:] - y[..., :-1]).abs().mean().item()  # the checkerboard's strength
    base = contrast(data.quantize(x))
    scaled = detector.frame_augment(x, draw=only("rescale", 4, side=16))
    direct = F.interpolate(F.interpolate((x + 1) * 127.5, size=16, mode="bilinear", antialias=True), size=32, mode="bilinear")
    assert (scaled - data.quantize(direct / 127.5 - 1)).abs().max() <= 1 / 127.5 + 1e-6  # F.interpolate's, to one level
    assert contrast(scaled) < 0.5 * base
    assert torch.equal(detector.frame_augment(x, draw=only("rescale", 4, side=32)), data.quantize(x))  # full size: a no-op
    blurs = [contrast(detector.frame_augment(x, draw=only("blur", 4, sigma=s))) for s in (0.1, 0.6, 1.5)]
    assert blurs[0] == base and blurs[0] > blurs[1] > blurs[2]
    errors = [(detector.frame_augment(x, draw=only("jpeg", 4, quality=q)) - data.quantize(x)).abs().mean() for q in (30, 95)]
    assert errors[0] > errors[1] > 0
    mirrored = detector.frame_augment(x, draw=only("flip", 4))
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
    assert (detector.frame_augment(faces, draw=only("rescale", n, side=21)) - pil).abs().mean() < 0.3 * level
    pil = pil_round_trip(faces, lambda im: im.filter(ImageFilter.GaussianBlur(1.2)))
    assert (detector.frame_augment(faces, draw=only("blur", n, sigma=1.2)) - pil).abs().mean() < 0.3 * level
    def pil_jpeg(im):
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=50)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    pil = pil_round_trip(faces, pil_jpeg)
    assert torch.equal(detector.frame_augment(faces, draw=only("jpeg", n, quality=50)), pil)  # libjpeg on both sides
    j = detector.jpeg(faces, 50)
    assert torch.equal(j, pil)  # the 'JPEG 50' test condition is what it was
    assert j.shape == faces.shape and 0 < (j - data.quantize(faces)).abs().mean() < 0.1


def test_spectrum_baseline_catches_upsampling_artefacts():
    # Durall et al.'s point: up-convolutions leave a spectrum that real images lack
    real = drawn_faces(96, 0)
    g = torch.Generator().manual_seed(0)
    def upsampled(n):
        small = torch.nn.functional.avg_pool2d(drawn_faces(n, 5), 2)
        return torch.nn.functional.interpolate(small, scale_factor=2, mode="nearest") + 0.02 * torch.randn(n, 3, 32, 32, generator=g)
    model = detector.fit_spectrum_baseline(real[:64], upsampled(64))
    scores = np.r_[detector.spectrum_scores(model, real[64:]), detector.spectrum_scores(model, upsampled(32))]
    assert metrics.detection_metrics(scores, np.r_[np.zeros(32), np.ones(32)])["auc"] > 0.9
    assert detector.spectrum_features(real[:4]).shape[0] == 4


def test_a_runs_checkpoint_brings_its_fine_tuned_detector_along(tiny_run_copy):
    run = tiny_run_copy
    assert checkpoint.load_detector(str(run / "checkpoint.pt"))[2] == "raw discriminator"
    model, threshold, kind, info = checkpoint.load_detector(str(run))
    checkpoint.save_detector(str(run / "detector.pt"), model, 0.7, info["config"])
    for path in (run, run / "checkpoint.pt", run / "detector.pt"):
        assert checkpoint.load_detector(str(path))[1:3] == (0.7, "fine-tuned detector")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_frame_augment_on_the_gpu_draws_and_degrades_as_on_the_cpu():
    faces = drawn_faces(64, 0)
    cpu = detector.frame_augment(faces, torch.Generator().manual_seed(0))
    gpu = detector.frame_augment(faces.cuda(), torch.Generator().manual_seed(0))
    assert gpu.device.type == "cuda" and gpu.shape == faces.shape and torch.equal(gpu, data.quantize(gpu))
    drawn = detector.draw_frame_augment(64, 32, torch.Generator().manual_seed(0))
    same = ~drawn["jpeg"]  # flips, scaling and blur agree to a level; nvJPEG is not libjpeg (4:4:4 colour)
    assert (gpu.cpu()[same] - cpu[same]).abs().max() <= 1 / 127.5 + 1e-6
    assert (gpu.cpu()[~same] - cpu[~same]).abs().mean() < 4 / 127.5
