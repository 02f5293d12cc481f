"""Score the faces in videos and images as real or generated, with a trained detector.

    python detect.py clip.mp4 --checkpoint runs/generative_model/001-celeba-64
    python detect.py videos/ photo.jpg --checkpoint RUN --out report --annotate
    python detect.py crops/ --faces none --checkpoint RUN      # inputs that are already face crops
    python detect.py videos/real --extract faces/real           # face crops for training, no model

A score is P(fake) = sigmoid(logit) of the detector (detector.py). Faces are followed
across the sampled frames, and only the main track (--max-faces tracks) counts: a frame's
score is its highest score among them; a video's score is the mean over the sampled frames
that show such a face, and its verdict compares that with the detector's threshold.
--out gets summary.csv (filename,label = P(fake), as DFDC's files have it), frames.csv, one
JSON per input and report.html, a page that opens offline.
"""

import base64
import csv
import html
import io
import json
import os
import sys
from fractions import Fraction

import cv2
import numpy as np
from tqdm import tqdm

import av
from checkpoint import SHIPPED_DETECTOR, load_detector
from cli import (ArgumentParser, UserError, add_device_flag, at_least, make_folder, pick_device, probability, run_cli, write_atomically,
                 write_text)
from data import IMAGE_EXTENSIONS, list_images
from detector import FRAMING, NO_FACE, score_input
import faces
from faces import media_faces
from PIL import Image
from video import VIDEO_EXTENSIONS, all_frames, check_input, media_kind, read_image

def get_args_parser():
    p = ArgumentParser(description="Score the faces in videos and images as real or generated (P(fake)).")
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_IMAGE_OR_FOLDER",
                   help="videos (mp4, avi, mov, mkv, webm), images, or folders searched recursively")
    p.add_argument("--checkpoint", metavar="RUN_OR_DETECTOR",
                   help="a run folder of train_detector.py or main.py, or a detector.pt (default: the detector that ships with the "
                        "project, detectors/default.pt); a GAN run without detector.pt is scored by its discriminator")
    g = p.add_argument_group("frames and faces")
    sampling = g.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=at_least(1), default=None,
                          help="frames per video, spread evenly from first to last (default: the detector's, 32)")
    sampling.add_argument("--every", type=at_least(1), default=None, metavar="K", help="instead: every K-th frame (--every 1: all of them)")
    faces.add_flags(g, at_least, stored=True)
    g = p.add_argument_group("scoring")
    g.add_argument("--threshold", type=probability, default=None, help="call a video fake at this score or above; None: the threshold stored with the detector")
    g.add_argument("--batch", type=at_least(1), default=64, help="face crops per forward pass")
    add_device_flag(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None, help="write summary.csv, frames.csv, one JSON per input and report.html here")
    g.add_argument("--annotate", action="store_true",
                   help="also write a copy of each input into --out with the faces boxed and scored: green below the threshold, red at or above")
    g.add_argument("--tensorboard", metavar="DIR", default=None, help="log each video's per-frame scores to TensorBoard in DIR")
    g.add_argument("--extract", metavar="DIR", default=None,
                   help="write the face crops of the main tracks as PNG into DIR instead of scoring, framed as train_detector.py frames "
                        "a video's faces (or as --checkpoint's detector does); real/ and fake/ folders of them are train_detector.py --data")
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
        elif not os.path.isfile(path):  # a FIFO or a device: said as what it is, whatever its name
            try:
                check_input(path)
            except UserError as e:
                found.append((path, None, str(e)))
            else:
                found.append((path, media_kind(path), None))
        elif media_kind(path) is None:
            found.append((path, None, "is not a video (mp4, avi, mov, mkv, webm) or an image (jpg, jpeg, png, webp, bmp)"))
        else:
            found.append((path, media_kind(path), None))
    return found


def unique_stem(path, taken):
    """A file name stem for this input's outputs that no other input has taken."""
    base = os.path.basename(path)
    ext = next((e for e in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS if base.lower().endswith(e)), os.path.splitext(base)[1])
    # '.mp4' and '..mp4' are videos too; their stems, '' and '.', would make the outputs hidden files or '..json'
    stem = base[:len(base) - len(ext)].strip(". ") or "unnamed"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


