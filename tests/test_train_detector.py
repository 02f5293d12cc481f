"""train_detector.py, evaluate.py --videos/--faces and detect.py's shipped detector, on tiny videos and face crops made here."""

import csv
import html
import json
import os
import random
import shutil

import av
import numpy as np
import pytest
import torch

import archive
import checkpoint
import data
import detect
import detector
import evaluate
import metrics
import train_detector
from cli import UserError, run_cli
from helpers import write_video
from models import Generator

ARCH = "mobilenet_v3_large"  # the default network, with its dropout: a resumed run must restore the RNG it draws from


def tiny_video(path, n=3, seed=0, size=32):
    """A few frames of a drawn face, whole-frame (the tests score with --faces none)."""
    face = np.asarray(data.draw_face(random.Random(seed), size))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(face, i, axis=1)), format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def video_folder(root, identities=("Ann", "Bob", "Cid", "Dee", "Eve"), per_identity=2):
    """root/real/NAME_k.mp4 and root/fake/NAME_k.mp4, each a different drawn face: the DeepFaceLive pairs' shape."""
    for j, name in enumerate(identities):
        for k in range(per_identity):
            tiny_video(root / "real" / f"{name}_{k}.mp4", seed=10 * j + k)
            tiny_video(root / "fake" / f"{name}_{k}.mp4", seed=10 * j + k + 500)
    return root


