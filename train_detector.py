"""Train the deepfake detector of a GAN run on labelled videos, self-blended faces and the GAN's own fakes.

    python train_detector.py runs/generative_model/001-celeba-64 --data deepfakes/
    python train_detector.py RUN --data deepfakes/ --no-gan-fakes --init random   # an ablation
    python detect.py clip.mp4 --checkpoint RUN                                    # uses RUN/detector.pt

DIR holds real/ and fake/, each with videos and/or face images, searched recursively (the
shape of FaceForensics++'s original and manipulated sequences). Faces are found, sampled
and cropped exactly as detect.py does it, and cached. Videos are split into train,
validation and test parts by identity (the file stem without a trailing _N, or
--group-by: a file showing two identities joins both), never by frame. The fakes come from up to three sources:

    labelled  the faces of DIR/fake/
    sbi       self-blended faces (Shiohara & Yamasaki 2022): each real face pasted onto a
              colour-, sharpness- and scale-jittered copy of itself through a soft, deformed
              face mask, from DIR/real/ and the GAN run's real training images
    gan       samples of the run's final generator and of its per-epoch snapshots

The model is a DCGAN discriminator at --image-size, started from the run's discriminator
(the layers that fit) or from scratch. The best model and the threshold are chosen on the
validation videos' scores (the mean P(fake) of a video's faces, as detect.py scores); the
test part is scored once at the end. detector.pt keeps the threshold, the image size, the
sources, the split and both reports.
"""

import json
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import cache
import checkpoint
import data
import detector
import faces
import metrics
import reports
from cli import (ArgumentParser, UserError, add_device_flag, at_least, one_of, pick_device, probability, regex, run_cli,
                 write_atomically)
from models import IMAGE_SIZES
from video import VIDEO_EXTENSIONS, media_kind


def get_args_parser():
    p = ArgumentParser(description="Train the run's deepfake detector on labelled videos, self-blended faces and the GAN's fakes.")
    p.add_argument("run", metavar="RUN", help="a GAN run folder made by main.py")
    p.add_argument("--data", required=True, metavar="DIR", help="DIR/real/ and DIR/fake/: videos and/or face images, searched recursively")
    p.add_argument("--out", default=None, metavar="PATH", help="where to write the detector (default: RUN/detector.pt, which detect.py uses)")
    g = p.add_argument_group("faces")
    g.add_argument("--frames", type=at_least(1), default=32, help="frames sampled per video, spread evenly")
    faces.add_flags(g, at_least)
    g.add_argument("--cache-dir", default="data/cache", help="face crops are cached here, per file and settings")
    g = p.add_argument_group("split")
    g.add_argument("--group-by", type=regex, default=data.DEFAULT_GROUP, metavar="REGEX",
                   help="the identities a file shows: every match of this regex on its stem (its first group, if any); files that share "
                        "an identity stay in one part. FaceForensics++ (000_003: the frames of 000, the face of 003): --group-by '\\d+'")
    g.add_argument("--valid", type=probability, default=0.2, help="share of the files for validation (threshold and model choice)")
    g.add_argument("--test", type=probability, default=0.2, help="share of the files held out for the final test")
    g = p.add_argument_group("fakes")
    g.add_argument("--labelled-fakes", action="store_true", default=True, help="the faces of DIR/fake/")
    g.add_argument("--no-labelled-fakes", dest="labelled_fakes", action="store_false")
    g.add_argument("--sbi", action="store_true", default=True, help="self-blended faces made from the real ones")
    g.add_argument("--no-sbi", dest="sbi", action="store_false")
    g.add_argument("--gan-fakes", action="store_true", default=True, help="samples of the run's generator and its snapshots")
    g.add_argument("--no-gan-fakes", dest="gan_fakes", action="store_false")
    g.add_argument("--real-images", type=at_least(0), default=2000,
                   help="real training images of the GAN run added to the real faces (and self-blended); 0: none")
    g = p.add_argument_group("model and training")
    g.add_argument("--image-size", type=one_of(IMAGE_SIZES, "a power of two from 32 to 256"), default=128,
                   help="the detector's input side; faces in videos are hundreds of pixels wide and swap traces are fine")
    g.add_argument("--init", choices=("gan", "random"), default="gan", help="gan: start from the run's discriminator (the layers that fit)")
    g.add_argument("--steps", type=at_least(1), default=300, help="training steps (docs/detector.md says how long they took)")
    g.add_argument("--batch", type=at_least(2), default=32, help="real faces per step, plus as many fakes")
    g.add_argument("--lr", type=at_least(1e-12, float), default=2e-4, help="Adam learning rate")
    g.add_argument("--eval-every", type=at_least(1), default=50, help="score the validation videos every N steps (and keep the best)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches")
    add_device_flag(g)
    return p