# -----------------------------------------------------------------------------
# outputs

SUMMARY_FIELDS = ("filename", "label", "verdict", "frames", "frames_with_face", "frames_without_face", "faces", "faces_left_out",
                  "share_above_threshold", "threshold", "seconds", "detector", "error")


def summary_row(result, detector_kind):
    """DFDC's filename,label with label = P(fake) (empty when no face gave a score), then ours.

    Numbers are written whole (Python writes the shortest text that reads back as the same
    float): rounded, the tiny scores of a confident detector all read 0, and an AUC computed
    from the file would differ from ours (docs/detect.md).
    """
    if "error" in result:
        return {"filename": result["file"], "verdict": "error", "error": result["error"], "detector": detector_kind}
    row = {k: result[k] for k in ("verdict", "frames_with_face", "frames_without_face", "faces", "faces_left_out", "threshold", "seconds")}
    none_empty = lambda v: "" if v is None else v
    return {**row, "filename": result["file"], "label": none_empty(result["score"]), "frames": result["frames_scored"],
            "share_above_threshold": none_empty(result["share_above_threshold"]), "detector": detector_kind}


def write_reports(results, out_dir, detector_kind, stems, thumbnails):
    summary = csv_text(SUMMARY_FIELDS, [summary_row(r, detector_kind) for r in results])
    write_text(os.path.join(out_dir, "summary.csv"), summary)
    write_text(os.path.join(out_dir, "frames.csv"), csv_text(None, frame_rows(results)))
    for r in results:
        write_text(os.path.join(out_dir, stems[r["file"]] + ".json"), json.dumps({**r, "detector": detector_kind}, indent=1))
    write_text(os.path.join(out_dir, "report.html"), html_report(results, detector_kind, thumbnails))


def csv_text(fields, rows):
    """CSV as text: rows of dicts under a header of fields, or, without fields, plain rows whose first is the header."""
    buffer = io.StringIO(newline="")
    if fields:
        w = csv.DictWriter(buffer, fieldnames=fields)
        w.writeheader()
    else:
        w = csv.writer(buffer)
    w.writerows(rows)
    return buffer.getvalue()


def frame_rows(results):
    """frames.csv: a row per face found, counted (on a main track) or not, and a row for each frame without a face."""
    yield ("filename", "frame", "time", "face", "x", "y", "w", "h", "score", "track", "counted")
    for r in results:
        for fr in r.get("frames", []):
            if not fr["faces"]:  # a row for the frame all the same, so no-face frames are counted
                yield (r["file"], fr["index"], fr["time"], "", "", "", "", "", "", "", "")
            for k, face in enumerate(fr["faces"]):
                yield (r["file"], fr["index"], fr["time"], k, *face["box"], face["score"], face.get("track", ""), 1)
            for face in fr.get("others", []):  # scored, but not on a main track
                yield (r["file"], fr["index"], fr["time"], "", *face["box"], face["score"], face["track"], 0)


# -----------------------------------------------------------------------------
# report.html: one self-contained page (images inlined), so it can be mailed or opened offline

GREEN, RED, GREY = (0, 200, 0), (230, 0, 0), (160, 160, 160)


def score_colour(score, threshold):
    """RGB: red at or above the threshold (called fake), green below: the colour says what the verdict says."""
    return RED if score >= threshold else GREEN


def css(rgb):
    return "#%02x%02x%02x" % rgb