def crop_folder(root, groups=10):
    """root/real/*.png and root/fake/*.png with a faces.csv whose groups pair each fake with its real: dfdc-faces' shape."""
    rows = []
    for g in range(groups):
        for label, seed in (("real", g), ("fake", g + 300)):
            os.makedirs(root / label, exist_ok=True)
            name = f"{label}/f{g:02d}.png"
            data.draw_face(random.Random(seed), 40).save(root / name)
            rows.append({"file": name, "label": label, "group": f"video{g}", "source_size": "40x40"})
    with open(root / "faces.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("file", "label", "group", "source_size"))
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return video_folder(root / "videos"), crop_folder(root / "crops")


def tiny(tmp_path, *extra):
    return ["--faces", "none", "--frames", "3", "--image-size", "32", "--epochs", "1", "--batch", "8", "--workers", "1",
            "--arch", ARCH, "--cache-dir", str(tmp_path / "cache"), "--valid", "0.2", "--test", "0.2", *extra]


def test_every_source_labels_its_fakes_1():
    dark = detector.Pool("real", np.zeros((6, 32, 32, 3), np.uint8), np.full((6, 5, 2), np.nan, np.float32))
    bright = detector.Pool("fake", np.full((6, 32, 32, 3), 255, np.uint8), np.full((6, 5, 2), np.nan, np.float32))
    G = Generator(nz=8, ngf=8, image_size=32).eval()
    batches = detector.Batches([dark], {"labelled": [bright], "sbi": [dark], "gan": [G]}, batch=12, image_size=32,
                               framing_scale=1.15, nz=8)
    x, y = next(batches)
    assert y.tolist() == [0] * 6 + [1] * 6  # real first, then labelled, self-blended and GAN fakes, two each
    means = x.mean((1, 2, 3))
    assert (means[:6] < -0.9).all() and (means[6:8] > 0.9).all()  # the real faces are the dark ones, the labelled fakes bright
    assert x.shape == (12, 3, 32, 32)


def test_groups_from_faces_csv_stay_in_one_part(folders):
    _, crops = folders
    items = data.labelled_media(str(crops), data.IMAGE_EXTENSIONS)
    assert len(items) == 20 and {tuple(g) for _, _, g in items} == {(f"video{g}",) for g in range(10)}
    for seed in range(4):
        parts, groups = data.split_by_group(items, valid=0.2, test=0.2, seed=seed)
        where = {}
        for part, chosen in parts.items():
            assert {label for _, label in chosen} == {0, 1}
            for path, _ in chosen:
                group = next(g for p, _, g in items if p == path)[0]
                assert where.setdefault(group, part) == part, f"{group} in {where[group]} and {part}"


def test_a_faces_csv_with_bad_rows_is_one_sentence(tmp_path):
    root = crop_folder(tmp_path / "crops", groups=2)
    with open(root / "faces.csv", "a") as f:
        f.write("real/missing.png,real,video9,1x1\nfake/f00.png,maybe,video0,1x1\n")
    with pytest.raises(UserError, match="2 rows cannot be used"):
        data.labelled_media(str(root), data.IMAGE_EXTENSIONS)


def train(tmp_path, folders, *extra, out="run"):
    videos, crops = folders
    argv = ["--data", str(videos), "--data", str(crops), "--out", str(tmp_path / out), *tiny(tmp_path), *extra]
    return train_detector.main(argv), str(tmp_path / out)


def test_a_video_folder_and_a_crop_folder_train_one_detector_that_detect_and_evaluate_agree_with(tmp_path, folders, monkeypatch, capsys):
    videos, crops = folders
    status, out = train(tmp_path, folders)
    assert status == 0
    model, threshold, kind, info = checkpoint.load_detector(out)
    assert kind == "trained detector" and info["arch"] == ARCH and info["image_size"] == 32 and info["framing"] == detector.FRAMING
    assert set(info["folders"]) == {str(videos), str(crops)}
    for entry in info["folders"].values():  # no group in two parts
        groups = {part: set(entry["split"][part]["groups"]) for part in ("train", "valid", "test")}
        assert not (groups["train"] & groups["valid"]) and not (groups["train"] & groups["test"]) and not (groups["valid"] & groups["test"])
    # the threshold calls at most 5% of each folder's real validation files fake, and is the lowest that does
    assert info["false_alarm_rate"] == 0.05
    real = {root: [f["score"] for f in entry["valid"]["files"].values() if f["label"] == 0] for root, entry in info["folders"].items()}
    assert all(np.mean(np.array(s) >= threshold) <= 0.05 for s in real.values())
    assert threshold == max(metrics.false_alarm_threshold(s, 0.05) for s in real.values())
    assert any(max(s) == np.nextafter(threshold, 0) for s in real.values())  # just above a real validation file: none lower would do

    # detect.py scores a held-out video as training's report did
    video_entry = info["folders"][str(videos)]
    test_video = os.path.join(str(videos), video_entry["split"]["test"]["files"][0])
    assert detect.main([test_video, "--checkpoint", out, "--out", str(tmp_path / "report")]) == 0
    said = f"fake means P(fake) >= {threshold:.3f}, the detector's threshold, set so that at most 1 in 20 of the real videos and faces"
    assert said in capsys.readouterr().out
    assert html.escape(said[1:]) in (tmp_path / "report" / "report.html").read_text()
    scored = json.loads((tmp_path / "report" / "results" / (archive.Results.key(test_video) + ".json")).read_text())
    assert scored["frames_scored"] == 3  # the detector's own frames and finder (none), with no flag given
    assert scored["score"] == pytest.approx(video_entry["test"]["files"][test_video]["score"], abs=1e-5)

    # evaluate.py reproduces the test parts, per file and (for the crops) per face
    monkeypatch.chdir(tmp_path)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert evaluate.main([out, "--videos", str(videos), "--part", "test", *cache]) == 0
    evaluated = json.loads((tmp_path / "run" / "detector-videos-videos-test.json").read_text())
    assert sorted(evaluated["files"]) == sorted(video_entry["test"]["files"])
    for path, entry in evaluated["files"].items():
        assert entry["score"] == pytest.approx(video_entry["test"]["files"][path]["score"], abs=1e-5)
    assert evaluate.main([out, "--faces", str(crops), "--part", "test", *cache, "--out", str(tmp_path / "reports")]) == 0
    faces = json.loads((tmp_path / "reports" / "detector-faces-crops-test.json").read_text())  # --out, not the run
    assert not (tmp_path / "run" / "detector-faces-crops-test.json").exists()
    crop_entry = info["folders"][str(crops)]
    assert faces["overall"]["auc"] == pytest.approx(crop_entry["test"]["overall"]["auc"])
    assert faces["frames"]["n_real"] + faces["frames"]["n_fake"] == len(crop_entry["split"]["test"]["files"])  # a face a crop


def test_robustness_scores_every_video_again_as_reencoded_copies(tmp_path, folders, monkeypatch, capsys):
    videos, _ = folders
    out = train(tmp_path, folders)[1]
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    assert evaluate.main([out, "--videos", str(videos), "--robustness", "--cache-dir", cache, "--workers", "1"]) == 0
    report = json.loads((tmp_path / "run" / "detector-videos-videos.json").read_text())
    rob = report["robustness"]
    assert list(rob) == ["original", "CRF 28", "half size, CRF 23"]
    assert rob["original"]["files"] == {p: e["score"] for p, e in report["files"].items()}
    copies = sorted(os.listdir(tmp_path / "cache" / "reencoded"))
    assert len(copies) == 2 * len(report["files"])
    one = sorted(report["files"])[0]
    stem = os.path.splitext(os.path.basename(one))[0]
    half = next(c for c in copies if c.startswith(f"{stem}-crf23-x0.5-") and c.endswith(".mp4"))
    with av.open(str(tmp_path / "cache" / "reencoded" / half)) as c:
        assert (c.streams.video[0].width, c.streams.video[0].height, c.streams.video[0].frames) == (16, 16, 3)
    # a copy is scored as detect.py scores it, and the change is measured against the original's score
    assert detect.main([str(tmp_path / "cache" / "reencoded" / half), "--checkpoint", out, "--out", str(tmp_path / "report"), "--workers", "0"]) == 0
    result = json.loads(next((tmp_path / "report" / "results").glob("*.json")).read_text())
    assert result["score"] == pytest.approx(rob["half size, CRF 23"]["files"][one], abs=1e-6)
    moved = [abs(rob["half size, CRF 23"]["files"][p] - s) for p, s in rob["original"]["files"].items()]
    assert rob["half size, CRF 23"]["mean_abs_change"] == pytest.approx(np.mean(moved)) and max(moved) > 0

    # a video that cannot be re-encoded is left out of that comparison, not counted as a copy that did not move
    reencode = evaluate.reencode

    def fails_once(path, f, crf, scale):
        if path == one and crf == 28:
            raise ValueError("no encoder")
        reencode(path, f, crf, scale)
    monkeypatch.setattr(evaluate, "reencode", fails_once)
    assert evaluate.main([out, "--videos", str(videos), "--robustness", "--cache-dir", str(tmp_path / "cache2"), "--workers", "1"]) == 0
    assert f"{one}: could not be re-encoded (ValueError: no encoder); left out of the CRF 28 comparison" in capsys.readouterr().err
    rob = json.loads((tmp_path / "run" / "detector-videos-videos.json").read_text())["robustness"]
    assert rob["CRF 28"]["files"][one] is None and rob["CRF 28"]["videos"] == len(report["files"]) - 1
    assert rob["half size, CRF 23"]["videos"] == len(report["files"])
    # the copies are made once: a second run re-encodes nothing
    before = {c: os.stat(tmp_path / "cache" / "reencoded" / c).st_mtime_ns for c in copies}
    assert evaluate.main([out, "--videos", str(videos), "--robustness", "--cache-dir", cache, "--workers", "1"]) == 0
    assert before == {c: os.stat(tmp_path / "cache" / "reencoded" / c).st_mtime_ns for c in copies}
    with pytest.raises(UserError, match="--robustness re-encodes the videos of --videos DIR"):
        evaluate.main([out, "--faces", str(videos), "--robustness"])


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, folders, monkeypatch):
    assert train(tmp_path, folders, "--epochs", "2", "--eval-every", "3", out="whole")[0] == 0
    real_next, calls = detector.Batches.__next__, [0]

    def killed_at_step_5(self):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("killed")  # as kill -9 would stop it, after step 4 was saved
        return real_next(self)

    monkeypatch.setattr(detector.Batches, "__next__", killed_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train(tmp_path, folders, "--epochs", "2", "--eval-every", "3", "--save-every", "0", out="part")
    monkeypatch.setattr(detector.Batches, "__next__", real_next)
    assert not os.path.exists(tmp_path / "part" / "detector.pt")
    assert checkpoint.load_detector_training(str(tmp_path / "part"))["progress"]["step"] == 4
    assert train_detector.main(["--resume", str(tmp_path / "part")]) == 0
    whole, part = (checkpoint.load_detector_training(str(tmp_path / name)) for name in ("whole", "part"))
    assert whole["progress"]["step"] == part["progress"]["step"] > 4
    for k, v in whole["model"].items():
        assert torch.equal(v, part["model"][k]), k
    assert whole["progress"]["best_step"] == part["progress"]["best_step"]


def test_the_gans_detector_and_train_detector_go_through_the_same_loop(tmp_path, folders, monkeypatch):
    real_fit, callers = detector.fit, []
    monkeypatch.setattr(detector, "fit", lambda model, *a, **k: callers.append(model.arch) or real_fit(model, *a, **k))
    assert train(tmp_path, folders)[0] == 0
    G = Generator(nz=8, ngf=8, image_size=32)
    D = detector.build("dcgan", 32, ndf=8).net
    reals = (torch.rand(4, 3, 32, 32) * 2 - 1 for _ in iter(int, 1))
    det = detector.train_on_gan(D, 8, 32, [G], reals, steps=2, nz=8, device="cpu")
    assert callers == [ARCH, "dcgan"] and not det.training


def test_detect_without_a_checkpoint_uses_the_shipped_detector_its_size_and_framing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = detector.build(ARCH, 48)
    framing = {"scale": 1.6, "shift": 0.1}
    dcfg = checkpoint.detector_config(ARCH, 48, framing=framing, faces={"faces": "haar", "detect_size": 320, "max_faces": 1}, frames=4)
    shipped = tmp_path / "shipped.pt"
    checkpoint.save_detector(str(shipped), model.eval(), 0.5, dcfg, method="trained")
    monkeypatch.setattr(checkpoint, "SHIPPED_DETECTOR", str(shipped))
    seen = []
    real_forward = detector.Detector.forward
    monkeypatch.setattr(detector.Detector, "forward", lambda self, x: seen.append(tuple(x.shape[1:])) or real_forward(self, x))
    video = write_video(tmp_path / "face.mp4", 12)
    assert detect.main([video, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results" / (archive.Results.key(video) + ".json")).read_text())
    assert result["frames_sampled"] == 4 and seen and set(seen) == {(3, 48, 48)}
    face = result["frames"][0]["faces"][0]
    # the square is the stored framing, in the Haar cascade's box units
    haar = __import__("faces").set_framing(__import__("faces").Haar(), framing)
    assert face["crop"][2] == min(round(face["box"][2] * haar.crop_scale), 120)
    # missing or damaged, the shipped detector is one sentence
    shipped.write_bytes(b"not a detector")
    assert run_cli(detect.main, [video]) == 2
    os.remove(shipped)
    with pytest.raises(UserError, match="is missing; restore it"):
        detect.main([video])


def test_the_shipped_detector_is_small_and_loads():
    path = checkpoint.SHIPPED_DETECTOR
    assert os.path.getsize(path) <= 25 * 2**20
    model, threshold, kind, info = checkpoint.load_detector(path)
    assert info["framing"] == detector.FRAMING and 0 < threshold < 1 and model(torch.zeros(1, 3, info["image_size"], info["image_size"])).shape == (1,)


def test_a_corrupt_video_costs_one_line_and_training_goes_on(tmp_path, capsys):
    root = video_folder(tmp_path / "data")
    (root / "fake" / "Ann_9.mp4").write_bytes(b"not a video at all")
    status, out = 0, str(tmp_path / "run")
    status = train_detector.main(["--data", str(root), "--out", out, *tiny(tmp_path), "--no-labelled-fakes"])
    assert status == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "Ann_9.mp4" in line]
    assert len(err) == 1 and "left out" in err[0]
    assert checkpoint.load_detector(out)[3]["args"]["labelled_fakes"] is False


@pytest.mark.parametrize("make, argv, phrase", [
    (lambda root: os.makedirs(root / "real"), [], "needs two subfolders, real/ and fake/"),
    (lambda root: video_folder(root, identities=("Ann", "Bob")), [], "cannot split 2 groups"),
    (lambda root: video_folder(root), ["--no-labelled-fakes", "--no-sbi"], "every source of fakes is switched off"),
    (lambda root: video_folder(root), ["--valid", "0"], "--valid 0 leaves no validation files"),
    (lambda root: video_folder(root), ["--gan-fakes"], "--gan-fakes needs --gan RUN"),
    (lambda root: video_folder(root), ["--arch", "dcgan"], "--arch dcgan starts from a GAN's discriminator"),
    (lambda root: video_folder(root), ["--group-by", "("], "argument --group-by: is not a regular expression"),
])
def test_bad_data_gets_one_line(tmp_path, capsys, make, argv, phrase):
    make(tmp_path / "data")
    try:
        status = run_cli(train_detector.main, ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *tiny(tmp_path), *argv])
    except SystemExit as e:  # argparse's own one-line error for a flag it cannot parse
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and phrase in err[0]
    assert not os.path.exists(tmp_path / "run" / "detector.pt")


def test_resume_of_a_folder_without_a_training_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(train_detector.main, ["--resume", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no training.pt" in err[0]


def test_evaluate_part_of_a_folder_the_detector_never_saw_is_one_line(tmp_path, folders):
    shutil.copytree(folders[0], tmp_path / "elsewhere")
    model = detector.build(ARCH, 32)
    checkpoint.save_detector(str(tmp_path / "detector.pt"), model, 0.5, checkpoint.detector_config(ARCH, 32))
    with pytest.raises(UserError, match="stores the split"):
        evaluate.main([str(tmp_path / "detector.pt"), "--videos", str(tmp_path / "elsewhere"), "--part", "test"])
