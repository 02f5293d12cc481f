"""Videos and images as frames: finding them in folders, opening them, choosing which frames to look at, decoding them in one pass.

Light on purpose (no torch): detect.py's worker processes decode with it and never load torch.
"""

import functools
import os
import stat
import sys
import warnings
from fractions import Fraction

import av
import numpy as np
from PIL import Image, ImageOps

from cli import UserError

HEIF_EXTENSIONS = (".heic", ".heif")  # iPhone photos: Pillow reads them through the optional pillow-heif package
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp") + HEIF_EXTENSIONS
ANIMATED_EXTENSIONS = (".gif",)  # a video when animated (how short clips travel in chats), an image when it holds one frame
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm") + ANIMATED_EXTENSIONS
NO_HEIF = "is an HEIC/HEIF photo (an iPhone's), which is read only with the pillow-heif package: pip install pillow-heif"


def endings(extensions):
    """('.mp4', '.avi') -> 'mp4, avi', as messages list them."""
    return ", ".join(e[1:] for e in extensions)


def media_kind(path):
    """'video', 'image' or None, from the file name's ending (as data.list_images matches it, so '.mp4' is a video too);
    a GIF is a video when it is animated and an image when it holds one frame."""
    name = os.path.basename(path).lower()
    if name.endswith(ANIMATED_EXTENSIONS):
        return "video" if animated(path) else "image"
    return "video" if name.endswith(VIDEO_EXTENSIONS) else "image" if name.endswith(IMAGE_EXTENSIONS) else None


def animated(path):
    """Whether an image file holds more than one frame: Pillow reads only the headers. False for a file it cannot open
    (reading it as an image then says why) and for anything but a regular file, which could block or never end."""
    if not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except Exception:
        return False


