"""train_detector.py and evaluate.py --videos on tiny videos made here: the split, self-blended faces, the threshold, detector.pt."""

import json
import os
import random
import shutil

import av
import numpy as np
import pytest
import torch

import checkpoint
import data
import detect
import detector
import evaluate
import main
import metrics
import train_detector
from cli import UserError, run_cli
from helpers import train_args


def tiny_video(path, n=6, seed=0, size=48):
    """A few frames of a drawn face, whole-frame (the tests score with --faces none)."""
    face = np.asarray(data.draw_face(random.Random(seed), size))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(n):
            frame = np.roll(face, i, axis=1)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def labelled_folder(root, identities=("Ann", "Bob", "Cid", "Dee", "Eve"), per_identity=2):
    """root/real/NAME_k.mp4 and root/fake/NAME_k.mp4, each a different drawn face."""
    for j, name in enumerate(identities):
        for k in range(per_identity):
            tiny_video(root / "real" / f"{name}_{k}.mp4", seed=10 * j + k)
            tiny_video(root / "fake" / f"{name}_{k}.mp4", seed=10 * j + k + 500)
    return root


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    assert main.main(train_args(logdir, "--epochs", "1", "--run-name", "r")) == 0
    return str(logdir / "r")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return labelled_folder(tmp_path_factory.mktemp("videos"))


TINY = ["--faces", "none", "--frames", "3", "--image-size", "32", "--steps", "3", "--batch", "4", "--eval-every", "2",
        "--real-images", "8"]


def test_no_video_and_no_identity_lands_in_two_parts():
    items = [(f"/d/{c}/{name}_{k}.mp4", label) for name in "ABCDEFGHIJ" for k in range(3)
             for c, label in (("real", 0), ("fake", 1))]
    for seed in range(5):
        parts, names = data.split_by_group(items, valid=0.2, test=0.2, seed=seed)
        files = [f for part in parts.values() for f, _ in part]
        assert sorted(files) == sorted(f for f, _ in items)  # every file once
        owner = {}
        for part, chosen in parts.items():
            assert {label for _, label in chosen} == {0, 1}
            for f, _ in chosen:
                assert owner.setdefault(data.identities_of(f)[0], part) == part  # A_0, A_1, A_2 in one part
        assert set(names["test"]).isdisjoint(names["train"]) and set(names["valid"]).isdisjoint(names["train"])


def test_group_by_regex_and_default_stem():
    assert data.identities_of("x/Keanu_Reeves_0.mp4") == data.identities_of("y/Keanu_Reeves_1.mp4") == ["Keanu_Reeves"]
    assert data.identities_of("clip-07-take2.mp4", r"clip-(\d+)") == ["07"]
    assert data.identities_of("000_003.mp4", r"\d+") == ["000", "003"]  # FaceForensics++: target 000's frames, 003's face


def test_a_file_showing_two_identities_joins_their_groups():
    # FaceForensics++ names: a fake NNN_MMM shows the frames of NNN and the face of MMM
    items = [(f"/d/real/{i:03d}.mp4", 0) for i in range(10)] + [(f"/d/fake/{i:03d}_{(i + 1) % 10:03d}.mp4", 1) for i in range(0, 10, 2)]
    parts, names = data.split_by_group(items, pattern=r"\d+", valid=0.2, test=0.2, seed=3)
    where = {}
    for part, chosen in parts.items():
        for path, _ in chosen:
            for ident in data.identities_of(path, r"\d+"):
                assert where.setdefault(ident, part) == part, f"{ident} is in {where[ident]} and {part}"


def test_too_few_identities_to_split_is_one_clear_error():
    items = [("/d/real/A_0.mp4", 0), ("/d/fake/A_0.mp4", 1), ("/d/real/B_0.mp4", 0), ("/d/fake/B_0.mp4", 1)]
    with pytest.raises(UserError, match="cannot split 2 identities"):
        data.split_by_group(items, valid=0.3, test=0.3)


def test_a_self_blended_face_differs_only_inside_its_mask():
    faces = torch.stack([data.preprocess(64)(data.draw_face(random.Random(i), 64)) for i in range(6)])
    faces = data.quantize(faces)
    blended, mask = detector.self_blend(faces, torch.Generator().manual_seed(0))
    changed = (blended - faces).abs().amax(dim=1, keepdim=True) > 1e-6
    assert changed.any()
    assert not (changed & (mask < 1e-3)).any()  # outside the mask, every pixel is the source's
    assert torch.equal(blended, data.quantize(blended))  # 8-bit like a real frame
    # and the batches call it fake
    real = data.to_uint8(faces).permute(0, 2, 3, 1).numpy()
    batches = detector.Batches(real, None, None, [], ["sbi"], batch=4, image_size=64, nz=8, device="cpu", seed=0)
    x, y = next(batches)
    assert x.shape == (8, 3, 64, 64) and y.tolist() == [0] * 4 + [1] * 4


def test_the_threshold_is_the_one_validation_picks():
    scores = [0.05, 0.2, 0.3, 0.62, 0.4, 0.7, 0.8, 0.9]
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    t = metrics.pick_threshold(scores, labels)
    # best balanced accuracy: all fakes caught with one false alarm (0.62) at 0.4, or none at 0.7 with one fake missed;
    # the first point of the tie, 0.7 (J = 0.75), sits halfway to the next score below it, 0.62
    assert t == pytest.approx((0.7 + 0.62) / 2)
    assert metrics.detection_metrics(scores, labels, t)["accuracy"] == 7 / 8


