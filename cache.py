"""A preprocessed image cache: every image decoded, resized and cropped once, kept as uint8 on disk.

Decoding JPEGs is what makes the usual DCGAN slow: the tutorial's loader decodes every image
again every epoch. The cache decodes each once, on all cores, into one (N, H, W, 3) uint8
array (CelebA at 64x64 is about 2.5 GB) that later runs memory-map in seconds.

A cache lives in a folder named after a key: a hash of what it was made from (every file's
path, size and modification time, the image size, the crop, the library versions that
decode and resize). Change any of them and the key changes, so a stale cache is never
used. It is built in a temporary folder and renamed into place in one step, so an
interrupted build leaves no cache behind, only a temporary folder the next build removes.
"""

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import zipfile

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import Dataset
from tqdm import tqdm

import data
from cli import CannotWrite, UserError, cores, make_folder, write_atomically, write_text

FORMAT = 1  # bump when the layout of a cache folder changes
CROP = "EXIF upright + torchvision Resize(shorter side, bilinear, antialias) + CenterCrop"  # what open_rgb and resize_crop do, part of the key


def cache_key(files, image_size):
    """A hash of everything the cached pixels depend on."""
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT, image_size, CROP, PIL.__version__, torchvision.__version__]).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class CachedImages(Dataset):
    """The images of a cache: `images` is the memory-mapped (N, H, W, 3) uint8 array, `files` its sources.

    Indexing gives (image in [-1, 1], True) like data.ImageFiles, so it can stand in for one;
    the training loop reads `images` directly and normalises whole batches on the device.
    """

    def __init__(self, images, files, dropped):
        self.images, self.files, self.dropped = images, files, dropped

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return data.normalize_uint8(np.array(self.images[i:i + 1]))[0], True


def batches(store, order, first_step, steps, batch, rank, world, device):
    """Batches from the uint8 cache, no loader workers: gather this rank's share of each step's images, normalise on the device.

    store is the cache's memory map, or the whole cache as a tensor in GPU memory. Every step
    takes the next `batch` images of the epoch's order; rank r takes its r-th slice of them,
    so the global batches are the same on any number of processes.
    """
    share = batch // world
    order = torch.as_tensor(order)
    if isinstance(store, torch.Tensor):
        order = order.to(store.device)  # one copy per epoch; no host sync per step
    for s in range(first_step, steps):
        idx = order[s * batch + rank * share:s * batch + (rank + 1) * share]
        if isinstance(store, torch.Tensor):
            yield data.normalize_uint8(store.index_select(0, idx)), []
        elif device.type == "cpu":
            yield data.normalize_uint8(np.take(store, idx.numpy(), axis=0)), []
        else:  # through pinned memory, so that the copy runs while the GPU computes
            images = torch.from_numpy(np.take(store, idx.numpy(), axis=0)).pin_memory()
            yield data.normalize_uint8(images.to(device, non_blocking=True)), []


def to_device(images, device):
    """Where batches are gathered from: on a GPU the whole cache, copied in pieces, when it fits in half its free
    memory; otherwise (and on CPU) the memory map, whose batches are copied through pinned memory."""
    if device.type != "cuda" or images.nbytes >= torch.cuda.mem_get_info(device)[0] // 2:
        return images
    out = torch.empty(images.shape, dtype=torch.uint8, device=device)
    for lo in range(0, len(images), 16384):  # in pieces, so the host never holds a second copy of the whole cache
        out[lo:lo + 16384] = torch.from_numpy(np.array(images[lo:lo + 16384])).to(device)
    return out


