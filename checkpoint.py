"""The checkpoint format, written down once: what each file holds, how it is saved, read and resolved.

Every file is one dict saved with torch.save and read with weights_only=True (a pickle can
run code). Four kinds share the format, told apart by "kind":

    training           RUN/checkpoint.pt, written by main.py: config, G, D, opt_G, opt_D, epoch,
                       done_in_epoch, step, fixed_noise, rng, and scaler under fp16
    snapshot           RUN/snapshots/G_epochNNN.pt, one per epoch: config, G, epoch, step
    detector           detector.pt: detector (weights), detector_config (the network, its input
                       side, framing, face finder and frames a video), threshold on P(fake), and
                       how it was made; written by main.py's end-of-run report and train_detector.py
    detector_training  training.pt of train_detector.py: args, model, opt, schedule, batches,
                       progress, rng: what --resume needs

Files written before "kind" existed are recognised by their keys; format-1 detectors (a DCGAN
discriminator whose logit said real) are converted when read.
"""

import glob
import math
import os
import pickletools
import re
import warnings
import zipfile

import torch

import detector
from cli import UserError, make_folder, write_atomically, write_or_keep
from faces import CELEBA_FRAMING, FINDERS
from models import Generator, build_models

FORMAT = 2  # 2: detectors of any network, whose logit says fake
KEYS = {
    "training": ("config", "G", "D", "opt_G", "opt_D", "epoch", "done_in_epoch", "step", "fixed_noise", "rng"),
    "snapshot": ("config", "G", "epoch", "step"),
    "detector": ("detector", "threshold"),
    "detector_training": ("args", "model", "opt", "schedule", "batches", "progress", "rng"),
}
SHAPE_KEYS = ("nz", "ngf", "ndf", "channels", "image_size")  # what a run's networks are built from
# The detector detect.py uses when given none: trained by the README's recipe (detectors/README.md says on what).
SHIPPED_DETECTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "detectors", "default.pt")


def save(state, path, kind, keep=False):
    """Write to a temporary file and rename it, so a crash mid-write never destroys the last good one.

    A full disk or an unwritable folder is the user's to fix: one sentence naming the folder,
    and no partial temporary file left behind. keep: a file that took long to make is then
    saved elsewhere (cli.write_or_keep) and the sentence says where.
    """
    missing = [k for k in KEYS[kind] if k not in state]
    assert not missing, f"a {kind} checkpoint needs {missing}"
    assert "kind" not in state and "format" not in state, "the format's own keys"
    state = {"format": FORMAT, "kind": kind, **state}
    (write_or_keep if keep else write_atomically)(path, lambda f: torch.save(state, f))


def resolve(path):
    """A run folder or a checkpoint file -> the checkpoint file."""
    if os.path.isdir(path):
        candidate = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(candidate):
            raise UserError(f"{path} holds no checkpoint.pt; point at a run folder that finished at least one epoch or was stopped with Ctrl-C")
        return candidate
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; give a run folder (runs/generative_model/NAME) or its checkpoint.pt")
    return path


def kind_of(ckpt):
    if "kind" in ckpt:
        return ckpt["kind"]
    return "detector" if "detector" in ckpt else "training" if "D" in ckpt else "snapshot"


def load(path, kinds=("training",), use="this command"):
    """Read a checkpoint file (or a run folder's checkpoint.pt), check it is one of `kinds`; returns the dict."""
    path = resolve(path)
    try:
        ckpt = _torch_load(path)
    except Exception as e:  # truncated files, other pickles, text files: all the user's to fix
        refuse_python_objects(path, "checkpoint")
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        why = type(e).__name__ + ("" if "weights_only" in str(e) else f": {first}")  # never torch's advice to turn it off
        raise UserError(f"cannot read checkpoint {path} ({why}); it may be truncated or not a PyTorch file") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or not ({"config", "kind"} & set(ckpt)):
        raise UserError(f"{path} is not a checkpoint written by this project (it has no format and config); "
                        "train one with main.py or point at a run folder")
    if ckpt["format"] > FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']}, newer than this code understands ({FORMAT}); update the code")
    kind = kind_of(ckpt)
    if kind not in kinds:
        wanted = " or ".join(f"a {k} checkpoint" for k in kinds)
        raise UserError(f"{path} is a {kind} file, but {use} needs {wanted}"
                        + ("; give the run folder or its checkpoint.pt" if "training" in kinds else ""))
    missing = [k for k in KEYS[kind] if k not in ckpt] + [k for k in SHAPE_KEYS if k not in ckpt.get("config", SHAPE_KEYS)]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, so it cannot be used; it may come from another program")
    return ckpt


