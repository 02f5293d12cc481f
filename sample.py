"""Draw images from a trained generator, without training.

    python sample.py runs/generative_model/001-celeba-64 --n 64 --out samples.png
    python sample.py runs/generative_model/001-celeba-64 --n 1000 --separate fakes/   # one PNG per image, no grid

It writes only the paths it is given: the grid to --out (samples.png when neither --out nor
--separate is given), the single images into --separate.
"""

import math
import os
import sys

from PIL import Image
from torchvision.utils import save_image

import checkpoint
from cli import ArgumentParser, UserError, add_device_flag, at_least, make_folder, pick_device, run_cli, write_atomically
from models import seeded_samples


def get_args_parser():
    p = ArgumentParser(description="Draw images from a trained DCGAN generator.")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder or its checkpoint.pt")
    p.add_argument("--n", type=at_least(1), default=64, help="how many images")
    p.add_argument("--out", default=None, help="the grid PNG (default: samples.png, unless only --separate is given)")
    p.add_argument("--nrow", type=at_least(1), default=None, help="images per grid row (default: a square)")
    p.add_argument("--separate", default=None, metavar="DIR", help="write every image as its own PNG into DIR (and the grid only if --out is given)")
    p.add_argument("--seed", type=int, default=0, help="seeds the noise")
    p.add_argument("--batch", type=at_least(1), default=256, help="images per forward pass")
    add_device_flag(p)
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    if args.out is not None and os.path.splitext(args.out)[1].lower() not in Image.registered_extensions():
        raise UserError(f"--out {args.out} needs an image file ending such as .png or .jpg")
    device = pick_device(args.device)
    ckpt = checkpoint.load(args.checkpoint)
    G, _ = checkpoint.models_from(ckpt, args.checkpoint, device)
    images = seeded_samples(G, args.n, args.seed, device, args.batch)
    out = args.out if args.out is not None or args.separate else "samples.png"
    if out:
        nrow = args.nrow or math.ceil(math.sqrt(args.n))
        make_folder(os.path.dirname(os.path.abspath(out)), "folder for --out")
        kind = Image.registered_extensions().get(os.path.splitext(out)[1].lower())  # written through a temporary file, so named here
        write_atomically(out, lambda f: save_image(images, f, format=kind, nrow=nrow, normalize=True, value_range=(-1, 1)))
        print(f"wrote {args.n} samples (step {ckpt['step']}) to {out}")
    if args.separate:
        make_folder(args.separate, "--separate folder")
        for i, image in enumerate(images):
            write_atomically(os.path.join(args.separate, f"{i:06d}.png"),
                             lambda f: save_image(image, f, format="png", normalize=True, value_range=(-1, 1)))
        print(f"wrote {args.n} images to {args.separate}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