def open_cache(folder):
    """A complete cache folder -> CachedImages; None if anything is missing or does not fit (a broken cache)."""
    try:
        with open(os.path.join(folder, "index.json")) as f:
            index = json.load(f)
        images = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")  # checks the header against the file size
        if index.get("format") != FORMAT or images.shape != (len(index["files"]), index["image_size"], index["image_size"], 3):
            return None
        return CachedImages(images, index["files"], index["dropped"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # missing, truncated, or an index.json of another shape
        return None


def load_or_build(files, image_size, cache_dir, name, build=True, workers=None):
    """The cache of `files` at `image_size` under cache_dir: opened if it is there and whole, else built.

    build=False only opens (for ranks that wait while another process builds); returns None if absent.
    """
    folder = os.path.join(cache_dir, f"{name}-{image_size}-{cache_key(files, image_size)}")
    cached = open_cache(folder)
    if cached is not None or not build:
        return cached
    if os.path.exists(folder):
        print(f"cache {folder} is incomplete or damaged; rebuilding it", file=sys.stderr)
        shutil.rmtree(folder)
    build_cache(files, image_size, folder, workers)
    return open_cache(folder)


def build_cache(files, image_size, folder, workers=None):
    """Decode, resize and crop every file into folder/images.npy on all cores; drop (and name) what cannot be decoded."""
    parent, base = os.path.split(folder)
    parent = parent or "."
    make_folder(parent, "cache folder")
    host = socket.gethostname()
    for stale in os.listdir(parent):  # left by an interrupted build of this same cache on this machine
        if stale.startswith(f".{base}.tmp-{host}-") and not _alive(int(stale.rsplit("-", 1)[1])):
            shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f".{base}.tmp-{host}-{os.getpid()}")
    try:
        os.makedirs(tmp)
        path = os.path.join(tmp, "images.npy")
        _allocate(path, (len(files), image_size, image_size, 3))  # the workers write into the file; this process needs only its size
        workers = workers or cores()
        chunks = [(path, files[lo:lo + 256], image_size, lo) for lo in range(0, len(files), 256)]
        bad = []
        with tqdm(total=len(files), desc=f"caching {len(files):,} images at {image_size}x{image_size} on {workers} cores",
                  unit="img", dynamic_ncols=True) as bar:
            if workers > 1:
                with multiprocessing.Pool(workers) as pool:
                    for n, failed in pool.imap_unordered(_decode_chunk, chunks):
                        bad += failed
                        bar.update(n)
            else:
                for chunk in chunks:
                    n, failed = _decode_chunk(chunk)
                    bad += failed
                    bar.update(n)
        bad.sort()
        for i in bad:
            print(f"warning: skipped {files[i]}: it cannot be decoded as an image (left out of the cache)", file=sys.stderr)
        if len(bad) == len(files):
            raise UserError(f"none of the {len(files):,} images could be decoded (e.g. {files[0]}); check --data-root")
        kept = sorted(set(range(len(files))) - set(bad))
        if bad:  # compact: the cache holds only decodable images, in the order of the file list
            full = np.load(path, mmap_mode="r")
            compact = _allocate(path + ".kept", (len(kept),) + full.shape[1:])
            for lo in range(0, len(kept), 4096):
                compact[lo:lo + 4096] = full[kept[lo:lo + 4096]]
            compact.flush()
            del full, compact
            os.replace(path + ".kept", path)
            print(f"warning: {len(bad)} of {len(files):,} images could not be decoded and are left out of the cache",
                  file=sys.stderr)
        write_text(os.path.join(tmp, "index.json"), json.dumps({"format": FORMAT, "image_size": image_size, "crop": CROP,
                                                               "files": [files[i] for i in kept], "dropped": [files[i] for i in bad]}))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())  # the rename below must never publish pixels that are still only in memory
        try:
            os.rename(tmp, folder)  # atomic: the cache appears whole or not at all
        except OSError:  # another process published the same cache first; its pixels are the same
            shutil.rmtree(tmp)
    except OSError as e:  # a full disk or an unwritable --cache-dir: the user's to fix, and no partial cache is left
        shutil.rmtree(tmp, ignore_errors=True)
        size = len(files) * image_size * image_size * 3
        raise UserError(f"cannot build the image cache in {os.path.abspath(parent)} ({e.strerror or e}); it needs about "
                        f"{size / 1e9:.1f} GB: free space there, pass another --cache-dir, or train with --no-cache") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _allocate(path, shape):
    """A uint8 .npy file of this shape, its disk space claimed now, opened as a memory map.

    Claiming the space turns a full disk into an error here; without it the file is sparse,
    and a worker writing pixels into a page the disk has no room for dies of SIGBUS.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    if hasattr(os, "posix_fallocate"):  # Linux; elsewhere the file stays sparse
        with open(path, "rb+") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return out


def _alive(pid):
    """Whether a process of this machine still runs: another run may be building the same cache right now."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _decode_chunk(job):
    """In a worker: decode a run of files into the cache file's rows from lo on; returns (count, indices that failed)."""
    path, files, image_size, lo = job
    out = np.load(path, mmap_mode="r+")  # each worker writes its own rows straight into the file: no pickled pixels
    crop = data.resize_crop(image_size)
    failed = []
    for i, f in enumerate(files, start=lo):
        try:
            out[i] = np.asarray(crop(data.open_rgb(f)))
        except Exception:  # truncated, not an image, unreadable: the same files data.ImageFiles would skip
            failed.append(i)
    out.flush()
    return len(files), failed


# -----------------------------------------------------------------------------
# face crops of videos and images, for the detector: found once per file and settings

FACES_FORMAT = 3  # 3: landmarks beside the faces of the counted tracks and their frames
# in an image's key only: cached before images were turned upright by their EXIF tag, a phone photo's faces lay on their
# side; videos were upright already and keep their caches
UPRIGHT_IMAGES = "EXIF upright"


