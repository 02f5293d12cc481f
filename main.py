"""Train a DCGAN on CelebA (or any folder of images) and log it to TensorBoard.

    python main.py --epochs 10 --batch 128                  # CelebA under data/celeba
    python main.py --dataset synthetic --epochs 1           # drawn demo faces, no download
    python main.py --resume runs/generative_model/001-celeba-64   # continue a stopped run
    tensorboard --logdir=runs
"""

import argparse
import copy
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import data
import evaluate
from errors import UserError, run_cli
from models import IMAGE_SIZES, SHAPE_KEYS, build_models, load_checkpoint, load_state, save_checkpoint

# Flags a resumed run may change; everything else (the model's shape above all) comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "max_steps", "workers", "device", "data_root", "log_every", "sample_every",
                    "detector_steps", "detector_data", "inception_weights", "eval_images")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        # One line instead of a usage block: the user needs the mistake, --help has the rest.
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def at_least(lo, kind=int):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {text}")
        return value
    return parse


def image_size(text):
    value = at_least(1)(text)
    if value not in IMAGE_SIZES:
        raise argparse.ArgumentTypeError(f"must be a power of two from 32 to 256 ({', '.join(map(str, IMAGE_SIZES))}), got {text}")
    return value


def beta(text):
    value = at_least(0.0, float)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def get_args_parser():
    p = ArgumentParser(description="Train a DCGAN (Radford et al. 2015) and log it to TensorBoard.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default="celeba",
                   help="celeba: CelebA under --data-root in torchvision's, Kaggle's or a plain layout; "
                        "folder: every image under --data-root, recursively; synthetic: drawn demo faces, no download")
    g.add_argument("--data-root", default="data/celeba", help="where the images are")
    g.add_argument("--download", action="store_true", help="try torchvision's CelebA download into --data-root first")
    g.add_argument("--synthetic-size", type=at_least(1), default=10_000, help="images in the synthetic training set")
    g.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images; 0 decodes in the main process")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=image_size, default=64, help="image side: 32, 64, 128 or 256 (blocks are added or removed)")
    g.add_argument("--nz", type=at_least(1), default=100, help="length of the latent vector z")
    g.add_argument("--ngf", type=at_least(1), default=64, help="generator width (feature maps of its last hidden layer)")
    g.add_argument("--ndf", type=at_least(1), default=64, help="discriminator width (feature maps of its first layer)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=at_least(1), default=10, help="passes over the training split")
    g.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps in total (a checkpoint is written)")
    g.add_argument("--batch", type=at_least(1), default=128, help="images per step")
    g.add_argument("--lr", type=at_least(1e-12, float), default=2e-4, help="Adam learning rate, both networks (paper: 2e-4)")
    g.add_argument("--beta1", type=beta, default=0.5, help="Adam beta1 (paper: 0.5; the default 0.9 oscillates)")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the noise and the data order")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g = p.add_argument_group("evaluation and detector")
    g.add_argument("--eval-images", type=at_least(2), default=1000,
                   help="valid-split images for the per-epoch SWD and raw-D AUC, and test-split images for the final report")
    g.add_argument("--detector-steps", type=at_least(0), default=2000,
                   help="after training, fine-tune a copy of D into detector.pt for this many steps (0: skip; evaluate.py can do it later)")
    g.add_argument("--detector-data", default=None, metavar="DIR",
                   help="extra labelled faces for the detector: DIR/real/ and DIR/fake/ (e.g. FaceForensics++ crops)")
    g.add_argument("--inception-weights", default=None, metavar="PATH",
                   help="Inception-v3 2015-12-05 weights (weights-inception-2015-12-05-6726825d.pth) for FID/KID after training; without them FID is skipped")
    g = p.add_argument_group("output")
    g.add_argument("--logdir", default="runs/generative_model", help="each run gets a folder in here")
    g.add_argument("--run-name", default=None, help="the run folder's name (default: NNN-DATASET-SIZE, numbered)")
    g.add_argument("--log-every", type=at_least(1), default=50, help="log losses every N steps (each log waits for the GPU)")
    g.add_argument("--sample-every", type=at_least(1), default=500, help="also draw a sample grid every N steps (and at every epoch's end)")
    g.add_argument("--resume", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its folder or checkpoint; the model's shape comes from the checkpoint")
    return p


def explicit_flags(parser, argv):
    """The flags the user typed, as opposed to defaults: parse again with every default suppressed."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for CUDA, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def new_run_dir(logdir, run_name, cfg):
    if run_name is None:
        taken = [int(m.group(1)) for d in (os.listdir(logdir) if os.path.isdir(logdir) else []) if (m := re.match(r"(\d+)-", d))]
        run_name = f"{max(taken, default=0) + 1:03d}-{cfg['dataset']}-{cfg['image_size']}"
    run_dir = os.path.join(logdir, run_name)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --run-name")
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    return run_dir


# -----------------------------------------------------------------------------
# the GAN step

def train_step(G, D, opt_G, opt_D, real, nz):
    """One DCGAN step on a batch of real images; returns detached statistics (no host sync)."""
    b = real.shape[0]
    ones = torch.ones(b, device=real.device)
    zeros = torch.zeros(b, device=real.device)
    fake = G(torch.randn(b, nz, device=real.device))

    # (1) update D: maximise log D(x) + log(1 - D(G(z))), a real batch labelled 1 and a fake batch labelled 0
    logits_real = D(real)
    logits_fake = D(fake.detach())
    loss_D = F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(logits_fake, zeros)
    opt_D.zero_grad(set_to_none=True)
    loss_D.backward()
    opt_D.step()

    # (2) update G: maximise log D(G(z)), the non-saturating loss (fakes labelled 1)
    D.requires_grad_(False)  # only G's gradients are wanted: skip computing D's weight gradients
    logits_gen = D(fake)
    loss_G = F.binary_cross_entropy_with_logits(logits_gen, ones)
    opt_G.zero_grad(set_to_none=True)
    loss_G.backward()
    opt_G.step()
    D.requires_grad_(True)

    return {
        "loss/D": loss_D.detach(),
        "loss/G": loss_G.detach(),
        "D(x)": torch.sigmoid(logits_real.detach()).mean(),
        "D(G(z))/D_step": torch.sigmoid(logits_fake.detach()).mean(),  # before D's update
        "D(G(z))/G_step": torch.sigmoid(logits_gen.detach()).mean(),  # after D's update, before G's
    }


@torch.no_grad()
def draw_samples(G, z):
    """G(z) in eval mode (BatchNorm running statistics), so sampling never changes the model."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def write_grid(G, z, path, writer=None, step=0):
    images = draw_samples(G, z).float().cpu()
    grid = make_grid(images, nrow=int(math.sqrt(len(images))) or 1, normalize=True, value_range=(-1, 1))
    save_image(grid, path)
    if writer is not None:
        writer.add_image("samples", grid, step)


def epoch_order(n, seed, epoch):
    """The data order of an epoch: a permutation fixed by seed and epoch, so a resumed run sees the same batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


# -----------------------------------------------------------------------------
# training

def train(cfg, ckpt=None):
    """Train from scratch, or from a checkpoint dict, until cfg's epochs or max_steps; returns the last stats."""
    device = pick_device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    if cfg["dataset"] == "celeba" and cfg.get("download"):
        data.download_celeba(cfg["data_root"])
    dataset = data.build_dataset(cfg["dataset"], cfg["data_root"], "train", cfg["image_size"], cfg["synthetic_size"])
    steps_per_epoch = len(dataset) // cfg["batch"]  # drop_last: every BatchNorm batch is full-sized
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(dataset)} images, fewer than one batch of {cfg['batch']}; lower --batch or add images")
    if cfg["dataset"] == "synthetic":
        print(f"note: --dataset synthetic trains on {len(dataset):,} drawn cartoon faces, a demo set, not CelebA")
    print(f"training on {len(dataset):,} images ({steps_per_epoch:,} steps per epoch) on {device}")

    G, D = build_models(cfg)
    G, D = G.to(device), D.to(device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], 0.999))
    fixed_noise = torch.randn(64, cfg["nz"], generator=torch.Generator().manual_seed(cfg["seed"]))
    epoch, done_in_epoch, step = 0, 0, 0
    if ckpt is not None:
        load_state(G, ckpt["G"], "generator", cfg["resume"])
        load_state(D, ckpt["D"], "discriminator", cfg["resume"])
        opt_G.load_state_dict(ckpt["opt_G"])
        opt_D.load_state_dict(ckpt["opt_D"])
        epoch, done_in_epoch, step = ckpt["epoch"], ckpt["done_in_epoch"], ckpt["step"]
        fixed_noise = ckpt["fixed_noise"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        print(f"resuming {cfg['run_dir']} at epoch {epoch}, step {step}")
    fixed_noise = fixed_noise.to(device)

    run_dir = cfg["run_dir"]
    writer = SummaryWriter(run_dir)
    # held-out images for the per-epoch SWD and raw-D AUC, decoded once
    valid_real = evaluate.load_images(data.build_dataset(cfg["dataset"], cfg["data_root"], "valid", cfg["image_size"], cfg["synthetic_size"]),
                                      cfg.get("eval_images", 1000), cfg["seed"], cfg["workers"])
    if ckpt is None:
        writer.add_text("config", "```\n" + json.dumps(cfg, indent=2) + "\n```")
        for summary in hparams({k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))},
                               {"loss/D": 0, "loss/G": 0}):
            writer._get_file_writer().add_summary(summary)

    def checkpoint(last):
        check_finite(last, step, run_dir)  # never overwrite the last good checkpoint with a diverged model
        save_checkpoint({
            "config": cfg, "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "epoch": epoch, "done_in_epoch": done_in_epoch, "step": step, "fixed_noise": fixed_noise.cpu(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        }, os.path.join(run_dir, "checkpoint.pt"))

    # Ctrl-C finishes the step in flight, writes a checkpoint and stops; a second Ctrl-C stops at once.
    interrupted = []
    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        tqdm.write("stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    last, skipped = None, [0]
    t0, images_since = time.time(), 0
    stop = cfg["max_steps"] is not None and step >= cfg["max_steps"]
    try:
        while epoch < cfg["epochs"] and not stop:
            order = epoch_order(len(dataset), cfg["seed"], epoch)
            loader = DataLoader(dataset, batch_size=cfg["batch"], sampler=order[done_in_epoch * cfg["batch"]:], drop_last=True,
                                num_workers=cfg["workers"], pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg["seed"]))  # keeps the global RNG (the noise) untouched
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg['epochs']}", total=steps_per_epoch, initial=done_in_epoch,
                       dynamic_ncols=True)
            for real, ok in bar:
                if not ok.all():
                    first = done_in_epoch * cfg["batch"]
                    data.report_skipped(dataset, [order[first + i] for i in (~ok).nonzero().flatten().tolist()], skipped)
                    real = real[ok]
                if len(real) > 1:  # BatchNorm needs two images; a batch of all-broken files is passed over
                    last = train_step(G, D, opt_G, opt_D, real.to(device, non_blocking=True), cfg["nz"])
                    images_since += len(real)
                step += 1
                done_in_epoch += 1

                if step % cfg["log_every"] == 0 and last is not None:
                    values = {k: v.item() for k, v in last.items()}  # a CPU-GPU sync point, hence only every log_every steps
                    check_finite(last, step, run_dir)
                    for k, v in values.items():
                        writer.add_scalar(k, v, step)
                    writer.add_scalar("perf/images_per_sec", images_since / (time.time() - t0), step)
                    t0, images_since = time.time(), 0
                    bar.set_postfix(loss_D=f"{values['loss/D']:.3f}", loss_G=f"{values['loss/G']:.3f}", D_x=f"{values['D(x)']:.2f}")
                if step % cfg["sample_every"] == 0:
                    write_grid(G, fixed_noise, os.path.join(run_dir, "samples", f"step_{step:07d}.png"), writer, step)
                if interrupted or (cfg["max_steps"] is not None and step >= cfg["max_steps"]):
                    stop = True
                    break
            bar.close()
            if not stop:
                epoch, done_in_epoch = epoch + 1, 0
                write_grid(G, fixed_noise, os.path.join(run_dir, "samples", f"epoch_{epoch:03d}.png"), writer, step)
                evaluate.save_snapshot(G, cfg, epoch, step, run_dir)  # fakes from earlier generators for the detector
                for k, v in evaluate.epoch_metrics(G, D, valid_real, cfg, device, epoch).items():
                    writer.add_scalar(k, v, step)
            if last is not None:
                checkpoint(last)
        if not stop and epoch >= cfg["epochs"] and cfg.get("detector_steps", 0) > 0:
            # the GAN is done: fine-tune the detector, then the test-set report (detector.pt, metrics.json)
            evaluate.evaluate_run(cfg, G, D, run_dir, step=step, epoch=epoch, detector_steps=cfg["detector_steps"],
                                  eval_images=cfg.get("eval_images", 1000), inception_weights=cfg.get("inception_weights"),
                                  detector_data=cfg.get("detector_data"), device=device, writer=writer)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        writer.close()
    if skipped[0]:
        print(f"warning: {skipped[0]} images could not be decoded and were skipped", file=sys.stderr)
    if interrupted:
        print(f"stopped at step {step}; continue with: python main.py --resume {run_dir}", file=sys.stderr)
    else:
        print(f"done at epoch {epoch}, step {step}; run folder: {run_dir}")
    stats = {k: v.item() for k, v in last.items()} if last is not None else {}
    return {**stats, "step": step, "epoch": epoch, "interrupted": bool(interrupted)}


