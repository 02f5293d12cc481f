import numpy as np
import torch

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
    det = detector.fine_tune(D, [G, snapshot], endless(train, 16), steps=25, nz=SHAPE["nz"], device="cpu", image_size=32)
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
    det = detector.fine_tune(D, [G], endless(drawn_faces(32, 0), 8), steps=3, nz=SHAPE["nz"], device="cpu", image_size=32)
    faces = drawn_faces(16, 4)
    alone = torch.cat([detector.fake_scores(det, f[None]) for f in faces])
    together = detector.fake_scores(det, faces)
    with_fakes = detector.fake_scores(det, torch.cat([faces, G(torch.randn(16, SHAPE["nz"])).detach()]))[:16]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, with_fakes, rtol=1e-5, atol=1e-6)


def test_frame_augmentations_flip_about_half_and_degrade_most_faces_and_jpeg_changes_pixels_a_little():
    # a left-to-right ramp: every augmentation but the flip keeps its direction, and all but
    # the flip change its pixels, and about 1 face in 10 gets none of those
    ramp = torch.linspace(-1, 1, 32).expand(200, 3, 32, 32).contiguous()
    torch.manual_seed(0)
    out = detector.augment(ramp, detector.FrameAugment(32))
    flipped = out[..., :16].mean((1, 2, 3)) > out[..., 16:].mean((1, 2, 3))
    assert 0.35 < flipped.float().mean() < 0.65  # p = 1/2
    as_drawn = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    untouched = (as_drawn == data.quantize(ramp)).flatten(1).all(1)
    assert untouched.float().mean() < 0.15  # (1/2)(7/10)(3/10) = 0.105 keep the flip alone or nothing
    torch.manual_seed(0)
    assert torch.equal(detector.augment(ramp, detector.FrameAugment(32)), out)  # seeded: a validation draw is repeatable
    faces = drawn_faces(8, 0)
    j = detector.jpeg(faces, 50)
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
