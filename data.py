"""Where the training images come from: CelebA, any folder of images, or drawn faces.

Every source yields (image, ok) pairs: the image is a float tensor in [-1, 1] of shape
(channels, size, size), preprocessed like the DCGAN tutorial (resize the shorter side,
centre crop); `ok` is False for a file that could not be decoded, whose image is zeros.
The training loop drops those and names them, so one bad JPEG never stops an epoch.
"""

import csv
import os
import random
import re
import sys
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms
from tqdm import tqdm

from cli import UserError
from video import HEIF_EXTENSIONS, IMAGE_EXTENSIONS, endings, heif_readable, open_rgb, walk_files  # noqa: F401 (IMAGE_EXTENSIONS: data's too)

SPLITS = ("train", "valid", "test")  # CelebA's partition numbers 0, 1, 2
CELEBA_HELP = """\
CelebA is the 202,599 aligned face photos of img_align_celeba. Get it from
  - the official page: https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive / Baidu links)
  - Kaggle: https://www.kaggle.com/datasets/jessicali9530/celeba-dataset
    (kaggle datasets download -d jessicali9530/celeba-dataset; unzip it into --data-root)
  - or try torchvision's own download with --download (it often fails on Google Drive's quota)
and put it in one of these layouts under --data-root:
  torchvision: ROOT/celeba/img_align_celeba/*.jpg and ROOT/celeba/list_eval_partition.txt
  Kaggle:      ROOT/img_align_celeba/img_align_celeba/*.jpg and ROOT/list_eval_partition.csv
  plain:       ROOT/*.jpg or ROOT/img_align_celeba/*.jpg (split by a fixed hash of the file name)
To try everything now without CelebA: --dataset synthetic (drawn demo faces)."""


def resize_crop(image_size):
    """PIL image -> PIL image of image_size x image_size: the geometric half of preprocess, which the cache stores."""
    return transforms.Compose([
        transforms.Resize(image_size),  # the shorter side
        transforms.CenterCrop(image_size),
    ])


def preprocess(image_size):
    """PIL image -> tensor in [-1, 1], as in the PyTorch DCGAN tutorial."""
    return transforms.Compose([
        resize_crop(image_size),
        transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])


def normalize_uint8(images):
    """uint8 images (N, H, W, C), a tensor on any device or a numpy array -> float tensor (N, C, H, W) in [-1, 1].

    The arithmetic is ToTensor's and Normalize's, op for op (each correctly rounded in float32),
    so the result equals preprocess's bit for bit. It runs on the contiguous HWC storage; the
    final permute to NCHW is a view whose memory is already channels-last. A numpy array is
    converted by numpy, in one thread: on a CPU that trains, torch's OpenMP threads would
    wait on cores the training step is using (docs/speed.md, "A note on shared CPUs").
    """
    if isinstance(images, np.ndarray):
        x = images.astype(np.float32)
        x /= 255
        x -= 0.5
        x /= 0.5
        return torch.from_numpy(x).permute(0, 3, 1, 2)
    return images.float().div_(255).sub_(0.5).div_(0.5).permute(0, 3, 1, 2)


def to_uint8(images):
    """[-1, 1] floats -> 8-bit pixels, as every image in a file or a video frame is."""
    return ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def to_float(pixels):
    return pixels.float() / 127.5 - 1


def quantize(images):
    """Round to 8 bits. Real images come from 8-bit files and fakes would not: without this a
    detector could learn the rounding instead of the faces."""
    return to_float(to_uint8(images))


def hash_split(name):
    """A split that depends on the file name alone: 80% train, 10% valid, 10% test.

    Adding or removing other files never moves a file to another split, and every run
    (and every machine) agrees.
    """
    bucket = zlib.crc32(name.replace(os.sep, "/").encode()) % 100
    return "train" if bucket < 80 else "valid" if bucket < 90 else "test"


