"""Benchmarks, each against a baseline measured in the same run.

    python benchmark.py video ../shared/data/videos/real/ffpp_youtube_004.mp4
"""

import argparse
import os
import statistics
import sys
import time

import av
import torch

import detect
from detector import load_detector
from errors import UserError, run_cli
from faces import FaceFinder, open_video, sample_indices
from main import ArgumentParser, at_least
from models import Discriminator


def timed(fn, repeat):
    """Median wall time and median CPU time (all threads of this process) of fn() over `repeat` calls, and its last result.

    On a shared machine the wall time grows with other people's load; the CPU time is
    what this program itself spent, so it is printed beside it.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def load():
    return "load average {:.1f} on {} cores".format(os.getloadavg()[0], os.cpu_count())


# -----------------------------------------------------------------------------
# video: decoding, face finding and scoring (detect.py)

def decode_seeking(path, indices):
    """Baseline: seek to each sampled frame, the obvious way to take 32 frames from a video."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        step = 1 / float(stream.average_rate or stream.guessed_rate)
        got = 0
        for i in indices:
            target = round(i * step / stream.time_base) + (stream.start_time or 0)
            container.seek(target, stream=stream)  # lands on the keyframe before, then decodes up to the frame
            for frame in container.decode(stream):
                if frame.pts >= target:
                    frame.to_ndarray(format="rgb24")
                    got += 1
                    break
    return got


def decode_everything(path, indices):
    """Baseline: decode every frame in order and keep the sampled ones."""
    wanted, got = set(indices), 0
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frame.to_ndarray(format="rgb24")
                got += 1
    return got


def decode_ours(path, frames):
    _, decoded = open_video(path, frames)
    return sum(1 for _ in decoded)


def bench_video(args):
    path = args.video
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file; give a video, e.g. ../shared/data/videos/real/ffpp_youtube_004.mp4")
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, threshold, kind, cfg = load_detector(args.checkpoint)
        image_size = cfg["image_size"]
    else:  # the time does not depend on the weights, only on the network's size
        image_size, threshold, kind = 64, 0.5, "untrained 64x64 discriminator (ndf 64)"
        model = Discriminator(ndf=64, channels=3, image_size=image_size).eval()
    info, _ = open_video(path, args.frames)
    indices = sample_indices(info["frames_total"], args.frames)
    print(f"{path}: {info['width']}x{info['height']}, {info['frames_total']} frames at {info['fps']:.2f} fps; "
          f"model: {kind}; torch threads {torch.get_num_threads()}, {args.repeat} runs each, median")

    # decoding alone: ours against seeking per frame and against decoding every frame
    print(f"machine: {load()} at the start")
    t_seek, c_seek, n = timed(lambda: decode_seeking(path, indices), args.repeat)
    assert n == len(indices), f"seeking decoded {n} of {len(indices)} frames"
    t_all, c_all, n = timed(lambda: decode_everything(path, indices), args.repeat)
    assert n == len(indices)
    t_ours, c_ours, n = timed(lambda: decode_ours(path, args.frames), args.repeat)
    assert n == len(indices)
    print(f"decode {len(indices)} frames, wall (CPU): seek per frame {t_seek:.2f} s ({c_seek:.2f}), every frame {t_all:.2f} s ({c_all:.2f}), "
          f"ours {t_ours:.2f} s ({c_ours:.2f}): {t_seek / t_ours:.1f}x and {t_all / t_ours:.1f}x faster")

    # the whole pipeline, as detect.py runs it on one video (the model is already loaded)
    finder = FaceFinder(detect_size=args.detect_size, max_faces=args.max_faces)
    run = lambda frames, every: detect.score_input(path, "video", model, "cpu", image_size, finder, threshold, frames, every)
    t_video, c_video, result = timed(lambda: run(args.frames, None), args.repeat)
    verdict = f"{result['frames_with_face']} with a face, score {result['score']:.3f}" if result["score"] is not None else "no face"
    print(f"detect {len(indices)} frames (decode, find faces at {args.detect_size} px, score): {t_video:.2f} s wall, {c_video:.2f} s CPU "
          f"({'within' if t_video <= 2 else 'over'} the 2 s target); {verdict}")
    t_every, c_every, result = timed(lambda: run(None, 1), 1)
    n = result["frames_scored"]
    print(f"detect --every 1: {n} frames in {t_every:.2f} s wall, {c_every:.2f} s CPU = {n / t_every:.1f} frames/s "
          f"({n / c_every:.1f} per CPU second; real time is {info['fps']:.0f} frames/s)")
    print(f"machine: {load()} at the end")


# -----------------------------------------------------------------------------

def get_args_parser():
    p = ArgumentParser(description="Benchmarks; each prints ours against a baseline from the same run.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("video", help="detect.py on one video: decoding against two baselines, then the whole pipeline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("video", help="a video file, e.g. ../shared/data/videos/real/ffpp_youtube_004.mp4 (720p)")
    v.add_argument("--checkpoint", default=None, help="a run folder or checkpoint (default: an untrained 64x64 discriminator)")
    v.add_argument("--frames", type=at_least(1), default=32, help="frames sampled from the video")
    v.add_argument("--detect-size", type=at_least(64), default=320, help="as in detect.py")
    v.add_argument("--max-faces", type=at_least(1), default=1, help="as in detect.py")
    v.add_argument("--repeat", type=at_least(1), default=3, help="runs per measurement; the median is printed")
    v.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(), help="torch CPU threads")
    v.set_defaults(func=bench_video)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
