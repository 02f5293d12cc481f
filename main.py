"""Train a DCGAN on CelebA (or any folder of images) and log it to TensorBoard.

    python main.py --epochs 10 --batch 128                  # CelebA under data/celeba
    python main.py --dataset synthetic --epochs 1           # drawn demo faces, no download
    python main.py --resume runs/generative_model/001-celeba-64   # continue a stopped run
    tensorboard --logdir=runs

The GAN step itself is models.train_step, beside the networks: models.CudaGraphStep and
benchmark.py run it too, and library modules and other programs never import this program.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import glob
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import cache
import checkpoint
import data
import metrics
import models
import reports
from cli import (PRECISIONS, ArgumentParser, UserError, at_least, below_one, explicit_flags, make_folder, one_of, pick_device,
                 pick_precision, run_cli, use_fast_cuda_kernels, write_atomically, write_text)
from checkpoint import SHAPE_KEYS
from config import Config
from models import IMAGE_SIZES, CudaGraphStep, build_models, draw_samples, nonfinite


# Flags a resumed run may change; everything else (the model's shape above all) comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "workers", "device", "data_root", "log_every", "sample_every",
                    "cache", "cache_dir", "precision", "channels_last", "compile", "cuda_graphs", "sync_bn",
                    "detector_steps", "inception_weights", "eval_images")


def get_args_parser():
    d = Config()  # the defaults, written once
    p = ArgumentParser(description="Train a DCGAN (Radford et al. 2015) and log it to TensorBoard.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default=d.dataset,
                   help="celeba: CelebA under --data-root in torchvision's, Kaggle's or a plain layout; "
                        "folder: every image under --data-root, recursively; synthetic: drawn demo faces, no download")
    g.add_argument("--data-root", default=d.data_root, help="where the images are")
    g.add_argument("--download", action="store_true", default=d.download, help="try torchvision's CelebA download into --data-root first")
    g.add_argument("--synthetic-size", type=at_least(1), default=d.synthetic_size, help="images in the synthetic training set")
    g.add_argument("--workers", type=at_least(0), default=d.workers,
                   help="DataLoader processes decoding images with --no-cache or --dataset synthetic; 0 decodes in the main process")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=d.cache,
                   help="decode the images once into a uint8 cache (memory-mapped, rebuilt when the files change) and "
                        "feed batches from it without loader workers; --no-cache decodes every image every epoch")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where image caches are kept (CelebA at 64x64 takes about 2.5 GB)")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=one_of(IMAGE_SIZES, "a power of two from 32 to 256"), default=d.image_size, help="image side: 32, 64, 128 or 256 (blocks are added or removed)")
    g.add_argument("--nz", type=at_least(1), default=d.nz, help="length of the latent vector z")
    g.add_argument("--ngf", type=at_least(1), default=d.ngf, help="generator width (feature maps of its last hidden layer)")
    g.add_argument("--ndf", type=at_least(1), default=d.ndf, help="discriminator width (feature maps of its first layer)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=at_least(1), default=d.epochs, help="passes over the training split")
    g.add_argument("--max-steps", type=at_least(1), default=d.max_steps, help="stop after this many steps in total, with a checkpoint (this invocation only, not kept on --resume)")
    g.add_argument("--batch", type=at_least(1), default=d.batch, help="images per step")
    g.add_argument("--lr", type=at_least(1e-12, float), default=d.lr, help="Adam learning rate, both networks (paper: 2e-4)")
    g.add_argument("--beta1", type=below_one, default=d.beta1, help="Adam beta1 (paper: 0.5; the default 0.9 oscillates)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the weights, the noise and the data order")
    g.add_argument("--device", default=d.device, help="auto (CUDA when present), cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 autocast on GPUs that support it, else fp32; fp16 uses a GradScaler and needs CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="keep images and activations channels-last in memory (NHWC), which the fast convolutions want")
    g.add_argument("--compile", action="store_true", default=d.compile, help="torch.compile both networks (slow first steps; helps most on GPUs)")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=d.cuda_graphs,
                   help="capture the whole GAN step (both updates, both Adam steps) as one CUDA graph and replay it, "
                        "so the GPU is not kept waiting on kernel launches; needs one CUDA GPU, bf16 or fp32, no --compile")
    g.add_argument("--sync-bn", action="store_true", default=d.sync_bn,
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch rather than each rank's share")
    g = p.add_argument_group("evaluation and detector")
    g.add_argument("--eval-images", type=at_least(2), default=d.eval_images,
                   help="valid-split images for the per-epoch SWD and raw-D AUC, and test-split images for the final report")
    g.add_argument("--detector-steps", type=at_least(0), default=d.detector_steps,
                   help="after training, fine-tune a copy of D into detector.pt for this many steps (0: skip; evaluate.py can do it later)")
    g.add_argument("--inception-weights", default=d.inception_weights, metavar="PATH",
                   help="Inception-v3 2015-12-05 weights (weights-inception-2015-12-05-6726825d.pth) for FID/KID after training; without them FID is skipped")
    g = p.add_argument_group("output")
    g.add_argument("--logdir", default=d.logdir, help="each run gets a folder in here")
    g.add_argument("--run-name", default=d.run_name, help="the run folder's name (default: NNN-DATASET-SIZE, numbered)")
    g.add_argument("--log-every", type=at_least(1), default=d.log_every, help="log losses every N steps (each log waits for the GPU)")
    g.add_argument("--sample-every", type=at_least(1), default=d.sample_every, help="also draw a sample grid every N steps (and at every epoch's end)")
    g.add_argument("--resume", default=d.resume, metavar="RUN_OR_CHECKPOINT",
                   help="continue a run from its folder or checkpoint; the model's shape comes from the checkpoint")
    return p


# -----------------------------------------------------------------------------
# the run folder

def pick_run_dir(cfg):
    """The new run's folder: --run-name, or the next number (001-celeba-64). Only chosen here; setup makes it."""
    name = cfg.run_name
    if name is None:
        taken = [int(m.group(1)) for d in (os.listdir(cfg.logdir) if os.path.isdir(cfg.logdir) else []) if (m := re.match(r"(\d+)-", d))]
        name = f"{max(taken, default=0) + 1:03d}-{cfg.dataset}-{cfg.image_size}"
    run_dir = os.path.join(cfg.logdir, name)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --run-name")
    return run_dir