def media_faces(path, kind, finder, settings, frames, image_size, cache_dir):
    """The face crops of one video or image as the detector sees them -> (uint8 (N, S, S, 3), frame positions (N,),
    landmarks (N, 5, 2) in the crops' pixels, NaN where none were found).

    From faces.media_faces, as detect.py scores them: the faces of the counted tracks (the finder's max_faces), framed and
    resized as detect.py frames and resizes them; an image with finder None is a face crop
    already and is taken whole. Frame positions number the sampled frames, so a video's score can
    be taken per frame. Kept in cache_dir/faces/ under a key of the file (path, size,
    modification time) and every setting, so a second run decodes nothing. Raises UserError for a
    file that cannot be read.
    """
    from faces import media_faces as find_faces  # OpenCV and PyAV, which the GAN's cache does not need
    from video import check_input
    st = check_input(path)  # a file removed since it was listed, a FIFO: named as what it is
    key = hashlib.sha256(json.dumps([FACES_FORMAT, os.path.abspath(path), st.st_size, st.st_mtime_ns, settings, frames,
                                     image_size, PIL.__version__, torchvision.__version__]
                                    + ([UPRIGHT_IMAGES] if kind == "image" else [])).encode()).hexdigest()[:20]
    folder = os.path.join(cache_dir, "faces")
    target = os.path.join(folder, f"{key}.npz")
    _remove_stale_temporaries(folder)
    try:
        with np.load(target) as cached:
            return cached["faces"], cached["frames"], cached["landmarks"]
    except FileNotFoundError:
        pass  # not cached yet
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # truncated, 0 bytes, another program's file
        print(f"warning: the face cache entry {target} (for {path}) is damaged ({type(e).__name__}); "
              "deleting it and finding the faces again", file=sys.stderr)
        with contextlib.suppress(OSError):
            os.remove(target)
    _, records = find_faces(path, kind, finder, frames=frames, size=image_size, landmarks=True)
    kept = [(position, f) for position, r in enumerate(records) for f in r["faces"]]
    faces = np.stack([f["pixels"] for _, f in kept]) if kept else np.zeros((0, image_size, image_size, 3), np.uint8)
    positions = np.array([p for p, _ in kept], dtype=np.int64)
    marks = np.array([np.full((5, 2), np.nan) if f["landmarks"] is None else f["landmarks"] for _, f in kept],
                     dtype=np.float32).reshape(-1, 5, 2)
    make_folder(folder, "face cache folder")
    # two programs that share the cache (two trainings, training and evaluate.py) may find the same file's faces at once:
    # with one temporary name, one of them would rename away the other's half-written file
    write_atomically(target, lambda f: np.savez(f, faces=faces, frames=positions, landmarks=marks), tmp=f"{target}.{os.getpid()}.tmp")
    return faces, positions, marks


STALE_AFTER = 600  # seconds: a face cache entry is written in well under a second, so an older temporary file's writer died

_swept = set()  # face cache folders this process has cleaned of stale temporary files


def _remove_stale_temporaries(folder):
    """Remove, once per process and folder, the temporary files (NAME.npz.PID.tmp) that a writer killed mid-write left behind."""
    if folder in _swept:
        return
    _swept.add(folder)
    try:
        names = [n for n in os.listdir(folder) if ".tmp" in n]
    except OSError:  # no folder yet
        return
    for name in names:
        with contextlib.suppress(OSError):  # another process may remove it first
            if time.time() - os.path.getmtime(os.path.join(folder, name)) > STALE_AFTER:
                os.remove(os.path.join(folder, name))


def _faces_worker(job):
    """In a worker process: one file's faces, or the UserError's text."""
    from faces import from_flags
    path, kind, flags, framing, settings, frames, image_size, cache_dir = job
    finder = None if flags is None else from_flags(argparse.Namespace(**flags), framing, quiet=True)[0]
    try:
        return path, media_faces(path, kind, finder, settings, frames, image_size, cache_dir), None
    except CannotWrite:  # a full disk is no fault of this file; leaving every file out would end in a misleading error
        raise
    except UserError as e:
        return path, None, str(e)


def face_jobs(paths, flags, framing, frames, image_size, cache_dir, as_crops):
    """many_media_faces jobs for paths: with as_crops, images are used as they are (face crops); videos, and images
    otherwise, go through the finder that flags (faces.from_flags's) and framing make."""
    from faces import from_flags
    from video import media_kind
    settings = from_flags(argparse.Namespace(**flags), framing, quiet=True)[1]
    jobs = []
    for path in paths:
        kind = media_kind(path)  # once: for a GIF it opens the file
        crop = as_crops and kind == "image"
        jobs.append((path, kind, None if crop else flags, framing, {"faces": "none"} if crop else settings,
                     frames, image_size, cache_dir))
    return jobs


def _worker_lock():
    """A spawned worker's tqdm takes a thread lock: the process-shared lock it makes by default is a named semaphore
    that the pool's stop leaves registered, and Python then warns of "leaked semaphore objects" at exit."""
    import threading
    tqdm.set_lock(threading.RLock())


def many_media_faces(jobs, workers=None, desc="faces"):
    """media_faces for many files on all cores: jobs are (path, kind, finder flags dict or None, framing, settings, frames,
    image_size, cache_dir); yields (path, result or None, problem or None) in the jobs' order."""
    workers = workers or cores()
    bar = tqdm(total=len(jobs), desc=desc, unit="file", dynamic_ncols=True, leave=False)
    try:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_lock) as pool:
                for out in pool.imap(_faces_worker, jobs, chunksize=16):
                    bar.update()
                    yield out
        else:
            for job in jobs:
                out = _faces_worker(job)
                bar.update()
                yield out
    finally:
        bar.close()