def _torch_load(path):
    """torch.load with weights_only=True, without torch's warning that a pickle's protocol is not its own (a foreign pickle's
    is not): the user can do nothing with it, and it is followed by one sentence of ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True)


# What a pickle does to make an object of a class or call a function; one of plain data (dicts, lists, numbers, strings) has none.
OBJECT_OPS = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD", "EXT1", "EXT2", "EXT4"}


def refuse_python_objects(path, what):
    """After weights_only=True refused a file: one sentence of ours if it holds Python objects. Torch's own message advises
    loading it with weights_only=False, which would run whatever code they carry; a user who follows it runs an attacker's."""
    names = python_objects(path)
    if names is not None:
        listed = f" ({', '.join(names[:3])})" if names else ""
        raise UserError(f"{what} {path} holds Python objects{listed}, not only tensors and plain data; loading it could run code, "
                        "so it was not loaded")


def python_objects(path):
    """The classes and functions a file's pickle names beyond tensors and plain data ([] where they cannot be listed), or None
    where it names none or holds no pickle. The pickle is only parsed, never run."""
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: torch lists what its weights_only loader refuses
            return torch.serialization.get_unsafe_globals_in_checkpoint(path) or None
        with open(path, "rb") as f:  # a plain pickle (torch's old format begins with one holding a number)
            ops = {op.name for op, _, _ in pickletools.genops(f)}
        return [] if ops & OBJECT_OPS else None
    except Exception:  # text, a pickle cut short, a damaged zip: not ours to say more than the load did
        return None


def load_state(module, state, what, path):
    """load_state_dict(strict=True), with a one-line account of what does not fit."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise UserError(f"the {what} in {path} does not fit the model built from its config: {detail[:300]}") from None


def run_dir_of(path):
    """The run folder a path names: the folder itself, or the folder holding the file."""
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


# -----------------------------------------------------------------------------
# the training checkpoint

def models_from(ckpt, path, device="cpu"):
    """Rebuild G and D with a training checkpoint's shape and load their weights."""
    G, D = build_models(ckpt["config"])
    load_state(G, ckpt["G"], "generator", path)
    load_state(D, ckpt["D"], "discriminator", path)
    return G.to(device), D.to(device)


# -----------------------------------------------------------------------------
# generator snapshots, kept during training for the detector's fakes

def save_snapshot(G, cfg, epoch, step, run_dir):
    """A small G-only file per epoch: snapshots/G_epochNNN.pt."""
    make_folder(os.path.join(run_dir, "snapshots"), "snapshot folder")
    save({"config": cfg, "G": G.state_dict(), "epoch": epoch, "step": step},
         os.path.join(run_dir, "snapshots", f"G_epoch{epoch:03d}.pt"), "snapshot")


def load_snapshots(run_dir, cfg, device, exclude_epoch=None):
    """Every snapshot in run_dir/snapshots (but exclude_epoch's, usually the final G itself), generators in eval mode."""
    gens = []
    for path in sorted(glob.glob(os.path.join(run_dir, "snapshots", "G_epoch*.pt"))):
        if int(re.search(r"(\d+)\.pt$", path).group(1)) == exclude_epoch:
            continue
        snap = load(path, kinds=("snapshot",))
        G = Generator(nz=cfg["nz"], ngf=cfg["ngf"], channels=cfg["channels"], image_size=cfg["image_size"])
        load_state(G, snap["G"], "generator snapshot", path)
        gens.append(G.to(device).eval())
    return gens


# -----------------------------------------------------------------------------
# detector.pt and a detector training's state

def detector_config(arch, image_size, *, ndf=None, framing=None, faces=None, frames=32, normalize=None):
    """How to build a detector and feed it: the network, its input side and pixel normalisation, how faces are framed and
    found, frames per video."""
    return {"arch": arch, "image_size": image_size, **({"ndf": ndf} if ndf else {}),
            "normalize": normalize or detector.normalization(arch), "framing": framing or dict(CELEBA_FRAMING),
            "faces": faces or {"faces": "auto", "detect_size": 320, "max_faces": 1}, "frames": frames}


def gan_detector_config(cfg):
    """The GAN's end-of-run detector: its discriminator's shape, at its image size, CelebA's framing."""
    return detector_config("dcgan", cfg["image_size"], ndf=cfg["ndf"])


def build_detector(dcfg):
    """The network a detector config names, fed as its stored normalisation says (files written before it was stored: the arch's)."""
    return detector.build(dcfg["arch"], dcfg["image_size"], ndf=dcfg.get("ndf", 64), normalize=dcfg.get("normalize"))


def save_detector(path, model, threshold, dcfg, keep=False, **info):
    """detector.pt: the weights, how to build them, the threshold on P(fake) and whatever describes how they were made."""
    save({"detector": model.state_dict(), "detector_config": dcfg, "threshold": float(threshold), **info}, path, "detector", keep)


def _older_detector(ckpt):
    """A detector.pt of format 1: a DCGAN discriminator whose logit said real -> (its config, weights whose logit says fake)."""
    cfg = ckpt["config"]
    old = ckpt.get("detector_config") or {}
    dcfg = detector_config("dcgan", old.get("image_size", cfg["image_size"]), ndf=old.get("ndf", cfg["ndf"]))
    state = {f"net.{k}": v for k, v in ckpt["detector"].items()}
    last = max((k for k in state if k.endswith(".weight")), key=lambda k: int(k.split(".")[2]))
    state[last] = -state[last]
    return dcfg, state


