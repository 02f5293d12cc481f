"""Score the faces in videos and images as real or generated, with a trained detector.

    python detect.py clip.mp4 --checkpoint runs/generative_model/001-celeba-64
    python detect.py videos/ photo.jpg --checkpoint RUN --out report --annotate
    python detect.py crops/ --faces none --checkpoint RUN      # inputs that are already face crops
    python detect.py videos/real --extract faces/real           # face crops for training, no model

A score is P(fake) = sigmoid(-logit) of the detector (detector.py). A frame's score is its
highest face score; a video's score is the mean over the sampled frames that show a face,
and its verdict compares that with the detector's threshold.
"""

import csv
import json
import os
import sys
from fractions import Fraction

import cv2
import numpy as np
from tqdm import tqdm

import av
from checkpoint import load_detector
from cli import ArgumentParser, UserError, add_device_flag, at_least, pick_device, probability, run_cli
from data import IMAGE_EXTENSIONS, list_images
from detector import NO_FACE, score_input
import faces
from faces import face_crops
from video import VIDEO_EXTENSIONS, input_frames, media_kind, read_image

def get_args_parser():
    p = ArgumentParser(description="Score the faces in videos and images as real or generated (P(fake)).")
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_IMAGE_OR_FOLDER",
                   help="videos (mp4, avi, mov, mkv, webm), images, or folders searched recursively")
    p.add_argument("--checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder, its checkpoint.pt or detector.pt; the fine-tuned detector is used when the run has one, else the GAN's discriminator")
    g = p.add_argument_group("frames and faces")
    sampling = g.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=at_least(1), default=32, help="frames per video, spread evenly from first to last")
    sampling.add_argument("--every", type=at_least(1), default=None, metavar="K", help="instead: every K-th frame (--every 1: all of them)")
    faces.add_flags(g, at_least)
    g = p.add_argument_group("scoring")
    g.add_argument("--threshold", type=probability, default=None, help="call a video fake at this score or above; None: the threshold stored with the detector")
    g.add_argument("--batch", type=at_least(1), default=64, help="face crops per forward pass")
    add_device_flag(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None, help="write summary.csv, frames.csv and one JSON per input here")
    g.add_argument("--annotate", action="store_true", help="also write a copy of each input into --out with the faces boxed, coloured by score")
    g.add_argument("--tensorboard", metavar="DIR", default=None, help="log each video's per-frame scores to TensorBoard in DIR")
    g.add_argument("--extract", metavar="DIR", default=None,
                   help="write the face crops as PNG into DIR instead of scoring (no checkpoint needed); build real/ and fake/ folders for --detector-data")
    return p


# -----------------------------------------------------------------------------
# inputs

def list_inputs(paths):
    """Command-line paths -> [(path, kind or None, problem or None)], folders expanded recursively.

    A file named on the command line with an unknown extension is a failed input; inside a
    folder it is passed over, since folders hold notes and thumbnails.
    """
    found = []
    for path in paths:
        if os.path.isdir(path):
            found += [(f, media_kind(f), None) for f in list_images(path, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)]
        elif not os.path.exists(path):
            found.append((path, None, "does not exist"))
        elif media_kind(path) is None:
            found.append((path, None, "is not a video (mp4, avi, mov, mkv, webm) or an image (jpg, jpeg, png, webp, bmp)"))
        else:
            found.append((path, media_kind(path), None))
    return found