def open_run_dir(cfg, resumed):
    """Make the run folder, save config.json in it and open its TensorBoard log."""
    make_folder(cfg.run_dir, "run folder")
    make_folder(os.path.join(cfg.run_dir, "samples"), "sample folder")
    saved = cfg.to_dict()
    write_text(os.path.join(cfg.run_dir, "config.json"), json.dumps(saved, indent=2))
    writer = SummaryWriter(cfg.run_dir)
    if not resumed:  # a resumed run adds events to the same folder, where these already are
        writer.add_text("config", "```\n" + json.dumps(saved, indent=2) + "\n```")
        if cfg.dataset == "synthetic":
            writer.add_text("data", "drawn cartoon faces (--dataset synthetic): a demo set, not CelebA")
        # SummaryWriter.add_hparams would open a second events file in a subfolder, and TensorBoard would list the
        # run twice; the same three summaries go into the run's own file through its public file writer.
        for summary in hparams({k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool))},
                               {"loss/D": 0, "loss/G": 0}):
            writer.file_writer.add_summary(summary)
        # the DCGAN tutorial's two plots: both D outputs in one chart, both losses in another (tags are regexes)
        writer.add_custom_scalars({"DCGAN": {
            "D(x) and D(G(z))": ["Multiline", [re.escape(t) for t in ("D(x)", "D(G(z))/D_step", "D(G(z))/G_step")]],
            "loss_D and loss_G": ["Multiline", [re.escape(t) for t in ("loss/D", "loss/G")]],
        }})
    return writer


def write_grid(G, z, path, writer=None, step=0):
    images = draw_samples(G, z).float().cpu()
    grid = make_grid(images, nrow=int(math.sqrt(len(images))) or 1, normalize=True, value_range=(-1, 1))
    write_atomically(path, lambda f: save_image(grid, f, format="png"))
    if writer is not None:
        writer.add_image("samples", grid, step)


# -----------------------------------------------------------------------------
# the run's state: what set-up makes, in named parts that the loop hands on

