"""The uint8 image cache: same pixels as the plain loader, rebuilt when its sources change, never used half-made."""

import errno
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cache  # noqa: E402
import data  # noqa: E402
import main  # noqa: E402
from cli import UserError  # noqa: E402
from checkpoint import load as load_checkpoint  # noqa: E402
from helpers import make_images  # noqa: E402


def test_cache_holds_the_plain_loaders_pixels_in_order(tmp_path, capsys):
    files = make_images(tmp_path / "img", 12, broken=["005b.jpg"])
    cached = cache.load_or_build(files, 32, str(tmp_path / "cache"), "t", workers=2)
    assert "skipped " + str(tmp_path / "img" / "005b.jpg") in capsys.readouterr().err
    plain = data.ImageFiles(files, 32)
    good = [i for i in range(len(files)) if plain[i][1]]
    assert len(good) == 12 and cached.files == [files[i] for i in good]
    assert cached.dropped == [str(tmp_path / "img" / "005b.jpg")]
    assert cached.images.shape == (12, 32, 32, 3) and cached.images.dtype == np.uint8
    for j, i in enumerate(good):
        assert torch.equal(cached[j][0], plain[i][0]), f"image {files[i]} differs"
    (batch, _), = cache.batches(cached.images, [3, 0, 7, 1], 0, 1, 3, 0, 1, torch.device("cpu"))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack([plain[good[k]][0] for k in (3, 0, 7)]))
    on_torch = data.normalize_uint8(torch.from_numpy(np.array(cached.images[[3, 0, 7]])))  # the path a GPU takes
    assert torch.equal(on_torch, batch) and on_torch.is_contiguous(memory_format=torch.channels_last)


def test_a_second_run_opens_the_same_cache(tmp_path):
    files = make_images(tmp_path / "img", 6)
    first = cache.load_or_build(files, 32, str(tmp_path / "cache"), "t", workers=1)
    stamp = os.stat(first.images.filename).st_mtime_ns
    second = cache.load_or_build(files, 32, str(tmp_path / "cache"), "t", workers=1)
    assert second.images.filename == first.images.filename and os.stat(second.images.filename).st_mtime_ns == stamp


def test_changed_files_or_size_give_a_new_cache(tmp_path):
    folder, cache_dir = tmp_path / "img", str(tmp_path / "cache")
    files = make_images(folder, 6)
    old = cache.load_or_build(files, 32, cache_dir, "t", workers=1)
    # another image size
    bigger = cache.load_or_build(files, 64, cache_dir, "t", workers=1)
    assert bigger.images.shape == (6, 64, 64, 3)
    # one more file
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "zzz.png")
    assert len(cache.load_or_build(files + [str(folder / "zzz.png")], 32, cache_dir, "t", workers=1)) == 7
    # a file rewritten in place with other pixels (its size and mtime change)
    Image.fromarray(np.full((50, 40, 3), 200, np.uint8)).save(files[1])
    os.utime(files[1], ns=(1, 1))
    rebuilt = cache.load_or_build(files, 32, cache_dir, "t", workers=1)
    assert rebuilt.images.filename != old.images.filename
    assert torch.equal(rebuilt[1][0], data.ImageFiles(files, 32)[1][0])
    assert not torch.equal(rebuilt[1][0], old[1][0])


