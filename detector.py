"""The detector: a discriminator that scores images as generated (fake) or real.

Convention everywhere in this project: a score is P(fake) = sigmoid(-logit), where the
logit is the discriminator's (positive means real). A run folder's `detector.pt`, when
present, holds the fine-tuned detector and its threshold; otherwise the GAN's own
discriminator in `checkpoint.pt` is used with threshold 0.5.
"""

import os

import torch

from models import Discriminator, load_checkpoint, load_state


@torch.no_grad()
def fake_scores(model, images):
    """P(fake) for each image in [-1, 1]; the model must be in eval mode so a score never depends on the batch."""
    return torch.sigmoid(-model(images).float())


def load_detector(path, device="cpu"):
    """A run folder, checkpoint.pt or detector.pt -> (model in eval mode, threshold, kind, config)."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "detector.pt")):
        path = os.path.join(path, "detector.pt")
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = Discriminator(ndf=cfg["ndf"], channels=cfg["channels"], image_size=cfg["image_size"])
    if "detector" in ckpt:
        load_state(model, ckpt["detector"], "detector", path)
        kind, threshold = "fine-tuned detector", float(ckpt["threshold"])
    else:
        load_state(model, ckpt["D"], "discriminator", path)
        kind, threshold = "raw discriminator", float(ckpt.get("threshold", 0.5))
    return model.to(device).eval(), threshold, kind, cfg