@dataclasses.dataclass
class Place:
    """Where this process computes: its rank among `world` torchrun processes, its device and precision."""
    rank: int
    world: int
    device: torch.device
    precision: str                 # fp32 | bf16 | fp16
    amp_dtype: torch.dtype | None  # autocast's dtype; None for fp32

    @property
    def is_main(self):
        return self.rank == 0  # only rank 0 prints, logs and writes files


@dataclasses.dataclass
class TrainingData:
    dataset: Dataset               # the training split: image files, drawn faces, or their uint8 cache
    store: object                  # the cache's pixels (memory map, or a tensor on the GPU); None without a cache
    steps_per_epoch: int
    valid_real: torch.Tensor | None = None  # rank 0's held-out images for the per-epoch metrics


@dataclasses.dataclass
class Networks:
    G: nn.Module                   # the bare networks, for checkpoints and samples (the step may run wrapped copies)
    D: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    fixed_noise: torch.Tensor      # the z of every sample grid, kept in the checkpoint
    memory_format: torch.memory_format
    step_fn: Callable | None = None  # real batch -> detached statistics: models.train_step, or its CUDA graph


@dataclasses.dataclass
class Progress:
    """Where the loop is, and what it met on the way; all of it but `skipped` and `stop` goes into the checkpoint."""
    epoch: int = 0                 # epochs finished
    done_in_epoch: int = 0         # steps taken in the current epoch
    step: int = 0                  # steps taken in all
    skipped: int = 0               # undecodable images passed over by this invocation
    stop: bool = False             # --max-steps reached or Ctrl-C pressed


@dataclasses.dataclass
class Run:
    """Everything set-up makes, by kind; train() hands each helper the run or the parts it needs."""
    place: Place
    data: TrainingData
    nets: Networks
    progress: Progress
    writer: SummaryWriter | None   # rank 0's TensorBoard log; None on the other ranks


# -----------------------------------------------------------------------------
# data

