"""video.py: which frames are sampled, that they are the very frames a plain decode gives, turned upright."""

import argparse
import av
import numpy as np
import pytest

import faces
from helpers import H, W, decode_all, frame_with_face, write_video
from video import all_frames, open_video, sample_indices


def test_sample_indices():
    assert sample_indices(100, 5) == [0, 25, 50, 74, 99]  # evenly spread, first and last included
    assert sample_indices(33, 32) == sorted(set(sample_indices(33, 32)))  # never a frame twice
    assert len(sample_indices(33, 32)) == 32
    assert sample_indices(3, 32) == [0, 1, 2]
    assert sample_indices(10, 32, every=4) == [0, 4, 8]


@pytest.mark.parametrize("name, codec", [("v.mp4", "libx264"), ("v.mkv", "libx264"), ("v.webm", "libvpx-vp9"), ("v.avi", "mpeg4")])
def test_sampled_frames_equal_a_plain_decode(tmp_path, name, codec):
    # the decoder skips unsampled non-reference frames: what it returns must be the very frames a full decode gives
    video = write_video(tmp_path / name, 40, codec=codec)
    reference = decode_all(video)
    info, frames = open_video(video, frames=7)
    got = list(frames)
    assert info["frames_total"] == len(reference) == 40
    assert [i for i, _, _ in got] == sample_indices(40, 7)
    for i, seconds, frame in got:
        assert np.array_equal(frame, reference[i])
        assert seconds == pytest.approx(i / 10)


def test_a_face_in_a_rotated_video_is_found(tmp_path):
    # a phone's portrait video: the pixels stored on their side, the turn in the display matrix
    sideways = lambda i: np.ascontiguousarray(np.rot90(frame_with_face(i), -1))  # turned clockwise, shown turned back
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = H, W, "yuv420p"
        stream.set_display_rotation(90)  # counter-clockwise, as PyAV and FFmpeg count it
        for i in range(4):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(sideways(i), format="rgb24")))
        out.mux(stream.encode())
    finder, _ = faces.from_flags(argparse.Namespace(faces="auto", max_faces=1, detect_size=320))
    assert finder(decode_all(path)[0]) == [], "the face on its side is not found: the test would pass without turning"
    _, frames = open_video(str(path), frames=4)
    for i, _, frame in frames:
        assert frame.shape == (H, W, 3)
        assert len(finder(frame)) == 1
        error = lambda target: np.abs(frame.astype(int) - target).mean()
        assert error(frame_with_face(i)) < 10 < error(np.rot90(frame_with_face(i), 2))  # upright, not upside down
    _, every = all_frames(str(path))  # what detect.py --annotate draws on
    assert [f.shape for _, _, f in every] == [(H, W, 3)] * 4


def test_all_frames_are_every_frame_upright_in_order_at_the_videos_rate(tmp_path):
    path = write_video(tmp_path / "v.mp4", 9, rate=12)
    rate, frames = all_frames(path)
    frames = list(frames)
    assert rate == 12
    assert [i for i, _, _ in frames] == list(range(9))
    assert [s for _, s, _ in frames] == pytest.approx([i / 12 for i in range(9)])
    assert all(np.array_equal(f, ref) for (_, _, f), ref in zip(frames, decode_all(path)))
