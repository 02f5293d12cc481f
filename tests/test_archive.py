"""detect.py on many inputs: every person counts, workers, resuming, torchrun, and a --help that loads no torch.

The scores come from the untrained GAN detector of the `checkpoint` fixture; where a test needs
one person to look fake, detector.score_faces is replaced in the main process (the workers
only find faces, so the replacement covers every path).
"""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import archive
import data
import detect
import detector
import faces
from cli import run_cli
from helpers import ROOT, two_faces, write_video
from worker_jobs import find_or_crash


def run_detect(*argv):
    return detect.main([*map(str, argv), "--device", "cpu"])


def summary(out, drop=("seconds",)):
    """summary.csv's rows without the columns that differ from run to run."""
    with open(out / "summary.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def result_json(out, path):
    return json.loads((out / "results" / (archive.Results.key(str(path)) + ".json")).read_text())


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Six short videos, one with two people, and an image, in a folder with a subfolder."""
    folder = tmp_path_factory.mktemp("archive")
    (folder / "more").mkdir()
    paths = [write_video(folder / f"v{i}.mp4", 150 if i == 0 else 4 + i) for i in range(4)]  # the first the slowest
    paths.append(write_video(folder / "more" / "two.mp4", 6, draw=two_faces))
    paths.append(write_video(folder / "more" / "w.mp4", 5))
    return folder


# -----------------------------------------------------------------------------
# every person counts

def tinted_face(seed, size, tint=None):
    from PIL import Image
    face = data.draw_face(random.Random(seed), size)
    return Image.blend(face, Image.new("RGB", face.size, tint), 0.3) if tint else face


def scene(i):
    """A main person (the largest, plain), a second person tinted red in every frame, and a blue passer-by in frame 2 only."""
    from PIL import Image
    im = Image.new("RGB", (400, 160), (200, 200, 200))
    im.paste(tinted_face(1, 110), (20 + i, 20))
    im.paste(tinted_face(5, 90, (255, 0, 0)), (200, 30))
    if i == 2:
        im.paste(tinted_face(7, 80, (0, 0, 255)), (300, 30))
    return np.asarray(im)


def by_tint(model, faces, device, batch=128):
    """Scores by colour: the red person looks fake (0.9), the blue passer-by most fake of all (0.99), the main person real (0.1)."""
    r, g, b = (faces[..., c].reshape(len(faces), -1).mean(1) for c in range(3))
    return np.where(r - b > 30, 0.9, np.where((b - r > 30) & (g > r), 0.99, 0.1))


def test_the_other_person_counts_and_a_passer_by_does_not(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setattr(detector, "score_faces", by_tint)
    video = write_video(tmp_path / "two.mp4", 5, draw=scene)
    out, main_only = tmp_path / "out", tmp_path / "main-only"
    assert run_detect(video, "--checkpoint", checkpoint, "--out", out) == 0
    report = result_json(out, video)
    assert report["people"] == 2 and report["score"] == pytest.approx(0.9)  # every frame takes the red person's 0.9
    counted = [t for t in report["tracks"] if t["counted"]]
    assert [(t["score"], t["frames"]) for t in counted] == [(pytest.approx(0.9), 5), (pytest.approx(0.1), 5)]
    assert all(t["frames"] == 1 for t in report["tracks"] if not t["counted"])  # the passer-by, where the finder sees it
    if faces._load_libfacedetection() is not None:  # YuNet finds the passer-by (the Haar cascade does not): scored, not counted
        assert report["faces_left_out"] == 1
    assert run_detect(video, "--checkpoint", checkpoint, "--out", main_only, "--max-faces", "1") == 0
    assert result_json(main_only, video)["score"] == pytest.approx(0.1)  # the main person alone: the swap is missed


# -----------------------------------------------------------------------------
# workers, resuming, torchrun

def test_workers_give_the_same_results_in_the_same_order(tmp_path, checkpoint, videos):
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        assert run_detect(videos, "--checkpoint", checkpoint, "--frames", "4", "--workers", workers, "--out", out) == 0
        runs[workers] = summary(out)
    assert [os.path.relpath(r["filename"], videos) for r in runs[0]] == [
        "v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4", "more/two.mp4", "more/w.mp4"]  # the folders' fixed order
    assert runs[0] == runs[2]
    assert (tmp_path / "w0" / "frames.csv").read_text() == (tmp_path / "w2" / "frames.csv").read_text()
    # scored in input order, though the first video took longest to decode
    logged = [json.loads(line)["file"] for line in (tmp_path / "w2" / "log.jsonl").read_text().splitlines()]
    assert logged == [r["filename"] for r in runs[0]]


def test_a_worker_that_dies_costs_its_input_alone():
    items = [(f"/nowhere/{name}.png", "image", None) for name in ("a", "crash1", "b", "c", "crash2", "d")]
    found = list(archive.faces_in_order(iter(items), workers=2, flags={"faces": "none", "detect_size": 320, "max_faces": None},
                                        framing=None, frames=1, every=None, size=32, find=find_or_crash))
    assert [item for item, _ in found] == items  # every input once, in order
    for (path, _, _), outcome in found:
        if "crash" in path:
            assert "killed the worker process" in outcome["error"]
        else:
            assert outcome["path"] == path


def test_an_input_named_twice_is_scored_once(tmp_path, checkpoint, videos):
    out = tmp_path / "out"
    video = str(videos / "more" / "w.mp4")
    assert run_detect(video, videos / "more", video, videos, videos / "more", "--checkpoint", checkpoint, "--frames", "4", "--out", out) == 0
    names = [r["filename"] for r in summary(out)]
    assert names[0] == video and sorted(map(os.path.realpath, names)) == sorted({os.path.realpath(n) for n in names})
    assert len(names) == 6  # each file of the folder once


def test_a_result_that_cannot_be_read_is_scored_again(tmp_path, checkpoint, videos, capsys):
    video = videos / "v1.mp4"
    out = tmp_path / "out"
    assert run_detect(video, "--checkpoint", checkpoint, "--frames", "4", "--out", out) == 0
    before = summary(out)
    (out / "results" / (archive.Results.key(str(video)) + ".json")).write_text('{"file": "cut sh')
    assert run_detect(video, "--checkpoint", checkpoint, "--frames", "4", "--out", out) == 1  # found unreadable, left unscored
    assert "cannot be read" in capsys.readouterr().err
    assert run_detect(video, "--checkpoint", checkpoint, "--frames", "4", "--out", out) == 0  # then scored again
    assert summary(out) == before


def test_a_stopped_run_goes_on_where_it_stopped(tmp_path, checkpoint, videos, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert run_detect(videos, "--checkpoint", checkpoint, "--frames", "4", "--out", whole) == 0
    real, calls = detector.score_found, []

    def stopped_after_3(*a, **k):
        calls.append(a[0])
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the fourth input is scored
        return real(*a, **k)
    monkeypatch.setattr(detector, "score_found", stopped_after_3)
    out = tmp_path / "out"
    argv = [str(videos), "--checkpoint", checkpoint, "--frames", "4", "--out", str(out), "--device", "cpu"]
    assert run_cli(detect.main, argv) == 130
    assert len(os.listdir(out / "results")) == 3 * 2  # a JSON and a page for each input scored
    calls.clear()
    monkeypatch.setattr(detector, "score_found", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    capsys.readouterr()
    assert run_cli(detect.main, argv) == 0
    assert len(calls) == 3 and not set(calls) & {r["filename"] for r in summary(whole)[:3]}  # only the rest
    assert "3 inputs scored (" in capsys.readouterr().out
    assert summary(out) == summary(whole)
    logged = [json.loads(line)["file"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert sorted(logged) == sorted(r["filename"] for r in summary(whole))  # each input logged once


def test_another_detector_in_the_same_out_is_one_line(tmp_path, checkpoint, videos, capsys):
    video = videos / "v0.mp4"
    out = tmp_path / "out"
    assert run_detect(video, "--checkpoint", checkpoint, "--frames", "4", "--out", out) == 0
    capsys.readouterr()
    other = detector.build("mobilenet_v3_large", 32)
    import checkpoint as ckpt_file
    ckpt_file.save_detector(str(tmp_path / "other.pt"), other.eval(), 0.5, ckpt_file.detector_config("mobilenet_v3_large", 32))
    assert run_cli(detect.main, [str(video), "--checkpoint", str(tmp_path / "other.pt"), "--frames", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds results made by another detector" in err[0] and "weights_sha256" in err[0]
    assert len(summary(out)) == 1  # the earlier results stand


def torchrun(*argv, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           os.path.join(ROOT, "detect.py"), *map(str, argv), "--device", "cpu", "--workers", "1"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)


def test_torchrun_with_two_processes_equals_one(tmp_path, checkpoint, videos):
    one = tmp_path / "one"
    assert run_detect(videos, "--checkpoint", checkpoint, "--frames", "4", "--out", one) == 0
    two = tmp_path / "two"
    result = torchrun(videos, "--checkpoint", checkpoint, "--frames", "4", "--out", two)
    assert result.returncode == 0, result.stderr[-2000:]
    assert summary(two) == summary(one)
    assert (two / "frames.csv").read_text() == (one / "frames.csv").read_text()
    # each process scored its own half, and logged it
    halves = [[json.loads(line)["file"] for line in (two / name).read_text().splitlines()] for name in ("log.jsonl", "log.1.jsonl")]
    assert sorted(halves[0] + halves[1]) == sorted(r["filename"] for r in summary(one)) and all(len(h) == 3 for h in halves)


def processes_with(marker):
    """The pids of the processes whose environment holds marker (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def maps_torch(pid):
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the workers through Linux's /proc")
def test_a_killed_run_loses_nothing_it_wrote_and_leaves_no_worker(tmp_path, checkpoint, videos):
    whole = tmp_path / "whole"
    assert run_detect(videos, "--checkpoint", checkpoint, "--frames", "4", "--out", whole) == 0
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(ROOT, "detect.py"), str(videos), "--checkpoint", checkpoint, "--frames", "4",
            "--out", str(out), "--device", "cpu", "--workers", "1"]
    marker = f"detect-test-{os.getpid()}-{time.time()}"  # in the environment of the run, its workers and their server
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DETECT_TEST_MARKER": marker}
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and len([n for n in os.listdir(out / "results") if n.endswith(".json")] if (out / "results").exists() else []) < 2:
        time.sleep(0.02)
    running = processes_with(marker)
    with_torch = [pid for pid in running if maps_torch(pid)]
    assert len(with_torch) == 1 and len(running) >= 3  # torch in the main process alone: not in the worker nor its server
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.csv").exists()  # killed before the end
    deadline = time.time() + 10
    while processes_with(marker) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_with(marker), "a worker outlived the run it worked for"
    assert subprocess.run(argv, capture_output=True, env=env, cwd=ROOT, timeout=120).returncode == 0
    assert summary(out) == summary(whole)


def test_help_loads_no_torch():
    code = ("import runpy, sys; sys.argv = ['detect.py', '--help']\n"
            "try:\n    runpy.run_path('detect.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip().endswith("no torch") and "--workers" in result.stdout
