"""The faces in a frame, and crops framed the way CelebA frames a face.

detect.py scores these crops, train_detector.py trains on them and --extract writes them
out, all through the same functions, so a crop saved for training is the crop that would
have been scored.
"""

import os

import cv2
from PIL import Image

from cli import UserError

# The square crop around a Haar box: 1.7 box widths on a side, its centre 0.14 box widths
# above the box's. That is how img_align_celeba frames a face once the DCGAN preprocessing
# has taken its centre square (measured with this cascade on CelebA: the median side is
# 1.71 box widths, the box centre 0.14 below the crop centre), so a crop from a video
# looks to the model like the images it was trained on.
CROP_SCALE = 1.7
CROP_SHIFT = 0.14


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


# -----------------------------------------------------------------------------
# the face flags that detect.py and train_detector.py share, so both find the same faces

def add_flags(group, at_least):
    group.add_argument("--faces", choices=("haar", "none"), default="haar",
                       help="haar: find faces with OpenCV's cascade; none: score the centre crop (for inputs that are already face crops)")
    group.add_argument("--max-faces", type=at_least(1), default=1,
                       help="score at most this many faces per frame, the largest; raise it for several people, but then the "
                            "cascade's false positives (face-sized textures) are scored too, and a frame takes its highest score")
    group.add_argument("--detect-size", type=at_least(64), default=320,
                       help="look for faces on a copy of the frame whose longer side is this many pixels: larger finds smaller faces, slower")


def from_flags(args):
    """The finder the flags ask for (None for --faces none) and a description of it, for cache keys and reports."""
    settings = {"faces": args.faces, "max_faces": args.max_faces, "detect_size": args.detect_size}
    finder = None if args.faces == "none" else FaceFinder(detect_size=args.detect_size, max_faces=args.max_faces)
    return finder, settings
