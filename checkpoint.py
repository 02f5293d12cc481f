"""The checkpoint format, written down once: what each file holds, how it is saved, read and resolved.

Every file is one dict saved with torch.save and read with weights_only=True (a pickle can
run code). Three kinds share the format, told apart by "kind":

    training   RUN/checkpoint.pt, written by main.py: config, G, D, opt_G, opt_D, epoch,
               done_in_epoch, step, fixed_noise, rng, and scaler under fp16
    snapshot   RUN/snapshots/G_epochNNN.pt, one per epoch: config, G, epoch, step
    detector   RUN/detector.pt: config (the GAN's), detector (weights), detector_config
               (how to build it), threshold on P(fake), and how it was made

Files written before "kind" existed are recognised by their keys.
"""

import glob
import os
import re

import torch

from cli import UserError, make_folder, write_atomically
from models import Discriminator, Generator, build_models

FORMAT = 1
KEYS = {
    "training": ("config", "G", "D", "opt_G", "opt_D", "epoch", "done_in_epoch", "step", "fixed_noise", "rng"),
    "snapshot": ("config", "G", "epoch", "step"),
    "detector": ("config", "detector", "threshold"),
}
SHAPE_KEYS = ("nz", "ngf", "ndf", "channels", "image_size")  # what a run's networks are built from


def save(state, path, kind):
    """Write to a temporary file and rename it, so a crash mid-write never destroys the last good one.

    A full disk or an unwritable folder is the user's to fix: one sentence naming the folder,
    and no partial temporary file left behind.
    """
    missing = [k for k in KEYS[kind] if k not in state]
    assert not missing, f"a {kind} checkpoint needs {missing}"
    assert "kind" not in state and "format" not in state, "the format's own keys"
    state = {"format": FORMAT, "kind": kind, **state}
    write_atomically(path, lambda f: torch.save(state, f))


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
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, other pickles, text files: all the user's to fix
        first = str(e).splitlines()[0] if str(e) else "unreadable"
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {first}); it may be truncated or not a PyTorch file") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint written by this project (it has no format and config); "
                        "train one with main.py or point at a run folder")
    if ckpt["format"] > FORMAT:
        raise UserError(f"{path} has checkpoint format {ckpt['format']}, newer than this code understands ({FORMAT}); update the code")
    kind = kind_of(ckpt)
    if kind not in kinds:
        wanted = " or ".join(f"a {k} checkpoint" for k in kinds)
        raise UserError(f"{path} is a {kind} file, but {use} needs {wanted}"
                        + ("; give the run folder or its checkpoint.pt" if "training" in kinds else ""))
    missing = [k for k in KEYS[kind] if k not in ckpt] + [k for k in SHAPE_KEYS if k not in ckpt["config"]]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}, so it cannot be used; it may come from another program")
    return ckpt


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
# detector.pt

def detector_config(cfg, image_size=None):
    """How to build a detector: a DCGAN discriminator of the run's width at its own image size."""
    return {"ndf": cfg["ndf"], "channels": cfg["channels"], "image_size": image_size or cfg["image_size"]}


def build_detector(dcfg):
    return Discriminator(ndf=dcfg["ndf"], channels=dcfg["channels"], image_size=dcfg["image_size"])


def save_detector(path, model, threshold, cfg, dcfg=None, **info):
    """detector.pt: the weights, how to build them, the threshold on P(fake) and whatever describes how they were made."""
    save({"config": cfg, "detector": model.state_dict(), "detector_config": dcfg or detector_config(cfg),
          "threshold": float(threshold), **info}, path, "detector")


def load_detector(path, device="cpu"):
    """A run folder, checkpoint.pt or detector.pt -> (model in eval mode, threshold, kind, detector info dict).

    A run folder (or its checkpoint.pt) with a detector.pt beside it means that detector;
    without one, the GAN's own discriminator at threshold 0.5. info holds at least
    image_size, the size the model scores at.
    """
    run_dir = path if os.path.isdir(path) else os.path.dirname(path) if os.path.basename(path) == "checkpoint.pt" else None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "detector.pt")):
        path = os.path.join(run_dir, "detector.pt")
    ckpt = load(path, kinds=("training", "detector"), use="scoring")
    if kind_of(ckpt) == "detector":
        dcfg = ckpt.get("detector_config") or detector_config(ckpt["config"])
        model = build_detector(dcfg)
        load_state(model, ckpt["detector"], "detector", path)
        kind = f"{ckpt.get('method', 'fine-tuned')} detector"
        info = {k: v for k, v in ckpt.items() if k not in ("detector", "format", "kind")}
    else:
        dcfg = detector_config(ckpt["config"])
        model = build_detector(dcfg)
        load_state(model, ckpt["D"], "discriminator", path)
        kind = "raw discriminator"
        info = {"config": ckpt["config"], "threshold": 0.5}
    info["image_size"] = dcfg["image_size"]
    return model.to(device).eval(), float(info["threshold"]), kind, info
