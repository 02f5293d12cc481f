"""Scoring a whole archive: inputs listed lazily, their faces found in worker processes, each result kept as it is made.

detect.py is the program; these are its pieces for many inputs:
- `list_inputs`: the command line's files and folders, one input at a time (a folder of a
  million videos is never a list in memory), in a fixed order every process agrees on;
- `shard`: this process's share of them under torchrun (every world_size-th, from its rank);
- `faces_in_order`: the inputs' faces found by `--workers` processes while the main process
  scores, results handed back in input order, at most a few inputs ahead (bounded memory);
- `Results`: the --out folder as the record of a run: one JSON per input, written atomically
  the moment it is scored, and an append-only log, so a run stopped any way at all (Ctrl-C,
  kill -9, a reboot) loses only the inputs in flight, and the same command again scores only the rest.

No torch here: the worker processes never load it (decoding and finding faces need PyAV,
OpenCV and libfacedetection), so each starts in a fraction of a second and stays small.
"""

import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time

from cli import UserError, make_folder, write_text
from video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, check_input, endings, media_kind, walk_files

NOT_MEDIA = f"is not a video ({endings(VIDEO_EXTENSIONS)}) or an image ({endings(IMAGE_EXTENSIONS)})"


# -----------------------------------------------------------------------------
# inputs

def list_inputs(paths, leave_out=()):
    """Command-line paths -> (path, kind or None, problem or None) one at a time, folders walked recursively in a fixed order.

    A file named on the command line with an unknown extension is a failed input; inside a
    folder it is passed over, since folders hold notes and thumbnails. Files under the folders
    in leave_out (detect.py's own outputs, where --out lies inside an input folder) are never
    inputs. A file is listed once however often the command line names it (twice, or as itself
    and inside a folder, or in two nested folders): only the command line's own paths are
    remembered, never the files of a folder, so memory stays flat.
    """
    leave_out = tuple(os.path.join(os.path.realpath(f), "") for f in leave_out)
    files, folders = set(), []  # the command line's paths so far, as real paths
    for path in paths:
        real = os.path.realpath(path)
        inside = os.path.join(real, "") if os.path.isdir(path) else real  # a folder named twice is inside itself
        if real in files or (os.path.exists(path) and inside.startswith(tuple(folders))):
            continue
        if os.path.isdir(path):
            for f in walk_files(path, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS):
                found = os.path.realpath(f)
                if not found.startswith(leave_out + tuple(folders)) and found not in files:
                    yield f, media_kind(f), None
            folders.append(os.path.join(real, ""))
            continue
        files.add(real)
        yield path, *_kind_or_problem(path)


def _kind_or_problem(path):
    """A path named on the command line that is not a folder -> (kind or None, problem or None)."""
    if not os.path.exists(path):
        return None, "does not exist"
    if not os.path.isfile(path):  # a FIFO or a device: said as what it is, whatever its name
        try:
            check_input(path)
        except UserError as e:
            return None, str(e)
    if media_kind(path) is None:
        return None, NOT_MEDIA
    return media_kind(path), None


def shard(items, rank, world_size):
    """Every world_size-th item from the rank-th: each of torchrun's processes takes its own share, none twice."""
    for i, item in enumerate(items):
        if i % world_size == rank:
            yield item


# -----------------------------------------------------------------------------
# the faces of many inputs, found in worker processes

_finder = []  # this process's face finder, made once by _start_worker (or in the main process for --workers 0)


def _start_worker(flags, framing, main_pid=None):
    import argparse
    from faces import from_flags
    if main_pid is not None:  # a worker process
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it stops the pool and keeps what was scored
        if os.name == "posix":  # os.kill(pid, 0) probes a process there; on Windows it would send a Ctrl-C
            threading.Thread(target=_exit_with, args=(main_pid,), daemon=True).start()
    _finder[:] = [from_flags(argparse.Namespace(**flags), framing, quiet=True)[0]]


