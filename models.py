"""The DCGAN generator and discriminator (Radford, Metz & Chintala 2015), and one training step of the pair.

Both networks are built from the image size: the generator starts from a 4x4 map and
doubles it until it reaches `image_size`; the discriminator mirrors it. At 64x64 they are
exactly the networks of the paper and of the PyTorch DCGAN example.
"""

import contextlib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from data import quantize

IMAGE_SIZES = (32, 64, 128, 256)


def _width(base, image_size, resolution):
    # Feature maps per layer: base at the largest hidden resolution, doubling as the map
    # halves, capped at 8x so that 128 and 256 grow in depth, not in width.
    return base * min(8, image_size // (2 * resolution))


def _check_size(image_size):
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")


class Generator(nn.Module):
    """z (N, nz) -> image (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, *, nz=100, ngf=64, channels=3, image_size=64):
        super().__init__()
        _check_size(image_size)
        self.nz = nz
        resolution = 4
        width = _width(ngf, image_size, resolution)
        # nz x 1 x 1 -> width x 4 x 4
        layers = [nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
        while resolution * 2 < image_size:
            resolution *= 2
            out = _width(ngf, image_size, resolution)
            # width x r/2 x r/2 -> out x r x r
            layers += [nn.ConvTranspose2d(width, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            width = out
        # ngf x size/2 x size/2 -> channels x size x size
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, z):
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    """image (N, channels, image_size, image_size) -> logit (N,); D(x) = sigmoid(logit)."""

    def __init__(self, *, ndf=64, channels=3, image_size=64):
        super().__init__()
        _check_size(image_size)
        resolution = image_size // 2
        width = _width(ndf, image_size, resolution)
        # channels x size x size -> ndf x size/2 x size/2; no BatchNorm on the input layer (paper)
        layers = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True)]
        while resolution > 4:
            resolution //= 2
            out = _width(ndf, image_size, resolution)
            # width x 2r x 2r -> out x r x r
            layers += [nn.Conv2d(width, out, 4, 2, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            width = out
        # width x 4 x 4 -> 1 x 1 x 1; the sigmoid lives in the loss (BCEWithLogitsLoss)
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False)]
        self.main = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x):
        return self.main(x).flatten()


@torch.no_grad()
def draw_samples(G, z):
    """G(z) in eval mode (BatchNorm running statistics), as a deployed generator draws; sampling never changes G."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


@torch.no_grad()
def seeded_samples(G, n, seed, device, batch=256):
    """n samples of G from noise seeded by `seed`, drawn in batches, rounded to 8 bits, on the CPU.

    The noise is drawn on the CPU, all of it before the first batch, so a seed gives the same
    images on every device and at every batch size. They are rounded to 8 bits as real images
    from files are: a detector or a metric would otherwise see the rounding, not the faces.
    """
    z = torch.randn(n, G.nz, generator=torch.Generator().manual_seed(seed))
    return torch.cat([quantize(draw_samples(G, z[i:i + batch].to(device))) for i in range(0, n, batch)])


def init_weights(module):
    """The paper's initialisation: conv weights from N(0, 0.02), BatchNorm scales from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def nonfinite(module):
    """The names of the module's parameters and buffers (BatchNorm's running statistics too) holding inf or NaN; [] when all
    are finite. One CPU-GPU sync for the whole module, so call it where training logs or saves, not at every step."""
    state = [(k, v) for k, v in module.state_dict(keep_vars=True).items() if v.is_floating_point()]
    if not state or torch.stack([v.detach().isfinite().all() for _, v in state]).all():
        return []
    return [k for k, v in state if not v.detach().isfinite().all()]


def build_models(cfg):
    """Both networks from a config dict holding SHAPE_KEYS."""
    G = Generator(nz=cfg["nz"], ngf=cfg["ngf"], channels=cfg["channels"], image_size=cfg["image_size"])
    D = Discriminator(ndf=cfg["ndf"], channels=cfg["channels"], image_size=cfg["image_size"])
    return G, D


# -----------------------------------------------------------------------------
# the GAN step

def train_step(G, D, opt_G, opt_D, real, nz, autocast=contextlib.nullcontext, scaler=None, z=None):
    """One DCGAN step on a batch of real images; returns detached statistics (no host sync).

    G and D may be DistributedDataParallel wrappers; autocast makes a mixed-precision context
    and scaler is the fp16 GradScaler (None for fp32 and bf16, which need none). z is the
    noise, drawn here from torch's RNG when None; CudaGraphStep passes its static buffer.
    """
    scaler = scaler or NO_SCALER
    b = real.shape[0]
    ones = torch.ones(b, device=real.device)
    zeros = torch.zeros(b, device=real.device)
    if z is None:
        z = draw_noise(b, nz, real.device)
    with autocast():
        fake = G(z)

    # (1) update D: maximise log D(x) + log(1 - D(G(z))), a real batch labelled 1 and a fake batch labelled 0
    with autocast():
        logits_real = D(real)
        logits_fake = D(fake.detach())
        loss_D = F.binary_cross_entropy_with_logits(logits_real, ones) + F.binary_cross_entropy_with_logits(logits_fake, zeros)
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(opt_D)

    # (2) update G: maximise log D(G(z)), the non-saturating loss (fakes labelled 1)
    # D's weights are frozen for this half, so no gradient of D is computed, and under DDP none is
    # all-reduced. The G step runs the bare discriminator rather than its DDP wrapper: the wrapper
    # would only add its per-forward buffer broadcast and hook bookkeeping for gradients that never
    # come. G's wrapper still averages G's gradients over the ranks.
    D_bare = D.module if isinstance(D, DDP) else D
    D.requires_grad_(False)  # only G's gradients are wanted: skip computing D's weight gradients
    with autocast():
        logits_gen = D_bare(fake)
        loss_G = F.binary_cross_entropy_with_logits(logits_gen, ones)
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()  # once per step, after both optimizers, as GradScaler expects
    D.requires_grad_(True)

    return {
        "loss/D": loss_D.detach(),
        "loss/G": loss_G.detach(),
        "D(x)": torch.sigmoid(logits_real.detach().float()).mean(),
        "D(G(z))/D_step": torch.sigmoid(logits_fake.detach().float()).mean(),  # before D's update
        "D(G(z))/G_step": torch.sigmoid(logits_gen.detach().float()).mean(),  # after D's update, before G's
    }


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # scale, step and update pass straight through


def draw_noise(b, nz, device, out=None):
    """The step's z ~ N(0, I), from torch's RNG: the eager and the graphed step draw the same values."""
    return torch.randn(b, nz, device=device, out=out)


# -----------------------------------------------------------------------------
# the GAN step as one CUDA graph

class CudaGraphStep:
    """train_step captured once as a CUDA graph and replayed every step: one launch for both
    updates and both Adam steps, where eager mode launches many small kernels, each
    waiting on Python. Call it as train_step's stand-in: step(real) -> the same statistics.

    PyTorch's whole-network capture recipe (torch.cuda.graph): static input and noise buffers
    that each step copies into; warm-up steps on a side stream (cuDNN picks its algorithms and
    Adam makes its state before capture); gradients set to None before capture, so backward
    allocates them from the graph's pool; Adam built with capturable=True, so its step count
    lives on the GPU; autocast with its cast cache off. The noise is drawn outside the graph,
    by draw_noise as the eager step draws it, so the RNG stream and a checkpoint's RNG state
    stay the eager run's. The warm-up steps train: their changes to the weights, BatchNorm
    statistics and Adam state are undone afterwards, in place (the graph holds those tensors'
    addresses), so the first replay is the run's next step. The graph is captured at the first
    batch of `batch` images; a batch of another size (images dropped as undecodable) takes the
    eager step. Statistics returned by a replay are overwritten by the next one.
    """

    def __init__(self, G, D, opt_G, opt_D, nz, autocast=contextlib.nullcontext, *, batch, warmup=3):
        for opt in (opt_G, opt_D):
            if not all(group["capturable"] for group in opt.param_groups):
                raise ValueError("CudaGraphStep needs Adam built with capturable=True")
        self.G, self.D, self.opt_G, self.opt_D, self.nz, self.autocast, self.warmup = G, D, opt_G, opt_D, nz, autocast, warmup
        self.batch, self.graph = batch, None

    def __call__(self, real):
        if real.shape[0] != self.batch:
            return train_step(self.G, self.D, self.opt_G, self.opt_D, real, self.nz, self.autocast)
        if self.graph is None:
            self._capture(real)
        self.real.copy_(real)
        draw_noise(*self.z.shape, self.z.device, out=self.z)
        self.graph.replay()
        return self.stats

    def _capture(self, real):
        device = real.device
        self.real = torch.empty_like(real)  # keeps real's memory format (channels-last)
        self.z = torch.empty(real.shape[0], self.nz, device=device)
        self.real.copy_(real)
        self.z.normal_(generator=torch.Generator(device=device).manual_seed(0))  # warm-up noise of its own: the run's RNG is untouched
        saved = training_state(self.G, self.D, self.opt_G, self.opt_D)
        step = lambda: train_step(self.G, self.D, self.opt_G, self.opt_D, self.real, self.nz, self.autocast, z=self.z)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            # capturable Adam warns when it steps uncaptured; here that is the recipe, not a mistake
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.opt_G.zero_grad(set_to_none=True)
        self.opt_D.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.stats = step()
        restore_training_state(saved, self.G, self.D, self.opt_G, self.opt_D)


def training_state(G, D, opt_G, opt_D):
    """Copies of every tensor a step changes: weights, BatchNorm buffers, and the Adam state that exists so far."""
    tensors = [*G.state_dict(keep_vars=True).values(), *D.state_dict(keep_vars=True).values()]
    tensors += [t for opt in (opt_G, opt_D) for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return {id(t): (t, t.detach().clone()) for t in tensors}


def restore_training_state(saved, G, D, opt_G, opt_D):
    """Put back, in place, what training_state saved; Adam state made since is zeroed, which is
    exactly a fresh Adam's (step 0, both moments 0)."""
    with torch.no_grad():
        for t, copy in saved.values():
            t.copy_(copy)
        for opt in (opt_G, opt_D):
            for s in opt.state.values():
                for t in s.values():
                    if torch.is_tensor(t) and id(t) not in saved:
                        t.zero_()
