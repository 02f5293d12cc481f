"""Measure a trained GAN: how good its faces are and how well its fakes are caught.

    python evaluate.py runs/generative_model/001-celeba-64                      # metrics.json, TensorBoard
    python evaluate.py runs/generative_model/001-celeba-64 --detector-steps 2000  # (re)fine-tune detector.pt first
    python evaluate.py RUN --inception-weights weights-inception-2015-12-05-6726825d.pth   # adds FID and KID
    python evaluate.py RUN --dataset folder --data-root other/faces --out reports/other    # a report on other data
    python evaluate.py RUN --videos deepfakes/ --part test   # the detector, per video, on its held-out identities
    python evaluate.py RUN --videos other_dataset/           # ... or on any folder of real*/ and fake*/ videos

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
from cli import ArgumentParser, UserError, add_device_flag, at_least, pick_device, run_cli, write_text
from main import Config
from video import VIDEO_EXTENSIONS, media_kind


# -----------------------------------------------------------------------------
# the command

def get_args_parser():
    p = ArgumentParser(description="Evaluate a trained GAN: SWD (and FID/KID), the raw D, a fine-tuned detector and the spectrum baseline.")
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder or its checkpoint.pt; results are written next to it unless --out is given")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write metrics.json, TensorBoard and a fine-tuned detector.pt here instead (for reports on other data); "
                        "a detector.pt here is used before the run's")
    p.add_argument("--detector-steps", type=at_least(0), default=0,
                   help="fine-tune a new detector.pt for this many steps first (0: use the one in --out or the run's, if there is one)")
    p.add_argument("--detector-data", default=None, metavar="DIR",
                   help="extra labelled faces for fine-tuning: DIR/real/ and DIR/fake/ (e.g. FaceForensics++ crops)")
    p.add_argument("--eval-images", type=at_least(2), default=1000, help="valid and test images used (each split)")
    p.add_argument("--inception-weights", default=None, metavar="PATH",
                   help=f"Inception-v3 2015-12-05 weights for FID/KID ({metrics.INCEPTION_URL}); without them FID is skipped")
    p.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default=None, help="override the run's dataset")
    p.add_argument("--data-root", default=None, help="override the run's data root (the data moved)")
    p.add_argument("--workers", type=at_least(0), default=None, help="DataLoader processes (default: the run's)")
    g = p.add_argument_group("the detector on labelled videos (instead of the GAN report)")
    g.add_argument("--videos", default=None, metavar="DIR",
                   help="score every video under DIR's real*/ and fake*/ subfolders with the run's detector, as detect.py does, and report per video: "
                        "AUC, AP, EER, accuracy and false alarms at the stored threshold, per subfolder and overall")
    g.add_argument("--cache-dir", default="data/cache", help="face crops are cached here, as train_detector.py caches them")
    g.add_argument("--part", choices=("train", "valid", "test"), default=None,
                   help="with --videos: only the files of this part of the split stored in detector.pt (its data folder)")
    add_device_flag(p)
    return p


def evaluate_videos(args):
    """--videos DIR: the detector's video-level report, as JSON beside detector.pt and a table."""
    device = pick_device(args.device)
    model, threshold, kind, info = checkpoint.load_detector(args.run, device)
    items = data.labelled_media(args.videos, VIDEO_EXTENSIONS + data.IMAGE_EXTENSIONS, loose=True)
    if args.part:
        if "split" not in info:
            raise UserError(f"--part needs a detector.pt written by train_detector.py (it stores the split); {args.run} has a {kind}")
        chosen = set(info["split"][args.part]["files"])  # relative to the folder the detector was trained on
        items = [(p, label) for p, label in items if os.path.relpath(p, args.videos) in chosen]
        if not items:
            raise UserError(f"none of the files under {args.videos} is in the detector's {args.part} part (it was trained on {info['data']})")
    settings = info.get("faces", {"faces": "haar", "max_faces": 1, "detect_size": 320})
    frames = info.get("frames", 32)
    finder, settings = faces.from_flags(argparse.Namespace(**settings))
    cache_dir = args.cache_dir
    scores = []
    for path, _ in tqdm(items, desc="videos", unit="video", dynamic_ncols=True):
        try:
            crops, positions = cache.media_faces(path, media_kind(path), finder, settings, frames, info["image_size"], cache_dir)
        except UserError as e:
            tqdm.write(f"warning: {path}: {e}; left out", file=sys.stderr)
            crops, positions = np.zeros((0,)), np.zeros((0,))
        scores.append(detector.video_scores(model, [(crops, positions)], device)[0])
    report = reports.video_evaluation(items, scores, threshold, args.videos)
    report.update(detector=kind, run=args.run, part=args.part, data=os.path.abspath(args.videos))
    print(f"{kind} of {args.run} on {len(items)} videos under {args.videos}" + (f" ({args.part} part)" if args.part else ""))
    print(reports.video_evaluation_table(report))
    # beside the detector, named after it and the folder: detector-videos-deepfakes-test.json
    det_name = "detector" if os.path.isdir(args.run) or args.run.endswith("checkpoint.pt") else os.path.splitext(os.path.basename(args.run))[0]
    name = f"{det_name}-videos-{os.path.basename(os.path.normpath(args.videos))}" + (f"-{args.part}" if args.part else "") + ".json"
    out = os.path.join(checkpoint.run_dir_of(args.run), name)
    write_text(out, json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.videos:
        return evaluate_videos(args)
    ckpt = checkpoint.load(args.run)
    path = checkpoint.resolve(args.run)
    run_dir = os.path.dirname(os.path.abspath(path))
    overrides = {key: getattr(args, key) for key in ("dataset", "data_root", "workers") if getattr(args, key) is not None}
    cfg = dataclasses.replace(Config.from_dict(ckpt["config"]), **overrides)
    device = pick_device(args.device)
    G, D = checkpoint.models_from(ckpt, path, device)
    out_dir = os.path.abspath(args.out) if args.out else run_dir
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {args.out} is a file; give a folder (it is created when missing)")
    # the run's own events file already holds the training curves (and main.py's report): the report gets a folder of its own
    tb_dir = os.path.join(run_dir, "eval") if out_dir == run_dir else out_dir
    writer = reports.report_writer(tb_dir)
    try:
        reports.evaluate_run(cfg, G, D, run_dir, step=ckpt.get("step", 0), epoch=ckpt.get("epoch"), detector_steps=args.detector_steps,
                     eval_images=args.eval_images, inception_weights=args.inception_weights,
                     detector_data=args.detector_data, device=device, writer=writer, out_dir=out_dir)
    finally:
        writer.close()
    print(f"wrote {os.path.join(out_dir, 'metrics.json')}; TensorBoard: tensorboard --logdir {tb_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
