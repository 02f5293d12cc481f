"""Small helpers shared by the tests: tiny images and tiny training runs."""

import os

from PIL import Image


def write_jpegs(folder, names, size=(40, 48), seed=0):
    """Small JPEGs with distinct contents; returns their paths."""
    import random
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name in names:
        im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        path = os.path.join(folder, name)
        im.save(path, quality=90)
        paths.append(path)
    return paths


def train_args(logdir, *extra):
    """A tiny, fast training run on drawn faces."""
    return ["--dataset", "synthetic", "--synthetic-size", "64", "--batch", "16", "--image-size", "32",
            "--ngf", "8", "--ndf", "8", "--nz", "16", "--workers", "0", "--log-every", "1", "--detector-steps", "0",
            "--logdir", str(logdir), *extra]