def _exit_with(main_pid):
    """End this worker once the main process is gone: killed with SIGKILL, it cannot tell its workers, which would
    otherwise wait for work forever (each holds both ends of the pool's queue, so it never sees the queue close)."""
    while True:
        time.sleep(1)
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:  # the pid was reused by another user's process: ours is gone
            os._exit(0)


def _find_faces(job):
    """One input's faces -> {"info", "records", "seconds"} or {"error"}; pixels at the model's size (uint8 arrays)."""
    from faces import media_faces
    (path, kind, problem), frames, every, size = job
    t0 = time.perf_counter()
    try:
        if problem:
            raise UserError(problem)
        info, records = media_faces(path, kind, _finder[0], frames=frames, every=every, size=size)
    except UserError as e:
        return {"error": str(e)}
    return {"info": info, "records": records, "seconds": time.perf_counter() - t0}


def faces_in_order(inputs, *, workers, flags, framing, frames, every, size, find=None):
    """(input, its faces) for each of inputs, in their order, found by `workers` processes (0: in this one).

    The pool's equivalent of a DataLoader over inputs: each worker decodes and finds the faces of
    one input at a time, while the caller scores the ones before it. At most two inputs a worker
    are in flight, so memory does not grow with the archive, however slow the scoring. A worker
    that dies (a decoder that crashes, memory that runs out) costs one input: those in flight are
    run again one at a time, each in a pool of its own, and the one that kills its worker is an
    error. flags, framing: the face finder's, as faces.from_flags takes them (every worker makes
    its own). find: what a worker does with a job (tests replace it).
    """
    find = find or _find_faces
    jobs = ((item, frames, every, size) for item in inputs)
    if workers == 0:
        _start_worker(flags, framing)
        for job in jobs:
            yield job[0], find(job)
        return
    pool, window = _pool(workers, flags, framing), collections.deque()
    try:
        for job in itertools.chain(jobs, [None]):  # None: no more jobs, empty the window
            if job is not None:
                window.append((job, _submit(pool, find, job)))
            while window and (job is None or len(window) >= 2 * workers):
                outcome = _outcome(window[0][1])
                if outcome is _BROKEN:
                    pool.shutdown(wait=False, cancel_futures=True)
                    for stuck, future in window:
                        yield stuck[0], _alone(find, stuck, flags, framing) if _outcome(future) is _BROKEN else _outcome(future)
                    window.clear()
                    pool = _pool(workers, flags, framing)
                    break
                yield window.popleft()[0][0], outcome
    except BaseException:  # Ctrl-C, or a full disk in the caller: stop the inputs in flight now, not after they finish
        _terminate(pool)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_BROKEN = object()  # a job whose worker died


def _pool(workers, flags, framing):
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start_worker,
                                                  initargs=(flags, framing, os.getpid()))


def _submit(pool, find, job):
    try:
        return pool.submit(find, job)
    except concurrent.futures.process.BrokenProcessPool:  # a worker died since the last job was handed out
        return None


def _outcome(future):
    if future is None:
        return _BROKEN
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool:
        return _BROKEN


def _alone(find, job, flags, framing):
    """Run one job in a pool of its own: its outcome, or an error if it kills that worker too."""
    pool = _pool(1, flags, framing)
    try:
        outcome = _outcome(_submit(pool, find, job))
    finally:
        pool.shutdown(wait=True)
    if outcome is _BROKEN:
        return {"error": "finding its faces killed the worker process (a crash in the video decoder or the face finder, "
                         "or memory ran out); the other inputs were scored"}
    return outcome


def _terminate(pool):
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # earlier Pythons: the pool's own processes
        process.terminate()