# -----------------------------------------------------------------------------
# files on disk

class ImageFiles(Dataset):
    """A list of image files, decoded and preprocessed on every access."""

    def __init__(self, files, image_size):
        self.files = files
        self.image_size = image_size
        self.transform = preprocess(image_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.transform(open_rgb(self.files[i])), True
        except Exception:  # truncated, not an image, unreadable: skipped and counted by the loop
            return torch.zeros(3, self.image_size, self.image_size), False


def list_images(root, extensions=IMAGE_EXTENSIONS):
    """Every file below root whose name ends in one of extensions (images by default), in walk_files' fixed order."""
    return list(walk_files(root, extensions))


def _read_partition(path):
    """list_eval_partition.txt ("000001.jpg 0") or .csv ("image_id,partition") -> {name: split}."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            rows = [(r["image_id"], r["partition"]) for r in csv.DictReader(f)]
        else:
            rows = [line.split() for line in f if line.strip()]
    return {name: SPLITS[int(p)] for name, p in rows}


def find_celeba(root):
    """Find CelebA under root in any known layout -> (image folder, {name: split} or None)."""
    layouts = [  # (image folder, partition file), most specific first
        (os.path.join(root, "celeba", "img_align_celeba"), os.path.join(root, "celeba", "list_eval_partition.txt")),
        (os.path.join(root, "img_align_celeba", "img_align_celeba"), os.path.join(root, "list_eval_partition.csv")),
        (os.path.join(root, "img_align_celeba"), os.path.join(root, "list_eval_partition.txt")),
        (os.path.join(root, "img_align_celeba"), os.path.join(root, "list_eval_partition.csv")),
        (root, os.path.join(root, "list_eval_partition.txt")),
        (root, os.path.join(root, "list_eval_partition.csv")),
    ]
    for folder, partition in layouts:
        if os.path.isdir(folder) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in os.listdir(folder)):
            return folder, (_read_partition(partition) if os.path.isfile(partition) else None)
    raise UserError(f"no CelebA images found under {os.path.abspath(root)} (looked for "
                    + ", ".join(os.path.relpath(f, root) for f in dict.fromkeys(f for f, _ in layouts))
                    + f").\n{CELEBA_HELP}")


def celeba_files(root, split):
    """The image files of one CelebA split, by the official partition when it is there."""
    folder, partition = find_celeba(root)
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if partition is None:
        chosen = [n for n in names if hash_split(n) == split]
    else:
        chosen = [n for n in names if partition.get(n) == split]
    return [os.path.join(folder, n) for n in chosen]


def folder_files(root, split):
    if not os.path.isdir(root):
        raise UserError(f"--data-root {root} is not a folder; point it at a folder of images ({endings(IMAGE_EXTENSIONS)}; searched recursively)")
    files = list_images(root)
    if not files:
        raise UserError(f"no images ({endings(IMAGE_EXTENSIONS)}) found under {root}; point --data-root at a folder that holds some")
    return [f for f in readable(files, root) if hash_split(os.path.relpath(f, root)) == split]


_said = set()  # the folders whose HEIC photos were said to be left out: once, not once per split


def readable(files, root):
    """files less the HEIC/HEIF photos where pillow-heif is not installed, said in one line: each would otherwise be
    skipped as undecodable, and nothing would say which package reads them."""
    heif = [f for f in files if f.lower().endswith(HEIF_EXTENSIONS)]
    if not heif or heif_readable():
        return files
    if root not in _said:
        _said.add(root)
        print(f"warning: {len(heif)} HEIC/HEIF photos under {root} are left out: reading them needs the pillow-heif package "
              "(pip install pillow-heif)", file=sys.stderr)
    return [f for f in files if not f.lower().endswith(HEIF_EXTENSIONS)]


def download_celeba(root):
    """torchvision's own CelebA download; explain what to do when Google Drive refuses."""
    from torchvision.datasets import CelebA
    try:
        CelebA(root, split="all", download=True)
    except Exception as e:
        raise UserError(f"the CelebA download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        "Google Drive often refuses it on quota. Download it by hand instead:\n" + CELEBA_HELP) from None


# -----------------------------------------------------------------------------
# drawn faces: a seeded demo set that needs no download

def draw_face(rng, size=128):
    """A cartoon face on a plain background, every detail drawn from rng (a random.Random)."""
    def colour(lo, hi):
        return tuple(rng.randint(lo, hi) for _ in range(3))

    skin = rng.choice([(241, 194, 167), (224, 172, 138), (198, 134, 94), (141, 85, 54), (255, 219, 190)])
    skin = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in skin)
    hair = rng.choice([(30, 20, 15), (90, 60, 30), (200, 160, 90), (120, 40, 20), (60, 60, 60)])
    im = Image.new("RGB", (size, size), colour(40, 230))
    d = ImageDraw.Draw(im)
    s = size / 128  # everything below is laid out on a 128-pixel canvas
    cx, cy = 64 + rng.uniform(-5, 5), 68 + rng.uniform(-5, 5)
    w, h = rng.uniform(30, 38), rng.uniform(40, 48)  # half-width and half-height of the face

    def ellipse(x0, y0, x1, y1, fill):
        d.ellipse([x0 * s, y0 * s, x1 * s, y1 * s], fill=fill)

    ellipse(cx - w - 6, cy - h - 8, cx + w + 6, cy + h * rng.uniform(0.2, 0.9), hair)  # hair behind the head
    d.rectangle([(cx - w / 2.5) * s, (cy + h * 0.6) * s, (cx + w / 2.5) * s, size], fill=skin)  # neck
    d.rectangle([0, (cy + h + 4) * s, size, size], fill=colour(20, 200))  # shoulders
    ellipse(cx - w, cy - h, cx + w, cy + h, skin)
    ellipse(cx - w, cy - h, cx + w, cy - h * rng.uniform(0.3, 0.6), hair)  # fringe
    eye_y, eye_dx, iris = cy - h * 0.15, w * rng.uniform(0.35, 0.45), colour(20, 120)
    for side in (-1, 1):
        ex = cx + side * eye_dx
        ellipse(ex - 7, eye_y - 4, ex + 7, eye_y + 4, (245, 245, 245))
        ellipse(ex - 3.5, eye_y - 3.5, ex + 3.5, eye_y + 3.5, iris)
        d.line([(ex - 8) * s, (eye_y - 9) * s, (ex + 8) * s, (eye_y - 10 + rng.uniform(-2, 2)) * s], fill=hair, width=max(1, round(3 * s)))
    shade = tuple(int(c * 0.8) for c in skin)
    d.line([cx * s, (eye_y + 4) * s, (cx - 3) * s, (cy + h * 0.25) * s, (cx + 2) * s, (cy + h * 0.28) * s], fill=shade, width=max(1, round(2 * s)))
    mouth_y, mouth_w = cy + h * 0.5, w * rng.uniform(0.3, 0.5)
    d.chord([(cx - mouth_w) * s, (mouth_y - 6) * s, (cx + mouth_w) * s, (mouth_y + rng.uniform(2, 8)) * s], 0, 180, fill=(150, 50, 60))
    return im.filter(ImageFilter.GaussianBlur(0.6 * s))


class SyntheticFaces(Dataset):
    """Drawn cartoon faces, image i always the same for a given seed: a demo set, not CelebA."""

    def __init__(self, n, image_size, seed=0):
        self.n, self.seed = n, seed
        self.transform = preprocess(image_size)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.transform(draw_face(random.Random(self.seed * 1_000_003 + i))), True


SYNTHETIC_SEEDS = {"train": 0, "valid": 1, "test": 2}  # disjoint draws per split


def build_dataset(dataset, root, split, image_size, synthetic_size=10_000):
    """The images of one split of a source (celeba | folder | synthetic)."""
    if dataset == "synthetic":
        n = synthetic_size if split == "train" else max(1, synthetic_size // 10)
        return SyntheticFaces(n, image_size, seed=SYNTHETIC_SEEDS[split])
    files = celeba_files(root, split) if dataset == "celeba" else folder_files(root, split)
    if not files:
        raise UserError(f"the {split} split of {root} is empty; it needs more images (the hash split sends about 80% to train, 10% each to valid and test)")
    return ImageFiles(files, image_size)


# -----------------------------------------------------------------------------
# loading a split into memory, and endless random batches

def load_images(dataset, n, seed=0, workers=0):
    """Up to n decodable images of a dataset, a fixed random subset -> (n, C, S, S) tensor in [-1, 1]."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    loader = DataLoader(dataset, batch_size=128, sampler=order, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))  # iterating must not draw from the global RNG (the training noise)
    return torch.cat([x[ok] for x, ok in loader])


def endless(dataset, batch, workers, seed=0, at_least=1):
    """Random batches forever (sampling with replacement), the undecodable items dropped: (tensor, ...) per batch.

    The dataset yields (..., ok); a batch is passed over when fewer than at_least items decode.
    """
    sampler = RandomSampler(dataset, replacement=True, num_samples=1 << 30, generator=torch.Generator().manual_seed(seed))
    for *tensors, ok in DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True):
        if ok.sum() >= at_least:
            yield tuple(t[ok] for t in tensors)



def epoch_order(n, seed, epoch):
    """The data order of an epoch: a permutation fixed by seed and epoch, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


# -----------------------------------------------------------------------------
# labelled videos for the detector: DIR/real/** and DIR/fake/**, split by identity

LABELS = {"real": 0, "fake": 1}  # detector labels: 1 = fake, as P(fake) counts it
DEFAULT_GROUP = r"^(.*?)(?:_\d+)*$"  # the file stem without trailing _N: Keanu_Reeves_0 and _1 are one identity


def labelled_media(root, extensions, group_by=DEFAULT_GROUP, loose=False):
    """A labelled data folder -> [(path, label 1 = fake, groups)]: the one reader of real/ and fake/ folders.

    DIR/real/** and DIR/fake/** hold videos and/or face images (files with other endings are
    passed over). The groups say which files must stay in one part of a split: from DIR/faces.csv
    (file,label,group; dfdc-faces has one) when it is there, else the identities in each file's
    name (identities_of with group_by). loose: also take every other subfolder whose name
    starts with real or fake (real-extra/, fake-dfdc/...), and accept a folder with one class
    only (to count false alarms on real videos).
    """
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; give a folder with real/ and fake/ subfolders of videos or face images")
    listed = os.path.join(root, "faces.csv")
    if os.path.isfile(listed):
        return _listed_media(root, listed, extensions)
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and d.startswith(tuple(LABELS))) if loose else list(LABELS)
    missing = [c for c in LABELS if not os.path.isdir(os.path.join(root, c))]
    if (missing and not loose) or not names:
        raise UserError(f"{root} needs two subfolders, real/ and fake/, of videos or face images (it has no {' or '.join(m + '/' for m in missing)})")
    items = []
    for name in names:
        files = list_images(os.path.join(root, name), extensions)
        if not files and not loose:
            raise UserError(f"no videos or images under {os.path.join(root, name)}; put the {name} ones there")
        items += [(f, LABELS["fake" if name.startswith("fake") else "real"], identities_of(f, group_by)) for f in files]
    return items


def _listed_media(root, listed, extensions):
    """DIR/faces.csv (file,label,group; file relative to DIR, label real or fake) -> [(path, label, [group])]."""
    items, problems = [], []
    with open(listed, newline="") as f:
        reader = csv.DictReader(f)
        if not {"file", "label", "group"} <= set(reader.fieldnames or ()):
            raise UserError(f"{listed} needs the columns file,label,group (it has {','.join(reader.fieldnames or ()) or 'none'})")
        for line, row in enumerate(reader, start=2):
            path = os.path.join(root, row["file"])
            if row["label"] not in LABELS:
                problems.append(f"line {line}: label {row['label']!r} is neither real nor fake")
            elif not row["file"].lower().endswith(extensions) or not os.path.isfile(path):
                problems.append(f"line {line}: {row['file']} is not a video or image file under {root}")
            else:
                items.append((path, LABELS[row["label"]], [row["group"] or row["file"]]))
    if problems:
        raise UserError(f"{listed}: {len(problems)} rows cannot be used ({problems[0]}{'; ...' if len(problems) > 1 else ''}); "
                        "fix them or remove the rows")
    if {label for _, label, _ in items} != {0, 1}:
        raise UserError(f"{listed} must list real and fake files")
    return items


def identities_of(path, pattern=DEFAULT_GROUP):
    """The identities a file shows, from its stem: every match of the regex (its first group, if it has one).

    The default matches the whole stem less a trailing _N, one identity per file. A pattern that
    matches several times names several: with \\d+ FaceForensics++'s 000_003 (the frames of 000, the
    face of 003) shows 000 and 003.
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    found = [m.group(1) if m.groups() and m.group(1) is not None else m.group(0) for m in re.finditer(pattern, stem)]
    return [f for f in found if f] or [stem]


def split_by_group(items, valid=0.2, test=0.2, seed=0):
    """[(path, label, groups)] -> ({"train", "valid", "test": [(path, label)]}, {part: group names}), no group in two parts.

    Files that share a group are one unit (a file showing two identities, 000_003, joins both
    000 and 003). Units are shuffled by a seeded hash of their names and dealt out to test and
    valid until each holds about its share of the files; the rest train. Each part needs real and fake files.
    """
    parent = {}  # union-find over groups: a file in two of them joins them

    def root(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, _, ids in items:
        for other in ids[1:]:
            parent[root(other)] = root(ids[0])
    members = {}
    for _, _, ids in items:
        members.setdefault(root(ids[0]), set()).update(ids)
    units = {}
    for path, label, ids in items:
        units.setdefault("+".join(sorted(members[root(ids[0])])), []).append((path, label))
    order = sorted(units, key=lambda g: zlib.crc32(f"{seed}:{g}".encode()))
    parts = {"test": [], "valid": [], "train": []}
    want = {"test": test * len(items), "valid": valid * len(items)}
    names = {p: [] for p in parts}
    for g in order:
        # a part takes a unit while that brings it nearer its share than it was
        part = next((p for p in ("test", "valid") if len(parts[p]) + len(units[g]) / 2 <= want[p]), "train")
        parts[part] += units[g]
        names[part].append(g)
    for part, chosen in parts.items():
        labels = {label for _, label in chosen}
        if (part != "train" and want[part] == 0) or labels == {0, 1}:
            continue
        counts = {c: sum(label == v for _, label, _ in items) for c, v in LABELS.items()}
        raise UserError(f"cannot split {len(units)} groups ({counts['real']} real and {counts['fake']} fake files) into train, "
                        f"valid and test parts that each hold real and fake files (the {part} part has "
                        f"{'only ' + next(c for c, v in LABELS.items() if v in labels) if labels else 'nothing'}); "
                        "add files of more identities, or check --group-by")
    return parts, names


def report_skipped(dataset, indices, skipped):
    """Warn, by name, about images that could not be decoded; skipped counts those of the run so far -> the new count."""
    for i in indices:
        skipped += 1
        name = dataset.files[i] if hasattr(dataset, "files") else f"image {i}"
        tqdm.write(f"warning: skipped {name}: it cannot be decoded as an image ({skipped} skipped so far)", file=sys.stderr)
    return skipped