def truncate_images(folder):  # as if the disk filled up mid-write
    with open(os.path.join(folder, "images.npy"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(folder, "images.npy")) // 2)


def index_of_another_shape(folder):  # valid JSON that once gave a KeyError traceback
    with open(os.path.join(folder, "index.json"), "w") as f:
        f.write('{"format": 1}')


@pytest.mark.parametrize("damage", [truncate_images, index_of_another_shape])
def test_a_damaged_cache_is_named_once_and_rebuilt(tmp_path, capsys, damage):
    files = make_images(tmp_path / "img", 6)
    cache_dir = str(tmp_path / "cache")
    built = cache.load_or_build(files, 32, cache_dir, "t", workers=1)
    folder = os.path.dirname(built.images.filename)
    expected = np.array(built.images)
    del built
    damage(folder)
    assert cache.open_cache(folder) is None
    capsys.readouterr()
    rebuilt = cache.load_or_build(files, 32, cache_dir, "t", workers=1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert warnings == [f"cache {folder} is incomplete or damaged; rebuilding it"]
    assert np.array_equal(np.array(rebuilt.images), expected)


def test_interrupted_build_leaves_no_cache(tmp_path, monkeypatch):
    files = make_images(tmp_path / "img", 600)
    cache_dir = str(tmp_path / "cache")
    calls = []
    real = cache._decode_chunk
    def decode_then_die(job):
        calls.append(job)
        if len(calls) == 2:  # the second chunk of 256: the first is already in the file
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(cache, "_decode_chunk", decode_then_die)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(files, 32, cache_dir, "t", workers=1)
    assert os.listdir(cache_dir) == []  # neither a cache nor its temporary folder
    monkeypatch.setattr(cache, "_decode_chunk", real)
    # a build killed outright (no cleanup ran) leaves its temporary folder; the next build removes it
    key = cache.cache_key(files, 32)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60)
    leftover = os.path.join(cache_dir, f".t-32-{key}.tmp-{socket.gethostname()}-{int(dead.stdout)}")
    os.makedirs(leftover)
    assert len(cache.load_or_build(files, 32, cache_dir, "t", workers=1)) == 600
    assert os.listdir(cache_dir) == [f"t-32-{key}"]


def test_a_full_or_unwritable_cache_dir_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    files = make_images(tmp_path / "img", 6)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="cannot create the cache folder .*a_file/cache"):
        cache.load_or_build(files, 32, str(tmp_path / "a_file" / "cache"), "t", workers=1)

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(UserError, match=f"cannot build the image cache in {tmp_path / 'cache'} \\(No space left on device\\)"):
        cache.load_or_build(files, 32, str(tmp_path / "cache"), "t", workers=1)
    assert os.listdir(tmp_path / "cache") == []  # no half-built cache, no temporary folder