def test_train_detector_writes_a_detector_that_detect_uses_at_its_size(tmp_path, gan_run, folder, monkeypatch):
    out = tmp_path / "det.pt"
    monkeypatch.chdir(folder.parent)  # --data as a user types it, relative to where they are
    assert train_detector.main([gan_run, "--data", folder.name, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                "--valid", "0.2", "--test", "0.2", *TINY, "--image-size", "64"]) == 0
    monkeypatch.chdir(tmp_path)
    model, threshold, kind, info = checkpoint.load_detector(str(out))
    assert kind == "trained detector" and info["image_size"] == 64 and info["sources"] == ["labelled", "sbi", "gan"]
    assert set(info["split"]) == {"train", "valid", "test"}
    ident = {part: set(info["split"][part]["identities"]) for part in info["split"]}
    assert not (ident["train"] & ident["valid"]) and not (ident["train"] & ident["test"]) and not (ident["valid"] & ident["test"])
    # the stored threshold is the one picked on the validation videos' scores
    valid = info["valid"]["videos"]
    assert threshold == pytest.approx(metrics.pick_threshold([v["score"] for v in valid.values()], [v["label"] for v in valid.values()]))
    with open(tmp_path / "det.json") as f:
        assert json.load(f)["split"]["test"]["files"] == info["split"]["test"]["files"]

    # detect.py scores at the detector's 64x64, the same score the training code gives that video
    video = os.path.join(folder.name, info["split"]["test"]["files"][0])
    report = tmp_path / "report"
    monkeypatch.chdir(folder.parent)
    assert detect.main([video, "--checkpoint", str(out), "--faces", "none", "--frames", "3", "--out", str(report)]) == 0
    with open(report / (os.path.splitext(os.path.basename(video))[0] + ".json")) as f:
        scored = json.load(f)
    assert scored["score"] == pytest.approx(info["test"]["videos"][video]["score"], abs=1e-5)
    monkeypatch.chdir(tmp_path)  # evaluate.py from elsewhere, given the folder another way, finds the same files

    # evaluate.py --videos --part test scores exactly the held-out files
    with pytest.raises(UserError, match="--part needs a detector.pt written by train_detector.py"):
        evaluate.main([gan_run, "--videos", str(folder), "--part", "test"])  # the run has only its raw discriminator
    shutil.copy(out, os.path.join(gan_run, "detector.pt"))
    assert evaluate.main([gan_run, "--videos", str(folder), "--part", "test", "--cache-dir", str(tmp_path / "cache")]) == 0
    with open(os.path.join(gan_run, f"detector-videos-{folder.name}-test.json")) as f:
        evaluated = json.load(f)
    assert sorted(os.path.relpath(f, folder) for f in evaluated["files"]) == sorted(info["split"]["test"]["files"])
    assert evaluated["overall"]["auc"] == pytest.approx(info["test"]["auc"])
    os.remove(os.path.join(gan_run, "detector.pt"))


def test_a_corrupt_video_costs_one_line_and_training_goes_on(tmp_path, gan_run, capsys):
    root = labelled_folder(tmp_path / "data")
    (root / "fake" / "Ann_9.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "det.pt"
    assert train_detector.main([gan_run, "--data", str(root), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY,
                                "--no-gan-fakes", "--init", "random"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "Ann_9.mp4" in line]
    assert len(err) == 1 and "left out" in err[0]
    assert checkpoint.load_detector(str(out))[3]["sources"] == ["labelled", "sbi"]


@pytest.mark.parametrize("make, argv, phrase", [
    (lambda root: os.makedirs(root / "real"), [], "needs two subfolders, real/ and fake/"),
    (lambda root: labelled_folder(root, identities=("Ann", "Bob")), [], "cannot split 2 identities"),
    (lambda root: labelled_folder(root), ["--no-labelled-fakes", "--no-sbi", "--no-gan-fakes"], "every source of fakes is switched off"),
    (lambda root: labelled_folder(root), ["--valid", "0"], "--valid 0 leaves no validation videos"),
    (lambda root: labelled_folder(root), ["--group-by", "("], "argument --group-by: is not a regular expression"),
])
def test_bad_data_gets_one_line(tmp_path, gan_run, capsys, make, argv, phrase):
    make(tmp_path / "data")
    try:
        status = run_cli(train_detector.main, [gan_run, "--data", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "c"), *TINY, *argv])
    except SystemExit as e:  # argparse's own one-line error for a flag it cannot parse
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and phrase in err[0]
    assert not os.path.exists(os.path.join(gan_run, "detector.pt"))


def test_a_run_that_is_not_a_run_folder_gets_one_line(tmp_path, folder, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(train_detector.main, [str(tmp_path / "empty"), "--data", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no checkpoint.pt" in err[0]


def test_pairs_compare_each_fake_with_its_own_real_video():
    scores = {"/d/real/a.mp4": 0.2, "/d/fake/a.mp4": 0.5,   # caught
              "/d/real/b.mp4": 0.6, "/d/fake/b.mp4": 0.4,   # the fake looks more real than its twin
              "/d/real/c.mp4": 0.1, "/d/fake/x.mp4": 0.9,   # no twins
              "/d/real/d.mp4": None, "/d/fake/d.mp4": 0.3}  # no face in the real one: not a pair
    assert metrics.pair_wins(scores, "/d") == (1, 2)