# -----------------------------------------------------------------------------
# faces of the labelled videos

def load_part(items, finder, settings, args, what):
    """[(path, label)] -> [(path, label, faces uint8 (N, S, S, 3), their frame positions)]; a file that cannot be read costs one line, not the run."""
    out = []
    for path, label in tqdm(items, desc=f"faces: {what}", unit="file", dynamic_ncols=True, leave=False):
        try:
            crops, frames = cache.media_faces(path, media_kind(path), finder, settings, args.frames, args.image_size, args.cache_dir)
        except UserError as e:
            tqdm.write(f"warning: {path}: {e}; left out", file=sys.stderr)
            continue
        if len(crops) == 0:
            tqdm.write(f"warning: {path}: no face found in {args.frames} sampled frames; left out", file=sys.stderr)
            continue
        out.append((path, label, crops, frames))
    return out


def describe(part):
    real = [v for v in part if v[1] == 0]
    fake = [v for v in part if v[1] == 1]
    return {"videos_real": len(real), "videos_fake": len(fake),
            "faces_real": int(sum(len(v[2]) for v in real)), "faces_fake": int(sum(len(v[2]) for v in fake))}


def real_images(cfg, n, image_size, seed):
    """n of the GAN run's real training images, as uint8 (N, S, S, 3) at the detector's size.

    Read at the GAN's own size and scaled up exactly as its fakes are, so that softness is
    not what tells the GAN's fakes from its real images.
    """
    try:
        dataset = data.build_dataset(cfg["dataset"], cfg["data_root"], "train", cfg["image_size"], cfg["synthetic_size"])
    except UserError as e:
        raise UserError(f"the run's training images are needed for --real-images: {e}; pass --real-images 0 to go without them") from None
    images = detector.to_size(data.load_images(dataset, n, seed), image_size)
    return data.to_uint8(images).permute(0, 2, 3, 1).numpy()


def video_report(part, scores, threshold, root):
    """A part's video scores -> the metrics at the threshold, each video's score, and the real/fake pairs."""
    labels = np.array([v[1] for v in part])
    m = metrics.detection_metrics(scores, labels, threshold)
    m["videos"] = {v[0]: {"label": int(v[1]), "score": float(s)} for v, s in zip(part, scores)}
    m["pairs_fake_above_real"] = metrics.pair_wins({p: v["score"] for p, v in m["videos"].items()}, root)
    return m