def train_args(tmp_path, root, *extra):
    return ["--dataset", "folder", "--data-root", str(root), "--image-size", "32", "--ngf", "8", "--ndf", "8",
            "--batch", "8", "--workers", "0", "--log-every", "1", "--sample-every", "1000",
            "--logdir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), *extra]


def run(argv):
    cfg, ckpt = main.make_config(argv)
    return main.train(cfg, ckpt), load_checkpoint(cfg.run_dir)


def test_cache_and_plain_loader_train_the_same(tmp_path):
    make_images(tmp_path / "img", 40)
    plain, plain_ckpt = run(train_args(tmp_path, tmp_path / "img", "--no-cache", "--max-steps", "3", "--run-name", "plain"))
    cached, cached_ckpt = run(train_args(tmp_path, tmp_path / "img", "--max-steps", "3", "--run-name", "cached"))
    assert os.listdir(tmp_path / "cache"), "the cached run made no cache"
    assert plain == cached
    for net in ("G", "D"):
        for k, v in plain_ckpt[net].items():
            assert torch.equal(v, cached_ckpt[net][k]), f"{net}.{k} differs"


def test_resumed_cached_run_equals_an_uninterrupted_one(tmp_path):
    make_images(tmp_path / "img", 40)  # about 32 in the train split: 4 steps an epoch, so the resume crosses an epoch
    whole, whole_ckpt = run(train_args(tmp_path, tmp_path / "img", "--epochs", "3", "--max-steps", "6", "--run-name", "whole"))
    run(train_args(tmp_path, tmp_path / "img", "--epochs", "3", "--max-steps", "3", "--run-name", "parts"))
    resumed, resumed_ckpt = run(["--resume", str(tmp_path / "runs" / "parts"), "--max-steps", "6"])
    assert resumed == whole
    for net in ("G", "D", "opt_G"):
        assert torch.equal(torch.cat([v.flatten().float() for v in main_state(whole_ckpt[net])]),
                           torch.cat([v.flatten().float() for v in main_state(resumed_ckpt[net])]))


def main_state(state):
    """Every tensor in a state dict (nested, as an optimizer's is), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in main_state(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in main_state(v)]
    return []


def test_ranks_split_every_global_batch(tmp_path):
    files = make_images(tmp_path / "img", 8)
    cached = cache.load_or_build(files, 32, str(tmp_path / "cache"), "t", workers=1)
    order, cpu = data.epoch_order(8, 0, 0), torch.device("cpu")
    whole = [x for x, _ in cache.batches(cached.images, order, 0, 2, 4, 0, 1, cpu)]
    shares = [[x for x, _ in cache.batches(cached.images, order, 0, 2, 4, rank, 2, cpu)] for rank in (0, 1)]
    assert len(whole) == 2 and whole[0].shape[0] == 4 and shares[0][0].shape[0] == 2
    for s in range(2):
        assert torch.equal(whole[s], torch.cat([shares[0][s], shares[1][s]]))
    assert not torch.equal(whole[0], whole[1])


# -----------------------------------------------------------------------------
# the face cache

def face_image(tmp_path):
    path = str(tmp_path / "face.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def cached_faces(path, cache_dir):
    return cache.media_faces(path, "image", None, {"faces": "none"}, 1, 32, cache_dir)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_face_cache_entry_is_named_once_deleted_and_rebuilt(tmp_path, capsys, damage):
    path, cache_dir = face_image(tmp_path), str(tmp_path / "cache")
    first = cached_faces(path, cache_dir)
    [entry] = os.listdir(tmp_path / "cache" / "faces")
    entry = str(tmp_path / "cache" / "faces" / entry)
    with open(entry, "r+b") as f:  # a power cut, a full disk, a copy that stopped
        f.truncate(os.path.getsize(entry) // 2 if damage == "truncated" else 0)
    capsys.readouterr()
    again = cached_faces(path, cache_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: the face cache entry {entry} (for {path}) is damaged")
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(first, again))
    cached_faces(path, cache_dir)  # the entry was rewritten whole: no second warning
    assert capsys.readouterr().err == ""


def test_stale_temporary_files_in_the_face_cache_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "_swept", set())
    folder = tmp_path / "cache" / "faces"
    folder.mkdir(parents=True)
    stale, fresh = folder / "0123.npz.tmp", folder / "4567.npz.tmp"  # left by kill -9; being written by another process now
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    an_hour_ago = os.path.getmtime(stale) - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    cached_faces(face_image(tmp_path), str(tmp_path / "cache"))
    assert not stale.exists() and fresh.exists()


def test_two_programs_finding_the_same_faces_at_once_both_succeed(tmp_path, monkeypatch):
    image, cache_dir = face_image(tmp_path), str(tmp_path / "cache")
    save, others = np.savez, []

    def another_program_writes_meanwhile(f, **arrays):
        if not others:  # while this entry is half written, another program (another pid) writes the same one
            others.append(True)
            with monkeypatch.context() as m:
                m.setattr(os, "getpid", lambda: 4_000_000)
                cached_faces(image, cache_dir)
        save(f, **arrays)
    monkeypatch.setattr(np, "savez", another_program_writes_meanwhile)
    faces, _, _ = cached_faces(image, cache_dir)  # with one temporary name for both, the other renamed it away: "cannot write"
    (entry,) = (tmp_path / "cache" / "faces").iterdir()  # one entry, whole, and no temporary file left
    assert others and faces.shape == (1, 32, 32, 3) and np.array_equal(np.load(entry)["faces"], faces)


def test_a_full_face_cache_folder_stops_with_one_sentence_instead_of_leaving_every_file_out(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full_disk)
    paths = [face_image(tmp_path)]
    jobs = [(p, "image", None, None, {"faces": "none"}, 1, 32, str(tmp_path / "cache")) for p in paths]
    with pytest.raises(UserError, match="cannot write .*faces.*No space left on device"):
        list(cache.many_media_faces(jobs, workers=1))


def test_a_face_finding_workers_progress_bars_make_no_named_semaphore(monkeypatch):
    # tqdm's default lock is a multiprocessing RLock: in a spawned pool worker a named semaphore that the pool's stop
    # leaves registered, and the program ends with Python's "leaked semaphore objects" warning
    import multiprocessing.synchronize
    import tqdm.std
    made = []
    monkeypatch.setattr(multiprocessing.synchronize.SemLock, "__init__", lambda self, *args, **kwargs: made.append(args))
    monkeypatch.delattr(tqdm.std.tqdm, "_lock", raising=False)  # as in a fresh worker process
    monkeypatch.delattr(tqdm.std.TqdmDefaultWriteLock, "mp_lock", raising=False)
    cache._worker_lock()
    with tqdm.std.tqdm(range(2), disable=True) as bar:
        list(bar)
    assert made == []