def _context():
    """Workers forked from a small server process that has loaded only these modules (forkserver), not from the main
    process, which by then holds torch, the model and threads (TensorBoard's writer, torchrun's gloo) that a fork copies
    in whatever state they are. Each worker also imports the main script as multiprocessing does (__mp_main__), and
    detect.py's top level loads no torch, so a worker never does (tested) and starts at once. spawn where there is no
    forkserver (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["archive", "faces", "video"])  # not detect.py: a worker needs none of the program
    return context


# -----------------------------------------------------------------------------
# the --out folder: one result per input, written as it is made

class Results:
    """The --out folder of a run: run.json (what scored it), results/KEY.json per input, log.jsonl, annotated/.

    An input's KEY is its file name's stem and a hash of its absolute path: the same for the
    same input in every run and every process, unique among inputs, and no list of taken names
    is kept. A scored input is KEY.json; one that failed is KEY.error.json, so it is tried again
    by the next run (a truncated download may have been fetched again since) while what scored
    is never scored twice.
    """

    def __init__(self, out, settings, rank=0):
        self.out, self.rank = out, rank
        self.folder = os.path.join(out, "results")
        self.annotated = os.path.join(out, "annotated")
        self.log_path = os.path.join(out, "log.jsonl" if rank == 0 else f"log.{rank}.jsonl")
        self.settings = settings

    def open(self):
        """Make the folders and record the settings; settings that differ from those stored are one UserError."""
        make_folder(self.out, "--out folder")  # first: an --out that is a file is said as such, not as an unreadable run.json in it
        path = os.path.join(self.out, "run.json")
        try:
            with open(path) as f:
                stored = json.load(f)
        except FileNotFoundError:
            stored = None
        except (OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read ({type(e).__name__}); give another --out, or delete {path} if the results "
                            f"in {self.folder} were all made with these settings") from None
        if stored is not None and stored != self.settings:
            differ = sorted(k for k in set(stored) | set(self.settings) if stored.get(k) != self.settings.get(k))
            raise UserError(f"--out {self.out} holds results made by another detector or with other settings (they differ in: "
                            f"{', '.join(differ)}); give another --out, or delete {self.folder} and {path} to score everything again")
        make_folder(self.folder, "results folder")
        if stored is None:
            write_text(path, json.dumps(self.settings, indent=1, sort_keys=True))

    @staticmethod
    def stem(path):
        """The file name without its media extension, at most 80 characters, never hidden nor empty."""
        stem = os.path.basename(path)
        for ext in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS:
            if stem.lower().endswith(ext):
                stem = stem[:-len(ext)]
        # '.mp4' and '..mp4' are videos too: their stems would make hidden files or '..json'
        return (stem.strip(". ") or "unnamed")[:80]

    @staticmethod
    def key(path):
        # 16 hex digits: a million files of one name (*/video.mp4) share a key with odds of one in 37 million
        return f"{Results.stem(path)}-{hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:16]}"

    def path_of(self, path, ending=".json"):
        return os.path.join(self.folder, self.key(path) + ending)

    def done(self, path):
        return os.path.exists(self.path_of(path))

    def load(self, path):
        """The stored result of path (its error when it failed), or None when it has none yet.

        A result that cannot be read (written atomically, so edited by hand, or cut short by a
        power cut before the disk had it) is removed with one line, so the next run scores it again.
        """
        for ending in (".json", ".error.json"):
            where = self.path_of(path, ending)
            try:
                with open(where) as f:
                    return json.load(f)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                print(f"warning: the result {where} of {path} cannot be read ({type(e).__name__}); removed, so that "
                      "running the same command again scores it again", file=sys.stderr)
                with contextlib.suppress(OSError):
                    os.remove(where)
                return None
        return None

    def save(self, result):
        """Write the result (atomically), then note it in the log; an error is kept apart, to be tried again."""
        failed = "error" in result
        write_text(self.path_of(result["file"], ".error.json" if failed else ".json"), json.dumps(result, indent=1))
        if not failed:
            try:
                os.remove(self.path_of(result["file"], ".error.json"))
            except FileNotFoundError:
                pass
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "file": result["file"], "key": self.key(result["file"]),
                "score": result.get("score"), "verdict": "error" if failed else result["verdict"]}
        self.append_log(json.dumps(line) + "\n")

    def append_log(self, text):
        # one write to a file opened for appending: a kill leaves at most a last line cut short (the
        # JSON beside it is the record; the log is its history). One log a process: appends from
        # several machines to one file on a network disk may interleave.
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