def unique_stem(path, taken):
    """A file name stem for this input's outputs that no other input has taken."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


# -----------------------------------------------------------------------------
# outputs

SUMMARY_FIELDS = ("filename", "label", "score", "verdict", "frames", "frames_with_face", "frames_without_face", "faces",
                  "share_above_threshold", "threshold", "detector", "error")


def summary_row(result, detector_kind):
    """The filename,label,score of deepfake benchmarks (label 1 = fake, 0 = real, empty = no verdict) and ours."""
    if "error" in result:
        return {"filename": result["file"], "verdict": "error", "error": result["error"], "detector": detector_kind}
    score = result["score"]
    return {"filename": result["file"], "label": "" if score is None else int(result["verdict"] == "fake"),
            "score": "" if score is None else f"{score:.6f}", "verdict": result["verdict"], "frames": result["frames_scored"],
            "frames_with_face": result["frames_with_face"], "frames_without_face": result["frames_without_face"],
            "faces": result["faces"], "threshold": result["threshold"], "detector": detector_kind,
            "share_above_threshold": "" if result["share_above_threshold"] is None else f"{result['share_above_threshold']:.4f}"}


def write_reports(results, out_dir, detector_kind, stems):
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(summary_row(r, detector_kind) for r in results)
    with open(os.path.join(out_dir, "frames.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("filename", "frame", "time", "face", "x", "y", "w", "h", "score"))
        for r in results:
            for fr in r.get("frames", []):
                if not fr["faces"]:  # a row for the frame all the same, so no-face frames are counted
                    w.writerow((r["file"], fr["index"], fr["time"], "", "", "", "", "", ""))
                for k, face in enumerate(fr["faces"]):
                    w.writerow((r["file"], fr["index"], fr["time"], k, *face["box"], f"{face['score']:.6f}"))
    for r in results:
        with open(os.path.join(out_dir, stems[r["file"]] + ".json"), "w") as f:
            json.dump({**r, "detector": detector_kind}, f, indent=1)


def score_colour(score):
    """An RGB colour: green for real (0) through yellow to red for fake (1)."""
    return (int(255 * min(1.0, 2 * score)), int(255 * min(1.0, 2 * (1 - score))), 0)


def draw_faces(frame, faces):
    frame = np.array(frame)  # a writable copy: decoded frames may be read-only, and the caller's stays clean
    thickness = max(2, frame.shape[0] // 300)
    for face in faces:
        x, y, w, h = face["box"]
        colour = score_colour(face["score"])
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, thickness)
        cv2.putText(frame, f"{face['score']:.2f}", (x, max(0, y - 2 * thickness)), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, colour, thickness)
    return frame


def annotate(result, dst):
    """Write a copy of the input with each scored face boxed; in a video, a frame shows the boxes of the last sampled frame."""
    by_index = {fr["index"]: fr["faces"] for fr in result["frames"]}
    if result["kind"] == "image":
        frame = draw_faces(read_image(result["file"]), by_index.get(0, []))
        cv2.imwrite(dst, cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        return
    with av.open(result["file"]) as src, av.open(dst, "w") as out:
        stream = src.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 25
        enc = out.add_stream("libx264", rate=rate)
        enc.width, enc.height = stream.width // 2 * 2, stream.height // 2 * 2  # yuv420p wants even sides
        enc.pix_fmt = "yuv420p"
        enc.options = {"preset": "veryfast"}  # a viewing copy: speed over size
        faces = []
        for i, frame in enumerate(src.decode(stream)):
            faces = by_index.get(i, faces)
            image = draw_faces(frame.to_ndarray(format="rgb24")[:enc.height, :enc.width], faces)
            new = av.VideoFrame.from_ndarray(image, format="rgb24")
            new.pts, new.time_base = i, Fraction(1) / rate
            out.mux(enc.encode(new))
        out.mux(enc.encode())


def print_table(results):
    width = max([len(r["file"]) for r in results] + [4])
    print(f"{'file':<{width}}  {'frames':>6}  {'no face':>7}  {'faces':>5}  {'score':>6}  {'>thr':>5}  verdict")
    for r in results:
        if "error" in r:
            print(f"{r['file']:<{width}}  {'':>6}  {'':>7}  {'':>5}  {'':>6}  {'':>5}  error: {r['error']}")
            continue
        score = "" if r["score"] is None else f"{r['score']:.3f}"
        share = "" if r["share_above_threshold"] is None else f"{r['share_above_threshold']:.0%}"
        print(f"{r['file']:<{width}}  {r['frames_scored']:>6}  {r['frames_without_face']:>7}  {r['faces']:>5}  {score:>6}  {share:>5}  {r['verdict']}")


# -----------------------------------------------------------------------------
# face crops for training

def extract(inputs, finder, args):
    """Write every face crop of every sampled frame as a PNG (lossless: training reads the crop that would be scored)."""
    os.makedirs(args.extract, exist_ok=True)
    failed, taken = 0, set()
    for path, kind, problem in tqdm(inputs, desc="files", unit="file", dynamic_ncols=True):
        try:
            if problem:
                raise UserError(problem)
            stem = unique_stem(path, taken)
            info, decoded = input_frames(path, kind, args.frames, args.every)
            n = 0
            for index, _, frame in tqdm(decoded, total=info["frames_sampled"], desc=os.path.basename(path), unit="frame", leave=False):
                for k, (_, _, crop) in enumerate(face_crops(frame, finder)):
                    crop.save(os.path.join(args.extract, f"{stem}_{index:06d}_{k}.png"))
                    n += 1
            tqdm.write(f"{path}: {n} face crops from {info['frames_sampled']} frames" + (" (no face found)" if n == 0 else ""))
        except UserError as e:
            failed += 1
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
    return 1 if failed else 0


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    finder, _ = faces.from_flags(args)
    inputs = list_inputs(args.inputs)
    if not inputs:
        raise UserError(f"no videos (mp4, avi, mov, mkv, webm) or images (jpg, jpeg, png, webp, bmp) in {', '.join(args.inputs)}")
    if args.extract:
        return extract(inputs, finder, args)
    if args.checkpoint is None:
        raise UserError("give --checkpoint RUN_OR_CHECKPOINT (a run folder of main.py), or --extract DIR to only write face crops")
    if args.annotate and not args.out:
        raise UserError("--annotate writes into the --out folder; give --out DIR as well")

    # the checkpoint is read, and any mismatch reported, before a single frame is decoded
    device = pick_device(args.device)
    model, threshold, detector_kind, info = load_detector(args.checkpoint, device)
    if args.threshold is not None:
        threshold = args.threshold
    print(f"detector: the {detector_kind} of {args.checkpoint} ({info['image_size']}x{info['image_size']}), "
          f"threshold {threshold:.3f}, on {device}")
    if detector_kind == "raw discriminator":
        print("note: this run has no fine-tuned detector (detector.pt), so the GAN's discriminator scores the faces")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard)

    results, stems = [], {}
    taken = set()
    for path, kind, problem in tqdm(inputs, desc="files", unit="file", dynamic_ncols=True):
        stems[path] = unique_stem(path, taken)
        try:
            if problem:
                raise UserError(problem)
            result = score_input(path, kind, model, device, info["image_size"], finder, threshold, args.frames, args.every, args.batch)
        except UserError as e:
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
            results.append({"file": path, "kind": kind, "error": str(e)})
            continue
        results.append(result)
        if result["verdict"] == NO_FACE:
            tqdm.write(f"{path}: no face found in any of its {result['frames_scored']} sampled frames, so no verdict", file=sys.stderr)
        if result["decode_errors"]:
            tqdm.write(f"warning: {path}: {result['decode_errors']} packets could not be decoded; their frames were passed over", file=sys.stderr)
        if writer is not None:
            for fr in result["frames"]:
                if fr["score"] is not None:
                    writer.add_scalar(f"score/{stems[path]}", fr["score"], fr["index"])
        if args.annotate:
            ext = ".mp4" if kind == "video" else ".png"
            annotate(result, os.path.join(args.out, stems[path] + ".annotated" + ext))
    if writer is not None:
        writer.close()

    print_table(results)
    if args.out:
        write_reports(results, args.out, detector_kind, stems)
        print(f"reports in {args.out}: summary.csv, frames.csv and one JSON per input")
    failed = sum("error" in r for r in results)
    if failed:
        print(f"{failed} of {len(results)} inputs could not be scored", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