def batches(cfg, place, train_data, order, first):
    """This epoch's batches from step `first` on: (images on the device, dataset indices of images dropped as undecodable).

    From the uint8 cache when there is one, else decoded every epoch by DataLoader workers
    (--no-cache, synthetic faces); both take the same images for every step.
    """
    steps, rank, world = train_data.steps_per_epoch, place.rank, place.world
    if train_data.store is not None:
        yield from cache.batches(train_data.store, order, first, steps, cfg.batch, rank, world, place.device)
        return
    share = cfg.batch // world
    plan = [order[s * cfg.batch + rank * share:s * cfg.batch + (rank + 1) * share] for s in range(first, steps)]
    loader = DataLoader(train_data.dataset, batch_sampler=plan, num_workers=cfg.workers, pin_memory=place.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global RNG (the noise) untouched
    for (real, ok), indices in zip(loader, plan):
        bad = []
        if not ok.all():
            bad = [indices[i] for i in (~ok).nonzero().flatten().tolist()]
            real = real[ok]
        yield real.to(place.device, non_blocking=True), bad


def load_valid_images(cfg):
    """Held-out images for the per-epoch SWD and raw-D AUC, decoded once."""
    valid = data.build_dataset(cfg.dataset, cfg.data_root, "valid", cfg.image_size, cfg.synthetic_size)
    images = data.load_images(valid, cfg.eval_images, cfg.seed, cfg.workers)
    if len(images) < 2:
        raise UserError(f"the valid split has {len(images)} decodable images; the per-epoch evaluation needs at least 2, so add images")
    return images


def open_image_cache(dataset, cfg, rank):
    """The training split's uint8 cache, built by one process per machine while the others wait."""
    name = f"{cfg.dataset}-{os.path.basename(os.path.normpath(cfg.data_root))}-train"
    builder = int(os.environ.get("LOCAL_RANK", 0)) == 0
    cached = cache.load_or_build(dataset.files, cfg.image_size, cfg.cache_dir, name, build=builder)
    if dist.is_initialized():
        dist.barrier()
        if cached is None:
            cached = cache.load_or_build(dataset.files, cfg.image_size, cfg.cache_dir, name, build=False)
    if cached is None:
        raise UserError(f"process {rank} does not see the image cache under {cfg.cache_dir}; "
                        "give --cache-dir a folder that all processes on a machine share")
    if cached.dropped and rank == 0:
        print(f"warning: {len(cached.dropped)} images could not be decoded and are left out "
              f"(named in {cfg.cache_dir}/.../index.json)", file=sys.stderr)
    return cached


# -----------------------------------------------------------------------------
# set-up

def setup(cfg, ckpt=None):
    """Everything the loop needs, in nanoGPT's order: processes and device, data, models and optimisers (resumed from
    ckpt), and only then the run folder, so that a start that fails on the data, a flag or the checkpoint leaves none."""
    place = choose_place(cfg)
    torch.manual_seed(cfg.seed)
    train_data = load_training_data(cfg, place)
    nets, progress = build_networks(cfg, place, ckpt)
    # rank 0 alone: the held-out images, and, everything being checked, the run folder, config.json and TensorBoard
    start = lambda: (load_valid_images(cfg), open_run_dir(cfg, resumed=ckpt is not None))
    train_data.valid_real, writer = (on_rank0(start, share=False) if place.world > 1 else start()) or (None, None)
    if place.is_main:
        what = (f"{len(train_data.dataset):,} drawn demo faces (--dataset synthetic, not CelebA)" if cfg.dataset == "synthetic"
                else f"{len(train_data.dataset):,} training images")
        print(f"{f'resuming at epoch {progress.epoch}, step {progress.step}' if ckpt is not None else 'training'}: {cfg.run_dir} "
              f"(flags in config.json); {what}, {train_data.steps_per_epoch:,} steps an epoch, on {place.device}"
              + (f" x {place.world} processes ({cfg.batch // place.world} images each per step)" if place.world > 1 else "")
              + f", {place.precision}" + (", the step replayed as one CUDA graph" if cfg.cuda_graphs else "")
              + ", " + ("from the image cache" if train_data.store is not None else f"{cfg.workers} loader workers"))
    return Run(place, train_data, nets, progress, writer)


def choose_place(cfg):
    """This process's rank, device and precision, every flag that does not fit them refused in one sentence."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = pick_device(cfg.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
    if cfg.batch % world:
        raise UserError(f"--batch {cfg.batch} is the global batch and must split evenly over {world} processes")
    use_fast_cuda_kernels(device)
    precision, amp_dtype = pick_precision(cfg.precision, device)
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); leave it out")
    if cfg.cuda_graphs:
        check_cuda_graphs(cfg, device, precision, world)
    return Place(rank, world, device, precision, amp_dtype)


def load_training_data(cfg, place):
    """The training split, from the uint8 cache when there is one."""
    if cfg.dataset == "celeba" and cfg.download and place.is_main:
        data.download_celeba(cfg.data_root)
    dataset = data.build_dataset(cfg.dataset, cfg.data_root, "train", cfg.image_size, cfg.synthetic_size)
    store = None
    if cfg.cache and isinstance(dataset, data.ImageFiles):
        dataset = open_image_cache(dataset, cfg, place.rank)  # only decodable images, in the same order as the file list
        store = cache.to_device(dataset.images, place.device)
    steps_per_epoch = len(dataset) // cfg.batch  # drop_last: every BatchNorm batch is full-sized
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(dataset)} images, fewer than one batch of {cfg.batch}; lower --batch or add images")
    return TrainingData(dataset, store, steps_per_epoch)


def build_networks(cfg, place, ckpt=None):
    """Models, optimisers and the step; on --resume their state, the counters and the RNG from the checkpoint."""
    device = place.device
    G, D = build_models(cfg.to_dict())
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    if cfg.sync_bn and place.world > 1:
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    fused = device.type == "cuda"  # one kernel for the whole Adam update instead of several per tensor
    # capturable: Adam's step count stays on the GPU, so a CUDA graph can replay the update
    adam = lambda net: torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=fused or None,
                                        capturable=cfg.cuda_graphs)
    nets = Networks(G, D, adam(G), adam(D), scaler=torch.amp.GradScaler("cuda") if place.precision == "fp16" else None,
                    fixed_noise=torch.randn(64, cfg.nz, generator=torch.Generator().manual_seed(cfg.seed)),
                    memory_format=memory_format)
    progress = Progress()
    if ckpt is not None:
        resume(nets, progress, ckpt, cfg, device)
    if place.rank > 0:  # every rank draws its own noise; the checkpoint keeps rank 0's generator, the others restart from here
        torch.manual_seed(cfg.seed * 100_003 + place.rank * 1_000_003 + progress.step)
    nets.fixed_noise = nets.fixed_noise.to(device)
    nets.step_fn = make_step(cfg, place, nets)
    return nets, progress


def resume(nets, progress, ckpt, cfg, device):
    """Load the networks, optimisers, counters and RNG state of a training checkpoint, so the run goes on exactly."""
    checkpoint.load_state(nets.G, ckpt["G"], "generator", cfg.resume)
    checkpoint.load_state(nets.D, ckpt["D"], "discriminator", cfg.resume)
    for opt, key in ((nets.opt_G, "opt_G"), (nets.opt_D, "opt_D")):
        opt.load_state_dict(ckpt[key])
        adopt_adam_settings(opt, fused=device.type == "cuda", capturable=cfg.cuda_graphs)
    if nets.scaler is not None and "scaler" in ckpt:
        nets.scaler.load_state_dict(ckpt["scaler"])
    progress.epoch, progress.done_in_epoch, progress.step = ckpt["epoch"], ckpt["done_in_epoch"], ckpt["step"]
    nets.fixed_noise = ckpt["fixed_noise"]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)


def make_step(cfg, place, nets):
    """The GAN step as the loop calls it: real batch -> statistics, compiled, wrapped for DDP or captured as asked."""
    # G and D stay the bare networks (checkpoints, samples); G_train and D_train are what the step runs.
    G_train, D_train = (torch.compile(nets.G), torch.compile(nets.D)) if cfg.compile else (nets.G, nets.D)
    if place.world > 1:
        # Two wrappers, one per network, so each backward all-reduces only its own network's gradients.
        ids = [place.device.index] if place.device.type == "cuda" else None
        G_train, D_train = DDP(G_train, device_ids=ids), DDP(D_train, device_ids=ids)
    # a CUDA graph must not capture autocast's cache of cast weights: the weights change between replays
    autocast = (functools.partial(torch.autocast, place.device.type, dtype=place.amp_dtype, cache_enabled=not cfg.cuda_graphs)
                if place.amp_dtype else contextlib.nullcontext)
    if cfg.cuda_graphs:
        return CudaGraphStep(nets.G, nets.D, nets.opt_G, nets.opt_D, cfg.nz, autocast, batch=cfg.batch)  # captured at the first full batch
    return lambda real: models.train_step(G_train, D_train, nets.opt_G, nets.opt_D, real, cfg.nz, autocast, nets.scaler)


def check_cuda_graphs(cfg, device, precision, world):
    """--cuda-graphs replays one captured step on one GPU; everything it cannot capture is one sentence."""
    if device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA GPU and this run is on {device}; leave it out "
                        "(or add --no-cuda-graphs when resuming a run that used it)")
    if world > 1:
        raise UserError("--cuda-graphs runs in one process, not under torchrun; leave it out")
    if cfg.compile:
        raise UserError("--cuda-graphs and --compile both rework the step; pick one")
    if precision == "fp16":
        raise UserError("--cuda-graphs cannot capture fp16's GradScaler, which reads the GPU to decide each step; "
                        "use --precision bf16 or fp32")


def adopt_adam_settings(opt, *, fused, capturable):
    """A loaded Adam takes this run's kernel settings, not those of the machine that saved it.

    load_state_dict brings the saved groups' flags and leaves each `step` count where the
    saving run kept it: on the GPU for fused or capturable Adam, on the CPU otherwise. The
    values are unchanged, so a resumed run continues exactly.
    """
    for group in opt.param_groups:
        group["fused"], group["capturable"] = fused or None, capturable
        for p in group["params"]:
            state = opt.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(p.device if fused or capturable else "cpu", torch.float32)


# -----------------------------------------------------------------------------
# training

def train(cfg, ckpt=None):
    """Train from scratch, or from a checkpoint dict, until cfg.epochs or cfg.max_steps; returns the last stats.

    Set-up, then one loop over epochs: train_one_epoch steps, logs and samples; each epoch's
    end (evaluation, checkpoint) has a function of its own. Under torchrun every process
    calls this; only rank 0 prints, logs and writes files.
    """
    run = setup(cfg, ckpt)
    place, nets, progress = run.place, run.nets, run.progress
    ctrl_c, last, clock = CtrlC(place.world), None, Throughput()
    progress.stop = cfg.max_steps is not None and progress.step >= cfg.max_steps
    try:
        while progress.epoch < cfg.epochs and not progress.stop:
            last = train_one_epoch(cfg, run, clock, ctrl_c, last)
            with clock.paused():  # images/second counts training time only, not evaluation and checkpoints
                if not progress.stop:
                    progress.epoch, progress.done_in_epoch = progress.epoch + 1, 0
                    end_of_epoch(cfg, run, last)
                if place.is_main and (last is not None or not progress.stop):  # a step was taken, or at least an epoch's end reached
                    save_checkpoint(cfg, nets, progress, last, place.device)
        if place.is_main and not progress.stop and progress.epoch >= cfg.epochs and cfg.detector_steps > 0:
            # Its checkpoint is written, so from here Ctrl-C simply stops; evaluate.py can redo this part.
            ctrl_c.restore()
            detector_and_report(cfg, nets, progress, place.device)
    finally:
        ctrl_c.restore()
        if run.writer is not None:
            run.writer.close()
    say_where_it_stopped(cfg, place, progress, ctrl_c.pressed)
    stats = {k: v.item() for k, v in last.items()} if last is not None else {}
    return {**stats, "step": progress.step, "epoch": progress.epoch, "interrupted": ctrl_c.pressed}


def train_one_epoch(cfg, run, clock, ctrl_c, last):
    """The current epoch's remaining steps, until its end or a stop; returns the last step's statistics (or `last`)."""
    place, nets, progress = run.place, run.nets, run.progress
    order = data.epoch_order(len(run.data.dataset), cfg.seed, progress.epoch)
    bar = tqdm(batches(cfg, place, run.data, order, progress.done_in_epoch), desc=f"epoch {progress.epoch + 1}/{cfg.epochs}",
               total=run.data.steps_per_epoch, initial=progress.done_in_epoch, dynamic_ncols=True, disable=not place.is_main)
    for real, bad in bar:
        if bad:
            progress.skipped = data.report_skipped(run.data.dataset, bad, progress.skipped)
        if len(real) > 1:  # BatchNorm needs two images; a batch of all-broken files is passed over
            last = nets.step_fn(real.contiguous(memory_format=nets.memory_format))
            clock.images += len(real) * place.world
        progress.step += 1
        progress.done_in_epoch += 1
        progress.stop = ctrl_c.pressed or (cfg.max_steps is not None and progress.step >= cfg.max_steps)
        # every log_every steps, and at an epoch's end or a stop, so that short runs have curves too
        epoch_end = progress.done_in_epoch == run.data.steps_per_epoch
        if last is not None and (progress.step % cfg.log_every == 0 or epoch_end or progress.stop):
            log_losses(cfg, run, last, clock, bar)
        if progress.step % cfg.sample_every == 0 and place.is_main:
            with clock.paused():
                write_grid(nets.G, nets.fixed_noise, os.path.join(cfg.run_dir, "samples", f"step_{progress.step:07d}.png"),
                           run.writer, progress.step)
        if progress.stop:
            break
    bar.close()
    return last


def say_where_it_stopped(cfg, place, progress, interrupted):
    if progress.skipped:
        print(f"warning: {progress.skipped} images could not be decoded and were skipped", file=sys.stderr)
    if interrupted:
        print(f"stopped at step {progress.step}; continue with: python main.py --resume {cfg.run_dir}", file=sys.stderr)
    elif place.is_main:
        grids = sorted(glob.glob(os.path.join(cfg.run_dir, "samples", "*.png")), key=os.path.getmtime)
        epoch = progress.epoch + (progress.done_in_epoch > 0)  # as the bar counts: a stop within an epoch is in that epoch
        print(f"done at epoch {epoch}/{cfg.epochs}, step {progress.step}; run folder: {cfg.run_dir}"
              + (f"; last sample grid: {grids[-1]}" if grids else "")
              + f"\nsee the curves and grids with: tensorboard --logdir={os.path.dirname(os.path.normpath(cfg.run_dir))}")


def log_losses(cfg, run, last, clock, bar):
    values = {k: v.item() for k, v in last.items()}  # a CPU-GPU sync point, hence not at every step
    check_finite(last, run.progress.step, cfg.run_dir)
    if run.place.is_main:  # rank 0's statistics, from its share of the batch
        for k, v in values.items():
            run.writer.add_scalar(k, v, run.progress.step)
        run.writer.add_scalar("perf/images_per_sec", clock.images_per_sec(), run.progress.step)
    clock.restart()
    bar.set_postfix(loss_D=f"{values['loss/D']:.3f}", loss_G=f"{values['loss/G']:.3f}", D_x=f"{values['D(x)']:.2f}")


def end_of_epoch(cfg, run, last):
    """The networks checked finite before anything is written; then rank 0's sample grid, G snapshot and evaluation."""
    nets, progress, writer = run.nets, run.progress, run.writer
    check_finite(last, progress.step, cfg.run_dir, G=nets.G, D=nets.D)
    if not run.place.is_main:
        return
    with tqdm(total=3, desc=f"end of epoch {progress.epoch}", leave=False, dynamic_ncols=True) as bar:
        bar.set_postfix_str("sample grid")
        write_grid(nets.G, nets.fixed_noise, os.path.join(cfg.run_dir, "samples", f"epoch_{progress.epoch:03d}.png"), writer, progress.step)
        bar.update()
        bar.set_postfix_str("G snapshot")
        # fakes from earlier generators for the detector
        checkpoint.save_snapshot(nets.G, cfg.to_dict(), progress.epoch, progress.step, cfg.run_dir)
        bar.update()
        bar.set_postfix_str(f"SWD and raw-D AUC on {len(run.data.valid_real)} valid images")
        for k, v in reports.epoch_metrics(nets.G, nets.D, run.data.valid_real, run.place.device, progress.epoch).items():
            writer.add_scalar(k, v, progress.step)
        bar.update()


def save_checkpoint(cfg, nets, progress, last, device):
    check_finite(last, progress.step, cfg.run_dir, G=nets.G, D=nets.D)  # never overwrite the last good checkpoint with a diverged model
    checkpoint.save({
        "config": cfg.to_dict(), "G": nets.G.state_dict(), "D": nets.D.state_dict(),
        "opt_G": nets.opt_G.state_dict(), "opt_D": nets.opt_D.state_dict(),
        "epoch": progress.epoch, "done_in_epoch": progress.done_in_epoch, "step": progress.step,
        "fixed_noise": nets.fixed_noise.cpu(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        **({"scaler": nets.scaler.state_dict()} if nets.scaler is not None else {}),
    }, os.path.join(cfg.run_dir, "checkpoint.pt"), "training", keep=True)  # where it cannot be written, it is kept elsewhere


def detector_and_report(cfg, nets, progress, device):
    """The GAN is done: fine-tune the detector, then the test-set report (detector.pt, metrics.json)."""
    # plain copies: with --sync-bn the networks' BatchNorm would wait for ranks that have finished
    G_eval, D_eval = build_models(cfg.to_dict())
    G_eval.load_state_dict(nets.G.state_dict()), D_eval.load_state_dict(nets.D.state_dict())
    # the report's TensorBoard is RUN/eval, where evaluate.py writes its reports too (each replacing the last)
    writer = reports.report_writer(os.path.join(cfg.run_dir, "eval"))
    try:
        reports.evaluate_run(cfg, G_eval.to(device), D_eval.to(device), cfg.run_dir, step=progress.step, epoch=progress.epoch,
                             detector_steps=cfg.detector_steps, eval_images=cfg.eval_images, inception_weights=cfg.inception_weights,
                             device=device, writer=writer)
    finally:
        writer.close()


def check_finite(stats, step, run_dir, **networks):
    """One sentence on a non-finite loss or weight, checked before anything is written, so that no file holds a diverged model."""
    bad = [f"{k}={v.item()}" for k, v in (stats or {}).items() if not torch.isfinite(v).all()]
    for name, net in networks.items():
        if broken := nonfinite(net):  # BatchNorm's running statistics too: they are what scoring in eval mode uses
            bad.append(f"non-finite weights in {name}: {', '.join(broken[:3])}")
    if bad:
        raise UserError(f"training diverged at step {step} ({', '.join(bad)}); "
                        f"nothing was saved after it, so {run_dir} keeps the last good checkpoint if an epoch had finished. "
                        "Start a new run with a lower --lr or another --seed")


class Throughput:
    """Images per second over training time alone: time spent in paused() (evaluation, checkpoints, grids) is left out."""

    def __init__(self):
        self.restart()

    def restart(self):
        self.start, self.excluded, self.images = time.perf_counter(), 0.0, 0

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def images_per_sec(self):
        return self.images / max(time.perf_counter() - self.start - self.excluded, 1e-9)


class CtrlC:
    """Ctrl-C finishes the step in flight, writes a checkpoint and stops; a second Ctrl-C stops at once.

    `pressed` is what the loop reads. Not under torchrun: processes would stop after different
    steps and wait on each other forever.
    """

    def __init__(self, world):
        self.pressed, self.main_pid = False, os.getpid()
        self.previous = signal.signal(signal.SIGINT, self.on_sigint) if world == 1 else signal.getsignal(signal.SIGINT)

    def on_sigint(self, signum, frame):
        if os.getpid() != self.main_pid:  # a DataLoader worker inherited this handler: the main process speaks for all
            return
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        tqdm.write("stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


# -----------------------------------------------------------------------------
# the command

def check_paths(cfg):
    """Files the run needs only at its end must exist at its start."""
    if cfg.inception_weights:
        metrics.check_inception_weights(cfg.inception_weights)


def make_config(argv=None):
    """Flags -> (Config, checkpoint dict or None). On --resume the checkpoint's config wins but for RESUME_OVERRIDES.

    Nothing is written here: the run folder is made by setup, once the data is checked too.
    """
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cfg = Config(**vars(args))
    check_paths(cfg)  # now, not after hours of training
    if args.resume is None:
        cfg.run_dir = pick_run_dir(cfg)
        return cfg, None
    ckpt = checkpoint.load(args.resume, use="--resume")
    saved = Config.from_dict(ckpt["config"])
    explicit = explicit_flags(parser, argv)
    for key in SHAPE_KEYS:
        if key in explicit and getattr(cfg, key) != getattr(saved, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, key)} differs from the checkpoint's {getattr(saved, key)}; "
                            f"the model's shape comes from the checkpoint, so leave {flag} out")
    fixed = sorted(k for k in explicit - set(RESUME_OVERRIDES) - set(SHAPE_KEYS) - {"resume", "max_steps"}
                   if getattr(cfg, k) != getattr(saved, k))
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UserError(f"{flags} cannot change when resuming (the run continues as it started); "
                        f"start a new run instead, or leave {'it' if len(fixed) == 1 else 'them'} out")
    resumed = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in RESUME_OVERRIDES if k in explicit})
    resumed.max_steps = cfg.max_steps  # a stop for one invocation: resuming a --max-steps run continues it
    resumed.resume = args.resume
    resumed.run_dir = os.path.dirname(os.path.abspath(checkpoint.resolve(args.resume)))
    return resumed, ckpt


def init_distributed():
    """Join torchrun's process group when it started more than one process -> (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # gloo for CPU tensors (and CPU training), NCCL for GPU tensors. A long timeout: one process per
    # machine may be building the image cache while the others wait at a barrier.
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                            timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size()


def on_rank0(fn, share=True):
    """Run fn on rank 0 alone; a UserError there stops every rank (rank 0 says why, once).

    Returns fn's result on rank 0, and on the other ranks too when share (it is sent to them).
    """
    box, result = [None], None
    if dist.get_rank() == 0:
        try:
            result = fn()
            box[0] = ("ok", result if share else None)
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    kind, value = box[0]
    if kind == "error":
        if dist.get_rank() == 0:
            raise UserError(value)
        raise SystemExit(2)
    return result if dist.get_rank() == 0 else value


def main(argv=None):
    rank, world = init_distributed()
    try:
        # Only rank 0 picks the run folder (and reads the checkpoint, which the other machines may not
        # have); every rank gets the same config and checkpoint from it.
        cfg, ckpt = on_rank0(lambda: make_config(argv)) if world > 1 else make_config(argv)
        result = train(cfg, ckpt)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