def load_detector(path, device="cpu"):
    """A run folder, checkpoint.pt or detector.pt -> (model in eval mode, threshold, kind, info dict).

    A GAN run folder (or its checkpoint.pt) with a detector.pt beside it means that detector;
    without one, the GAN's own discriminator at threshold 0.5. info holds the detector config's
    keys (image_size, framing, faces, frames) and whatever the file says of how it was made.
    """
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) == "checkpoint.pt" else None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "detector.pt")):
        path = os.path.join(run_dir, "detector.pt")
    ckpt = load(path, kinds=("training", "detector"), use="scoring")
    if kind_of(ckpt) == "detector":
        stored = ckpt.get("detector_config")
        if isinstance(stored, dict) and "arch" in stored:
            dcfg, state = stored, ckpt["detector"]
        elif isinstance(ckpt.get("config"), dict) and "image_size" in ckpt["config"] and "ndf" in ckpt["config"]:
            dcfg, state = _older_detector(ckpt)
        else:
            raise UserError(f"{path} has no detector_config saying which network it holds, so it cannot be used; "
                            "it is damaged or was written by another program")
        _check_detector_config(dcfg, ckpt["threshold"], path)
        model = build_detector(dcfg)
        load_state(model, state, "detector", path)
        kind = f"{ckpt.get('method', 'fine-tuned')} detector"
        info = {k: v for k, v in ckpt.items() if k not in ("detector", "format", "kind")}
    else:
        dcfg = gan_detector_config(ckpt["config"])
        G, D = build_models(ckpt["config"])
        load_state(D, ckpt["D"], "discriminator", path)
        model = detector.from_discriminator(D, ckpt["config"]["ndf"], ckpt["config"]["image_size"])[0]
        kind = "raw discriminator"
        info = {"config": ckpt["config"], "threshold": 0.5}
    info.update(dcfg)
    return model.to(device).eval(), float(info["threshold"]), kind, info


def _check_detector_config(dcfg, threshold, path):
    """Every field a detector file needs, checked before the network is built: one sentence for the first that is wrong.

    framing, faces, frames and normalize may be absent (files written before they were stored:
    the programs then use the defaults), but when present they must be what detect.py can use.
    """
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    whole = lambda v, lo: isinstance(v, int) and not isinstance(v, bool) and v >= lo
    framing, found, frames = dcfg.get("framing", CELEBA_FRAMING), dcfg.get("faces", {}), dcfg.get("frames", 32)
    normalize = dcfg.get("normalize", detector.IMAGENET_NORMALIZE)
    three = lambda v, lo: isinstance(v, list) and len(v) == 3 and all(number(x) and x > lo for x in v)
    checks = [
        (dcfg.get("arch") in detector.ARCHS, f"an unknown network {dcfg.get('arch')!r}"),
        (whole(dcfg.get("image_size"), 8), f"an image size of {dcfg.get('image_size')!r}"),
        (whole(dcfg.get("ndf", 64), 1), f"a discriminator width (ndf) of {dcfg.get('ndf')!r}"),
        (number(threshold) and 0 <= threshold <= 1, f"a threshold of {threshold!r}"),
        (isinstance(framing, dict) and number(framing.get("scale")) and framing["scale"] > 0 and number(framing.get("shift")),
         f"a face framing of {framing!r} (it needs a scale above 0 and a shift)"),
        (isinstance(found, dict) and found.get("faces", "auto") in ("auto", *FINDERS) and whole(found.get("detect_size", 320), 64)
         and whole(found.get("max_faces", 1), 1), f"face finder settings of {found!r}"),
        (whole(frames, 1), f"{frames!r} frames a video"),
        (isinstance(normalize, dict) and three(normalize.get("mean"), -math.inf) and three(normalize.get("std"), 0),
         f"a pixel normalisation of {normalize!r} (it needs three means and three stds above 0)"),
    ]
    problems = [what for ok, what in checks if not ok]
    if problems:
        raise UserError(f"{path} has {problems[0]}, so it cannot be used; it is damaged or was written by another program")


def load_weights_file(path):
    """A state dict in a local file (--weights), read with weights_only=True -> dict of tensors."""
    try:
        state = _torch_load(path)
    except Exception as e:
        refuse_python_objects(path, "--weights")
        raise UserError(f"cannot read --weights {path} ({type(e).__name__}); give a network's state dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"--weights {path} is not a state dict of tensors; give a network's state_dict() saved with torch.save")
    return state


def save_detector_training(path, state):
    save(state, path, "detector_training")


def load_detector_training(run_dir):
    """--resume DIR: DIR/training.pt, the state train_detector.py saves as it goes."""
    path = os.path.join(run_dir, "training.pt")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} holds no training.pt; --resume takes a run folder of train_detector.py that saved its state")
    return load(path, kinds=("detector_training",), use="train_detector.py --resume")
