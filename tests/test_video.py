"""video.py: which frames are sampled, that they are the very frames a plain decode gives, turned upright."""

import argparse
import os
import sys
import types

import av
import numpy as np
import pytest
from PIL import Image

import faces
import video
from helpers import H, W, decode_all, frame_with_face, write_gif, write_phone_photo, write_video
from cli import UserError
from video import all_frames, input_frames, media_kind, open_video, read_image, sample_indices


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


def test_a_16_bit_greyscale_png_keeps_its_shades(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = str(tmp_path / "grey16.png")
    Image.fromarray(ramp).save(path)  # Pillow opens it as mode "I;16"; convert("RGB") clips it to white
    rgb = read_image(path)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2]) and np.abs(rgb[..., 0].astype(int) - ramp / 257).max() <= 0.5
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) == 256


def test_a_very_large_image_gets_our_one_line_and_one_over_twice_the_limit_is_refused(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "big.png")
    Image.new("RGB", (40, 30)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 pixels: over the limit, under twice it
    assert read_image(path).shape == (30, 40, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {path} is a 40x30 image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(UserError, match="over twice Pillow's limit"):
        read_image(path)


def test_a_fifo_a_device_and_a_vanished_file_are_named_as_what_they_are(tmp_path):
    fifo = str(tmp_path / "pipe.mp4")
    os.mkfifo(fifo)
    with pytest.raises(UserError, match=r"^is a FIFO \(named pipe\), not a video or image file$"):
        input_frames(fifo, "video")
    with pytest.raises(UserError, match="^is a character device"):
        input_frames("/dev/null", "video")
    with pytest.raises(UserError, match="^has vanished"):
        input_frames(str(tmp_path / "gone.mp4"), "video")
    os.symlink(str(tmp_path / "nowhere.mp4"), str(tmp_path / "link.mp4"))
    with pytest.raises(UserError, match="^is a link to .*nowhere.mp4, which does not exist"):
        input_frames(str(tmp_path / "link.mp4"), "video")


def test_a_video_removed_after_it_was_probed_is_reported_as_vanished(tmp_path):
    path = write_video(tmp_path / "v.mp4", 6)
    info, frames = open_video(path, 3)  # probed: its frames are counted
    os.remove(path)
    with pytest.raises(UserError, match="^has vanished"):
        list(frames)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_image_is_turned_by_its_exif_orientation_once(tmp_path, orientation):
    upright = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))  # no symmetry to hide a turn
    path = write_phone_photo(tmp_path / "photo.png", upright, orientation)  # PNG: lossless, so the pixels compare exactly
    with Image.open(path) as im:
        assert im.getexif()[0x0112] == orientation and (orientation < 2 or np.asarray(im).tobytes() != upright.tobytes())
    assert np.array_equal(read_image(path), np.asarray(upright))


def test_an_animated_gif_is_a_video_and_a_still_one_an_image(tmp_path):
    clip, still = write_gif(tmp_path / "clip.gif", 10), write_gif(tmp_path / "still.GIF", 1)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a cut short")
    assert [media_kind(p) for p in (clip, still, str(tmp_path / "broken.gif"))] == ["video", "image", "image"]
    with pytest.raises(UserError, match="^cannot be decoded as an image"):  # so a broken GIF is said as an image that is
        read_image(str(tmp_path / "broken.gif"))
    reference = []
    with Image.open(clip) as im:  # Pillow's own frames, each composed over the ones before as a viewer shows them
        for i in range(im.n_frames):
            im.seek(i)
            reference.append(np.asarray(im.convert("RGB")))
    info, frames = input_frames(clip, "video", frames=4)
    got = list(frames)
    assert (info["frames_total"], info["frames_sampled"], info["fps"]) == (10, 4, 10.0)
    assert [i for i, _, _ in got] == sample_indices(10, 4)
    for i, seconds, frame in got:
        assert np.array_equal(frame, reference[i]) and seconds == pytest.approx(i / 10)


@pytest.fixture
def heif_state():
    """heif_readable answers once per process: forget the answer before and after a test that changes what it finds."""
    video.heif_readable.cache_clear()
    yield
    video.heif_readable.cache_clear()


def test_an_heic_photo_without_pillow_heif_names_the_package(tmp_path, monkeypatch, heif_state):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as where it is not installed: importing it fails
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic")
    assert media_kind(str(path)) == "image"
    with pytest.raises(UserError, match=r"^is an HEIC/HEIF photo .*: pip install pillow-heif$"):
        read_image(str(path))


def test_pillow_heif_where_installed_is_registered_with_pillow_once(monkeypatch, heif_state):
    calls = []
    monkeypatch.setitem(sys.modules, "pillow_heif", types.SimpleNamespace(register_heif_opener=lambda: calls.append(1)))
    assert video.heif_readable() and video.heif_readable() and calls == [1]
