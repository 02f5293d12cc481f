"""Plain helpers shared by the tests: tiny images, videos and training runs, and reading a subprocess with a deadline.

Fixtures live in conftest.py; no test module imports another.
"""

import os
import random
import select
import subprocess
import sys
import time

import av
import numpy as np
from PIL import Image

import data


def write_jpegs(folder, names, size=(40, 48), seed=0):
    """Small JPEGs with distinct contents; returns their paths."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        path = os.path.join(folder, name)
        im.save(path, quality=90)
        paths.append(path)
    return paths


def make_images(folder, n, seed=0, broken=()):
    """n small JPEGs and PNGs of assorted shapes (so resize and crop both matter); names in `broken` get garbage bytes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(33, 70)), int(rng.integers(33, 70))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"), quality=90)
    for name in broken:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(b"not an image at all")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_program(script, *args):
    """One of the programs in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=120)


def assert_one_clear_line(result, *phrases):
    """A user's mistake: exit status 2 and one line on stderr that starts with "error: " and holds every phrase."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def train_args(logdir, *extra):
    """A tiny, fast training run on drawn faces."""
    return ["--dataset", "synthetic", "--synthetic-size", "64", "--batch", "16", "--image-size", "32",
            "--ngf", "8", "--ndf", "8", "--nz", "16", "--workers", "0", "--log-every", "1", "--detector-steps", "0",
            "--logdir", str(logdir), *extra]


# The finders find some drawings and miss others (dark skin tones, long fringes); these are found by every backend,
# which test_faces.py's test_each_backend_finds_the_drawn_face says plainly if a new version stops finding them.
FACE_SEED = 1  # a drawing every finder finds in every frame below
W, H = 160, 120


def frame_with_face(i, width=W, height=H):
    """A light background with a drawn face, moving one pixel a frame so that frames differ."""
    im = Image.new("RGB", (width, height), (200, 200, 200))
    im.paste(data.draw_face(random.Random(FACE_SEED), 96), (30 + i, 12))
    return np.asarray(im)


def blank_frame(i):
    return np.full((H, W, 3), 60 + i, dtype=np.uint8)


def two_faces(i):
    """Two different drawn faces side by side, both found by the cascade."""
    im = Image.new("RGB", (2 * W, H), (200, 200, 200))
    im.paste(data.draw_face(random.Random(FACE_SEED), 96), (30 + i, 12))
    im.paste(data.draw_face(random.Random(5), 96), (W + 30, 12))
    return np.asarray(im)


def write_video(path, n, draw=frame_with_face, rate=10, codec="libx264"):
    """An n-frame video of draw(i); libx264 puts B-frames in, as in real files."""
    height, width = draw(0).shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(n):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(draw(i), format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def write_gif(path, n, draw=frame_with_face, ms=100):
    """An n-frame GIF of draw(i), as short clips travel in chats (n=1: a still GIF); Pillow stores only what changed."""
    frames = [Image.fromarray(draw(i)) for i in range(n)]
    frames[0].save(str(path), save_all=n > 1, append_images=frames[1:], duration=ms, loop=0)
    return str(path)


def write_phone_photo(path, upright, orientation=6, **save):
    """upright (a PIL image) stored as a phone stores it: the pixels turned as the sensor saw them, and the EXIF orientation
    that turns them back for display (6: turn 90 degrees clockwise, what a phone held upright writes)."""
    stored = upright.transpose(STORED_AS[orientation]) if orientation in STORED_AS else upright
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    stored.save(str(path), exif=exif, **save)
    return str(path)


# orientation -> the turn that makes the stored pixels of an upright picture (the inverse of the one that shows them)
T = Image.Transpose
STORED_AS = {2: T.FLIP_LEFT_RIGHT, 3: T.ROTATE_180, 4: T.FLIP_TOP_BOTTOM, 5: T.TRANSPOSE, 6: T.ROTATE_90, 7: T.TRANSVERSE,
             8: T.ROTATE_270}


def decode_all(path):
    """Every frame of a video, decoded plainly by PyAV, as stored (no turn)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def read_until(proc, done, timeout):
    """A subprocess's stderr (opened as a binary pipe) until done(text so far) is true; fails after `timeout` seconds
    or when the process ends first, instead of waiting forever on a program that hangs."""
    seen, deadline = "", time.monotonic() + timeout
    while not done(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"gave up after {timeout} s waiting on the program; it printed:\n{seen[-2000:]}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)  # unbuffered: select() sees only what the pipe holds
            assert chunk, f"the program ended (status {proc.wait()}) before it got there; it printed:\n{seen[-2000:]}"
            seen += chunk.decode(errors="replace")
    return seen