def score_plot(frames, threshold, duration, width=320, height=70):
    """An inline SVG of the per-frame score (0 at the bottom, 1 at the top) over time, the threshold dashed.

    Written out rather than drawn with matplotlib: a polyline and a few marks are a dozen
    lines, and matplotlib would slow detect.py's start and make the page much larger (docs/detect.md).
    """
    x = lambda t: 4 + (width - 8) * (t / duration if duration > 0 else 0.5)
    y = lambda s: 4 + (height - 8) * (1 - s)
    scored = [fr for fr in frames if fr["score"] is not None]
    marks = [f'<line x1="0" x2="{width}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" stroke="#888" stroke-dasharray="4 3"/>']
    if len(scored) > 1:
        points = " ".join(f"{x(fr['time']):.1f},{y(fr['score']):.1f}" for fr in scored)
        marks.append(f'<polyline points="{points}" fill="none" stroke="#444" stroke-width="1"/>')
    for fr in scored:
        marks.append(f'<circle cx="{x(fr["time"]):.1f}" cy="{y(fr["score"]):.1f}" r="2.5" fill="{css(score_colour(fr["score"], threshold))}">'
                     f'<title>frame {fr["index"]}, {fr["time"]:.2f} s: {fr["score"]:.3f}</title></circle>')
    for fr in frames:  # a tick on the axis where no face was found
        if fr["score"] is None:
            marks.append(f'<line x1="{x(fr["time"]):.1f}" x2="{x(fr["time"]):.1f}" y1="{height - 4}" y2="{height}" stroke="#c00"/>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="score per frame"><rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>{"".join(marks)}</svg>')


def data_uri(pixels):
    buffer = io.BytesIO()
    # JPEG at 90: a fraction of PNG's size, so a page of many videos stays small, and no visible difference at 40 px
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def crop_strip(result, thumbnails, most=12):
    """Up to `most` of the scored face crops, spread over the input, each framed in its score's colour."""
    crops = thumbnails.get(result["file"], {})
    faces = [(fr, face) for fr in result["frames"] for face in fr["faces"] if (fr["index"], face["track"]) in crops]
    if len(faces) > most:
        faces = [faces[round(i * (len(faces) - 1) / (most - 1))] for i in range(most)]
    return '<div class="strip">' + "".join(
        f'<figure><img src="{data_uri(crops[fr["index"], face["track"]])}" '
        f'style="border-color:{css(score_colour(face["score"], result["threshold"]))}" alt="frame {fr["index"]}">'
        f'<figcaption>{face["score"]:.2f}</figcaption></figure>' for fr, face in faces) + "</div>"