@functools.cache
def heif_readable():
    """Register pillow-heif's reader with Pillow, once; False where the package is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def walk_files(root, extensions):
    """Every file below root whose name ends in one of extensions, recursively, in a fixed order, one at a time.

    A generator, so a folder of a million videos is never held as a list: memory stays flat
    however many there are. Links are followed, but no real folder is entered twice: a link back
    up the tree would otherwise list the same files again and again (and two such links never
    end), and the copies would land in train, valid and test alike.
    """
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # the same folder reached again through a link
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(extensions):
                yield os.path.join(dirpath, f)


def open_rgb(path):
    """An image file -> its pixels as an RGB PIL image.

    16-bit greyscale (PNG's "I;16", or "I" in some Pillow versions) is scaled to 8 bits:
    Pillow's convert clips every value above 255, which turns such an image white. An image
    above Pillow's decompression-bomb limit is named in one warning line with its size instead
    of Pillow's two-line warning; one above twice the limit raises PIL.Image.DecompressionBombError.
    A phone stores the sensor's pixels and, in EXIF, which way is up: the image is turned that way,
    here and nowhere else, since a face on its side is missed or scored as another face. An HEIC/HEIF
    photo without pillow-heif installed is a UserError that names the package.
    """
    if os.fspath(path).lower().endswith(HEIF_EXTENSIONS) and not heif_readable():
        raise UserError(NO_HEIF)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # said below, in one line; others pass
        warnings.filterwarnings("ignore", message="Corrupt EXIF data")  # then the pixels stay as stored: nothing to act on
        with Image.open(path) as im:
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                print(f"warning: {path} is a {im.width}x{im.height} image ({im.width * im.height / 1e6:.0f} megapixels, "
                      f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f}); decoding it takes about "
                      f"{im.width * im.height * 3 / 1e9:.1f} GB of memory", file=sys.stderr)
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257  # 65535 -> 255
                return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
            return im.convert("RGB")



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


def upright(frame):
    """A decoded av.VideoFrame -> its RGB array turned the way the video is meant to be shown.

    Phones store a portrait video as landscape pixels plus a display rotation; a face lying on
    its side is invisible to the face finders. PyAV gives that rotation per frame, in degrees
    counter-clockwise (an older PyAV without frame.rotation leaves frames as stored), and np.rot90 turns
    counter-clockwise for positive k.
    """
    rgb = frame.to_ndarray(format="rgb24")
    k = round(getattr(frame, "rotation", 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _ffmpeg_message(e):
    return getattr(e, "strerror", None) or (str(e).splitlines()[0] if str(e) else type(e).__name__)


def _open(path):
    try:
        container = av.open(path)
    except av.FFmpegError as e:
        if not os.path.exists(path):  # listed and probed, then gone before its frames were decoded
            raise UserError(VANISHED) from None
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
                    yield wanted[frame.pts], float(frame.time or 0.0), upright(frame)
                    left -= 1
            if left == 0:
                return


def _decode_by_order(path, wanted=None):
    """Decode in order, counting frames; yield those in wanted (every frame when None)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        i = 0
        try:
            for frame in container.decode(stream):
                if wanted is None or i in wanted:
                    yield i, float(frame.time or 0.0), upright(frame)
                i += 1
        except av.FFmpegError as e:
            raise UserError(f"stopped decoding at frame {i} ({_ffmpeg_message(e)})") from None


def all_frames(path):
    """Every frame of a video, in order -> (its frame rate, iterator of (index, seconds, upright RGB array)).

    For a copy of the whole video (detect.py --annotate); scoring samples frames with open_video.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    return rate, _decode_by_order(path)


def reencode(path, f, crf=28, scale=1.0):
    """The video at path, every frame upright, into the file f as H.264 at this CRF and scale (sides rounded to even):
    what a platform or a messenger does to a video on its way to a user, for evaluate.py --robustness."""
    rate, frames = all_frames(path)
    with av.open(f, "w", format="mp4") as out:
        enc = None
        for i, _, image in frames:
            if enc is None:
                enc = out.add_stream("libx264", rate=rate)
                enc.width, enc.height = (max(2, round(side * scale / 2) * 2) for side in (image.shape[1], image.shape[0]))
                enc.pix_fmt = "yuv420p"
                enc.options = {"crf": str(crf), "preset": "medium"}  # x264's default preset, as an upload would get
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if (frame.width, frame.height) != (enc.width, enc.height):
                frame = frame.reformat(width=enc.width, height=enc.height, interpolation="AREA")
            frame.pts, frame.time_base = i, Fraction(1) / rate
            out.mux(enc.encode(frame))
        if enc is not None:
            out.mux(enc.encode())


def read_image(path):
    """An image file as an RGB array (16-bit greyscale scaled to 8 bits, a very large image named in one warning)."""
    try:
        return np.asarray(open_rgb(path))
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"is over twice Pillow's limit of {Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels for one image "
                        "(a decompression bomb, or a photo far larger than a face needs); scale it down") from None
    except Exception as e:  # truncated, not an image, unreadable: the user's to fix
        raise UserError(f"cannot be decoded as an image ({type(e).__name__})") from None


VANISHED = "has vanished (moved or deleted while the program ran)"
SPECIAL_FILES = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                 stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}


def check_input(path):
    """os.stat of an input that is a regular file with bytes in it; else one sentence saying what it is instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"is a link to {os.readlink(path)}, which does not exist") from None
        raise UserError(VANISHED) from None
    except OSError as e:
        raise UserError(f"cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device has no size and would block or never end when read
        raise UserError(f"is {SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), 'not a regular file')}, not a video or image file")
    if st.st_size == 0:
        raise UserError("is an empty file (0 bytes)")
    return st


def input_frames(path, kind, frames=32, every=None):
    """-> (info, iterator of (index, seconds, RGB frame)); raises UserError for an input that cannot be read."""
    check_input(path)
    if kind == "image":
        frame = read_image(path)
        info = {"width": frame.shape[1], "height": frame.shape[0], "fps": 0.0, "frames_total": 1, "frames_sampled": 1, "decode_errors": 0}
        return info, iter([(0, 0.0, frame)])
    return open_video(path, frames, every)
