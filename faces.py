"""Frames from videos and images, the faces in them, and crops framed the way CelebA frames a face.

detect.py scores these crops and writes them out with --extract, through the same
functions, so a crop saved for training is the crop that would have been scored.
"""

import os

import av
import cv2
import numpy as np
from PIL import Image

from data import IMAGE_EXTENSIONS
from errors import UserError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")

# The square crop around a Haar box: 1.7 box widths on a side, its centre 0.14 box widths
# above the box's. That is how img_align_celeba frames a face once the DCGAN preprocessing
# has taken its centre square (measured with this cascade on CelebA: the median side is
# 1.71 box widths, the box centre 0.14 below the crop centre), so a crop from a video
# looks to the model like the images it was trained on.
CROP_SCALE = 1.7
CROP_SHIFT = 0.14


def media_kind(path):
    """'video', 'image' or None, from the file name."""
    ext = os.path.splitext(path)[1].lower()
    return "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None


# -----------------------------------------------------------------------------
# frames

def sample_indices(n, frames=32, every=None):
    """Which of n frames to look at: every `every`-th, or `frames` spread evenly from first to last."""
    if every is not None:
        return list(range(0, n, every))
    if n <= frames:
        return list(range(n))
    # the spacing is at least one frame, so rounding never picks a frame twice
    return np.linspace(0, n - 1, frames).round().astype(int).tolist()


def _ffmpeg_message(e):
    return getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)


def _open(path):
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        raise UserError(f"cannot be decoded as a video ({_ffmpeg_message(e)}); it may be truncated or not a video") from None
    if not container.streams.video:
        container.close()
        raise UserError("holds no video stream")
    return container


def open_video(path, frames=32, every=None):
    """Probe a video and choose its frames -> (info dict, iterator of (index, seconds, RGB array)).

    The frames are decoded in one sequential pass; no seeking, which would decode from the
    previous keyframe for every sampled frame. Frames that are not sampled and that no other
    frame refers to (H.264's B-frames, mostly) are skipped by the decoder: a third less
    decoding work on the 720p benchmark video.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        # Demuxing without decoding is cheap: it counts the frames exactly, where the
        # container's own count (stream.frames) is often missing (webm, mkv) or approximate.
        try:
            pts = [p.pts for p in container.demux(stream) if p.size]
        except av.FFmpegError as e:
            raise UserError(f"cannot be read ({_ffmpeg_message(e)}); it may be truncated") from None
        info = {"width": stream.width, "height": stream.height,
                "fps": float(stream.average_rate or stream.guessed_rate or 0), "frames_total": len(pts), "decode_errors": 0}
    if not pts:
        raise UserError("holds no frames (an empty video)")
    indices = sample_indices(len(pts), frames, every)
    info["frames_sampled"] = len(indices)
    if any(p is None for p in pts):  # no timestamps: count decoded frames instead and decode them all
        return info, _decode_by_order(path, set(indices))
    order = sorted(pts)  # decode order -> presentation order
    wanted = {order[i]: i for i in indices}
    return info, _decode_by_pts(path, wanted, info)


def _decode_by_pts(path, wanted, info):
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        ctx = stream.codec_context
        left = len(wanted)
        for packet in container.demux(stream):
            ctx.skip_frame = "DEFAULT" if packet.pts is None or packet.pts in wanted else "NONREF"
            try:
                decoded = packet.decode()
            except av.FFmpegError:  # one corrupt packet costs its frames, not the video
                info["decode_errors"] += 1
                continue
            for frame in decoded:
                if frame.pts in wanted:
                    yield wanted[frame.pts], float(frame.time or 0.0), frame.to_ndarray(format="rgb24")
                    left -= 1
            if left == 0:
                return


def _decode_by_order(path, wanted):
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        i = 0
        try:
            for frame in container.decode(stream):
                if i in wanted:
                    yield i, float(frame.time or 0.0), frame.to_ndarray(format="rgb24")
                i += 1
        except av.FFmpegError as e:
            raise UserError(f"stopped decoding at frame {i} ({_ffmpeg_message(e)})") from None


def read_image(path):
    """An image file as an RGB array."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # truncated, not an image, unreadable: the user's to fix
        raise UserError(f"cannot be decoded as an image ({type(e).__name__})") from None


# -----------------------------------------------------------------------------
# faces

class FaceFinder:
    """OpenCV's frontal-face Haar cascade, run on a downscaled copy of the frame."""

    def __init__(self, *, detect_size=320, max_faces=1, min_neighbors=5):
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise UserError(f"OpenCV {cv2.__version__} has no Haar cascades (version 5 dropped them); "
                            "install 'opencv-python-headless<5', or pass --faces none for inputs that are already face crops")
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise UserError(f"OpenCV's face cascade {path} is missing; install opencv-python-headless<5 (version 5 ships no cascades)")
        self.detect_size = detect_size
        self.max_faces = max_faces
        self.min_neighbors = min_neighbors

    def __call__(self, frame):
        """RGB array -> face boxes (x, y, w, h) in frame pixels, largest first."""
        h, w = frame.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))  # the cascade's cost grows with the pixels it scans
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if scale < 1:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        # 24 px is the cascade's own window: the smallest face it can see at this scale
        boxes = self.cascade.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=self.min_neighbors, minSize=(24, 24))
        boxes = sorted((tuple(int(round(v / scale)) for v in b) for b in boxes), key=lambda b: -b[2] * b[3])
        return boxes[:self.max_faces]


def crop_square(box, width, height):
    """A Haar box -> the square (x0, y0, side) that frames it like CelebA, moved inside the frame."""
    x, y, w, h = box
    side = min(round(w * CROP_SCALE), width, height)
    x0 = round(x + w / 2 - side / 2)
    y0 = round(y + h / 2 - CROP_SHIFT * w - side / 2)
    # moving the square in, rather than padding it, keeps the model away from borders it never saw
    return min(max(x0, 0), width - side), min(max(y0, 0), height - side), side


def centre_square(width, height):
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def face_crops(frame, finder):
    """RGB frame -> [(face box, crop square, crop as a PIL image)]; finder None takes the whole frame.

    With finder None (--faces none) the image goes to the model whole, through the same
    resize-and-centre-crop as training, so an input that is already a face crop is scored
    exactly as a training image would be.
    """
    height, width = frame.shape[:2]
    if finder is None:
        x0, y0, side = centre_square(width, height)
        return [((x0, y0, side, side), (x0, y0, side), Image.fromarray(frame))]
    crops = []
    for box in finder(frame):
        x0, y0, side = crop_square(box, width, height)
        crops.append((box, (x0, y0, side), Image.fromarray(frame[y0:y0 + side, x0:x0 + side])))
    return crops