def check_finite(stats, step, run_dir):
    bad = {k: v.item() for k, v in stats.items() if not torch.isfinite(v).all()}
    if bad:
        raise UserError(f"training diverged at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                        f"the last good checkpoint in {run_dir} is kept. Resume from it with a lower --lr or another --seed")


def make_config(argv=None):
    """Flags -> (config dict, checkpoint dict or None). On --resume the checkpoint's config wins but for RESUME_OVERRIDES."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cfg = vars(args)
    cfg["channels"] = 3
    if args.resume is None:
        cfg["run_dir"] = new_run_dir(args.logdir, args.run_name, cfg)
        return cfg, None
    ckpt = load_checkpoint(args.resume)
    explicit = explicit_flags(parser, argv)
    for key in SHAPE_KEYS:
        if key in explicit and cfg[key] != ckpt["config"][key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {cfg[key]} differs from the checkpoint's {ckpt['config'][key]}; the model's shape comes from the checkpoint, so leave {flag} out")
    resumed = dict(ckpt["config"])
    resumed.update({k: cfg[k] for k in RESUME_OVERRIDES if k in explicit})
    resumed["resume"] = args.resume
    resumed["run_dir"] = os.path.dirname(os.path.abspath(args.resume if os.path.isfile(args.resume) else os.path.join(args.resume, "checkpoint.pt")))
    return resumed, ckpt


def main(argv=None):
    cfg, ckpt = make_config(argv)
    print(json.dumps(cfg, indent=2))
    with open(os.path.join(cfg["run_dir"], "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    result = train(cfg, ckpt)
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