# -----------------------------------------------------------------------------

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    run_dir = checkpoint.run_dir_of(args.run)
    ckpt = checkpoint.load(args.run, use="train_detector.py")
    cfg = ckpt["config"]
    out = args.out or os.path.join(run_dir, "detector.pt")
    sources = [s for s, on in zip(detector.SOURCES, (args.labelled_fakes, args.sbi, args.gan_fakes)) if on]
    if not sources:
        raise UserError("every source of fakes is switched off; keep at least one of --labelled-fakes, --sbi, --gan-fakes")
    if args.valid == 0:
        raise UserError("--valid 0 leaves no validation videos, and the model and its threshold are chosen on them; give a share above 0")
    if args.valid + args.test >= 1:
        raise UserError(f"--valid {args.valid} and --test {args.test} leave nothing to train on; keep their sum below 1")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise UserError(f"--out {out}: the folder {os.path.dirname(os.path.abspath(out))} does not exist")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)

    items = data.labelled_media(args.data, VIDEO_EXTENSIONS + data.IMAGE_EXTENSIONS)
    split, identities = data.split_by_group(items, args.group_by, args.valid, args.test, args.seed)
    finder, settings = faces.from_flags(args)
    parts = {name: load_part(part, finder, settings, args, name) for name, part in split.items()}
    for name in ("train", "valid") + (("test",) if args.test > 0 else ()):
        if {v[1] for v in parts[name]} != {0, 1}:
            raise UserError(f"after leaving out unreadable and faceless files, the {name} part lacks real or fake videos; "
                            "add videos or check the warnings above")
    # files are kept relative to DIR, so that evaluate.py --part finds them from any working folder
    report = {"sources": sources, "image_size": args.image_size, "init": args.init, "frames": args.frames, "faces": settings,
              "group_by": args.group_by, "data": os.path.abspath(args.data),
              "split": {name: {"identities": identities[name], **describe(parts[name]),
                               "files": [os.path.relpath(v[0], args.data) for v in parts[name]]} for name in parts}}
    for name in parts:
        d = report["split"][name]
        print(f"{name:>5}: {len(d['identities'])} identities, {d['videos_real']} real + {d['videos_fake']} fake videos, "
              f"{d['faces_real']} + {d['faces_fake']} faces")

    # what the batches are made of
    train = parts["train"]
    real_video = np.concatenate([v[2] for v in train if v[1] == 0])
    fake_video = np.concatenate([v[2] for v in train if v[1] == 1]) if "labelled" in sources else None
    extra = real_images(cfg, args.real_images, args.image_size, args.seed) if args.real_images and ("sbi" in sources or "gan" in sources) else None
    G, D = checkpoint.models_from(ckpt, args.run)
    generators = []
    if "gan" in sources:
        generators = [G.to(device).eval()] + checkpoint.load_snapshots(run_dir, cfg, device, exclude_epoch=ckpt["epoch"])
    model = checkpoint.build_detector(checkpoint.detector_config(cfg, args.image_size))
    if args.init == "gan":
        copied = detector.init_from(model, D)
        print(f"init: {len(copied)} of {len(model.state_dict())} tensors from the run's discriminator")
    batches = detector.Batches(real_video, fake_video, extra, generators, sources, batch=args.batch, image_size=args.image_size,
                               nz=cfg["nz"], device=device, seed=args.seed)
    print(f"training {args.steps} steps of {args.batch} real + {args.batch} fake faces at {args.image_size}x{args.image_size} "
          f"on {device}; fakes: {', '.join(sources)}" + (f"; {len(extra)} of the run's images among the reals" if extra is not None else ""))

    # Ctrl-C stops after the step in flight and keeps the best detector so far
    interrupted = []
    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        tqdm.write("stopping after this step and keeping the best detector so far (Ctrl-C again to stop at once)", file=sys.stderr)
    previous = signal.signal(signal.SIGINT, on_sigint)

    writer = reports.report_writer(os.path.join(run_dir, "detector"))  # one training's curves at a time: a new run replaces them
    bar = tqdm(total=args.steps, desc="detector", unit="step", dynamic_ncols=True)
    valid = ([(v[2], v[3]) for v in parts["valid"]], [v[1] for v in parts["valid"]])
    valid_labels = np.array(valid[1])

    def on_log(step, loss, ips):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.0f}")
        writer.add_scalar("detector/loss", loss, step)
        writer.add_scalar("detector/images_per_sec", ips, step)

    def on_eval(step, m, scores):
        bar.update(step - bar.n)
        tqdm.write(f"step {step}: validation video AUC {m['auc']:.3f}, AP {m['ap']:.3f}")
        writer.add_scalar("detector/valid_auc", m["auc"], step)
        writer.add_scalar("detector/valid_ap", m["ap"], step)
        writer.add_pr_curve("detector/valid_pr", torch.from_numpy(valid_labels).bool(), torch.from_numpy(np.nan_to_num(scores)), step)
        writer.add_image("detector/valid_scores", reports.score_chart(scores, valid_labels), step)  # real and fake on one chart
        writer.add_image("detector/valid_roc", reports.roc_chart(scores, valid_labels), step)

    t0 = time.time()
    try:
        model, best_auc, best_step, last_step = detector.train_detector(
            model, batches, valid, steps=args.steps, lr=args.lr, device=device, eval_every=args.eval_every,
            on_eval=on_eval, on_log=on_log, should_stop=lambda: bool(interrupted))
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    minutes = (time.time() - t0) / 60

    valid_scores = detector.video_scores(model, valid[0], device)
    threshold = metrics.pick_threshold(valid_scores, valid_labels)
    report["valid"] = video_report(parts["valid"], valid_scores, threshold, args.data)
    report["training"] = {"steps": last_step, "best_step": best_step, "batch": args.batch, "lr": args.lr, "minutes": round(minutes, 1),
                          "device": str(device), "interrupted": bool(interrupted)}
    if parts["test"]:
        test_scores = detector.video_scores(model, [(v[2], v[3]) for v in parts["test"]], device)
        report["test"] = video_report(parts["test"], test_scores, threshold, args.data)
        writer.add_scalar("detector/test_auc", report["test"]["auc"], best_step)
        writer.add_image("detector/test_scores", reports.score_chart(test_scores, [v[1] for v in parts["test"]], threshold), best_step)
    writer.close()
    checkpoint.save_detector(out, model.cpu(), threshold, cfg, checkpoint.detector_config(cfg, args.image_size), method="trained", **report)
    write_atomically(os.path.splitext(out)[0] + ".json", lambda f: f.write(json.dumps(report, indent=1).encode()))

    print(f"best validation video AUC {best_auc:.3f} at step {best_step} of {last_step} ({minutes:.1f} min); "
          f"threshold on P(fake) {threshold:.4g}, picked on {len(valid[0])} validation videos")
    print(reports.video_table({k: report[k] for k in ("valid", "test") if k in report}))
    print(f"wrote {out} and {os.path.splitext(out)[0]}.json; TensorBoard: tensorboard --logdir {run_dir}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