def html_report(results, detector_kind, thumbnails):
    rows = []
    for r in results:
        name = html.escape(r["file"])
        if "error" in r:
            rows.append(f'<tr><td><div class="file">{name}</div></td><td class="verdict">error</td><td></td>'
                        f'<td colspan="2">{html.escape(r["error"])}</td></tr>')
            continue
        colour = css(GREY) if r["score"] is None else css(score_colour(r["score"], r["threshold"]))
        score = "" if r["score"] is None else f'{r["score"]:.3f}'
        duration = r["frames_total"] / r["fps"] if r["fps"] else max([fr["time"] for fr in r["frames"]] + [0])
        detail = (f'{r["frames_with_face"]} of {r["frames_scored"]} frames with a face, threshold {r["threshold"]:.3f}, '
                  f'{r["seconds"]:.1f} s')
        rows.append(f'<tr><td><div class="file">{name}</div><div class="detail">{detail}</div></td>'
                    f'<td class="verdict" style="color:{colour}">{html.escape(r["verdict"])}</td><td class="score">{score}</td>'
                    f'<td>{score_plot(r["frames"], r["threshold"], duration)}</td><td>{crop_strip(r, thumbnails)}</td></tr>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>detect.py report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 6px 10px; vertical-align: middle; text-align: left; }}
.file {{ max-width: 20em; word-break: break-all; }}
.detail {{ color: #777; font-size: 0.8em; }}
td.verdict {{ font-weight: bold; }}
td.score {{ font-variant-numeric: tabular-nums; }}
.strip {{ display: flex; flex-wrap: wrap; gap: 3px; max-width: 520px; }}
figure {{ margin: 0; text-align: center; font-size: 0.7em; color: #555; }}
figure img {{ width: 40px; height: 40px; border: 3px solid; display: block; image-rendering: pixelated; }}
</style></head><body>
<h1>detect.py report</h1>
<p>Detector: {html.escape(detector_kind)}. A score is P(fake); red at or above the threshold (called fake), green below.
The plot shows each sampled frame's score over the video's time, the threshold dashed, red ticks where no face was found;
the crops are what the model saw.</p>
<table><tr><th>input</th><th>verdict</th><th>score</th><th>score per frame</th><th>scored faces</th></tr>
{"".join(rows)}
</table></body></html>
"""


def draw_faces(frame, faces, threshold):
    """Box each face in its score's colour with the score beside it; faces left out of the main track in grey."""
    frame = np.array(frame)  # a writable copy: decoded frames may be read-only, and the caller's stays clean
    thickness = max(2, frame.shape[0] // 300)
    for face, counted in faces:
        x, y, w, h = face["box"]
        colour = score_colour(face["score"], threshold) if counted else GREY
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, thickness if counted else max(1, thickness // 2))
        cv2.putText(frame, f"{face['score']:.2f}", (x, max(0, y - 2 * thickness)), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, colour, thickness)
    return frame


def annotate(result, dst):
    """Write a copy of the input with each scored face boxed; in a video, a frame shows the boxes of the last sampled frame."""
    by_index = {fr["index"]: [(f, True) for f in fr["faces"]] + [(f, False) for f in fr.get("others", [])] for fr in result["frames"]}
    threshold = result["threshold"]
    if result["kind"] == "image":
        frame = draw_faces(read_image(result["file"]), by_index.get(0, []), threshold)
        write_atomically(dst, lambda f: Image.fromarray(frame).save(f, format="PNG"))
    else:
        write_atomically(dst, lambda f: boxed_video(result["file"], f, by_index, threshold))


def boxed_video(path, f, by_index, threshold):
    """The video at path, every frame, into the file f as H.264, with the boxes of {frame index: faces} drawn in."""
    rate, frames = all_frames(path)  # upright: the boxes were found on the turned frames
    with av.open(f, "w", format="mp4") as out:
        enc, faces = None, []
        for i, _, image in frames:
            if enc is None:
                enc = out.add_stream("libx264", rate=rate)
                enc.width, enc.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2  # yuv420p wants even sides
                enc.pix_fmt = "yuv420p"
                enc.options = {"preset": "veryfast"}  # a viewing copy: speed over size
            faces = by_index.get(i, faces)
            image = draw_faces(image[:enc.height, :enc.width], faces, threshold)
            new = av.VideoFrame.from_ndarray(image, format="rgb24")
            new.pts, new.time_base = i, Fraction(1) / rate
            out.mux(enc.encode(new))
        if enc is not None:
            out.mux(enc.encode())


def annotated_path(out_dir, stem, ext, inputs):
    """Where the annotated copy goes: STEM.annotated.EXT, or a numbered name where that is one of the inputs."""
    path, n = os.path.join(out_dir, f"{stem}.annotated{ext}"), 1
    while os.path.realpath(path) in inputs:  # --out may be the input folder, holding a copy from an earlier run
        n += 1
        path = os.path.join(out_dir, f"{stem}.annotated_{n}{ext}")
    return path


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
    """Write the face crops of the main tracks of every input as PNG (lossless), as finder frames them (main: as --checkpoint's
    detector does, or as train_detector.py frames a video's faces), so that a folder of them can be trained on as face crops."""
    make_folder(args.extract, "--extract folder")
    failed, taken = 0, set()
    for path, kind, problem in tqdm(inputs, desc="files", unit="file", dynamic_ncols=True):
        try:
            if problem:
                raise UserError(problem)
            stem = unique_stem(path, taken)
            info, records = media_faces(path, kind, finder, frames=args.frames, every=args.every, progress=True)
            n = 0
            for r in records:
                for face in r["faces"]:
                    crop = face["pixels"]
                    write_atomically(os.path.join(args.extract, f"{stem}_{r['index']:06d}_{face['track']}.png"),
                                     lambda f: crop.save(f, format="PNG"))
                    n += 1
            tqdm.write(f"{path}: {n} face crops from {info['frames_sampled']} frames" + (" (no face found)" if n == 0 else ""))
        except UserError as e:
            failed += 1
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
    return 1 if failed else 0


# -----------------------------------------------------------------------------

def finder_for(args, info):
    """The face finder and frame sampling the detector was trained with, unless a flag overrides them."""
    stored = info.get("faces", {})
    for key, default in (("faces", "auto"), ("detect_size", 320), ("max_faces", 1)):
        if getattr(args, key) is None:
            setattr(args, key, stored.get(key, default))
    if args.frames is None and args.every is None:
        args.frames = info.get("frames", 32)
    return faces.from_flags(args, info.get("framing"))[0]


def open_detector(args):
    """--checkpoint's detector, or the shipped one -> (model, threshold, kind, info, device), read before any frame is decoded."""
    device = pick_device(args.device)
    source = args.checkpoint or SHIPPED_DETECTOR
    if args.checkpoint is None and not os.path.isfile(SHIPPED_DETECTOR):
        raise UserError(f"the detector that ships with the project, {SHIPPED_DETECTOR}, is missing; restore it with "
                        "git checkout, or give --checkpoint RUN (a run folder of train_detector.py or main.py)")
    model, threshold, kind, info = load_detector(source, device)
    if args.threshold is not None:
        threshold = args.threshold
    print(f"detector: the {kind} ({info['arch']}, {info['image_size']}x{info['image_size']}) of {source}, "
          f"threshold {threshold:.3f}, on {device}")
    if kind == "raw discriminator":
        print("note: this run has no fine-tuned detector (detector.pt), so the GAN's discriminator scores the faces")
    return model, threshold, kind, info, device


def score_all(inputs, args, model, threshold, info, device, finder, writer):
    """Score every input in turn; a bad one costs one line. -> (results, stems, thumbnails, annotations that failed)."""
    results, stems, thumbnails, taken = [], {}, {}, set()
    input_paths = {os.path.realpath(p) for p, _, _ in inputs}
    failed_annotations = 0
    for path, kind, problem in tqdm(inputs, desc="files", unit="file", dynamic_ncols=True):
        stems[path] = unique_stem(path, taken)
        try:
            if problem:
                raise UserError(problem)
            result = score_input(path, kind, model, device, info["image_size"], finder, threshold, args.frames, args.every, args.batch,
                                 thumbnails=thumbnails.setdefault(path, {}) if args.out else None)
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
            dst = annotated_path(args.out, stems[path], ".mp4" if kind == "video" else ".png", input_paths)
            try:
                annotate(result, dst)
            except (OSError, av.FFmpegError, UserError) as e:  # the scores stand; only the viewing copy is lost
                failed_annotations += 1
                tqdm.write(f"error: {path}: the annotated copy {dst} could not be written ({getattr(e, 'strerror', None) or e})",
                           file=sys.stderr)
    return results, stems, thumbnails, failed_annotations


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    inputs = list_inputs(args.inputs)
    if not inputs:
        raise UserError(f"no videos (mp4, avi, mov, mkv, webm) or images (jpg, jpeg, png, webp, bmp) in {', '.join(args.inputs)}")
    if args.extract:  # framed as the given detector frames a face, else as train_detector.py frames a video's faces
        info = load_detector(args.checkpoint)[3] if args.checkpoint else {"framing": FRAMING}
        return extract(inputs, finder_for(args, info), args)
    if args.annotate and not args.out:
        raise UserError("--annotate writes into the --out folder; give --out DIR as well")
    model, threshold, detector_kind, info, device = open_detector(args)
    finder = finder_for(args, info)
    if args.out:
        make_folder(args.out, "--out folder")
    writer = None
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        make_folder(args.tensorboard, "--tensorboard folder")
        writer = SummaryWriter(args.tensorboard)
    try:
        results, stems, thumbnails, failed_annotations = score_all(inputs, args, model, threshold, info, device, finder, writer)
    finally:
        if writer is not None:
            writer.close()
    print_table(results)
    if args.out:
        write_reports(results, args.out, detector_kind, stems, thumbnails)
        print(f"reports in {args.out}: summary.csv, frames.csv, report.html and one JSON per input")
    failed = sum("error" in r for r in results)
    if failed:
        print(f"{failed} of {len(results)} inputs could not be scored", file=sys.stderr)
    return 1 if failed or failed_annotations else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
