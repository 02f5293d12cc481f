"""Train a DCGAN on CelebA (or any folder of images) and log it to TensorBoard.

    python main.py --epochs 10 --batch 128                  # CelebA under data/celeba
    python main.py --dataset synthetic --epochs 1           # drawn demo faces, no download
    python main.py --resume runs/generative_model/001-celeba-64   # continue a stopped run
    tensorboard --logdir=runs
"""

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

import cache
import checkpoint
import data
import metrics
from cli import (PRECISIONS, ArgumentParser, UserError, at_least, below_one, explicit_flags, one_of, pick_device, pick_precision,
                 run_cli, use_fast_cuda_kernels)
from checkpoint import SHAPE_KEYS
from models import IMAGE_SIZES, build_models, draw_samples, train_step

# Flags a resumed run may change; everything else (the model's shape above all) comes from its checkpoint.
RESUME_OVERRIDES = ("epochs", "workers", "device", "data_root", "log_every", "sample_every",
                    "cache", "cache_dir", "precision", "channels_last", "compile", "sync_bn",
                    "detector_steps", "detector_data", "inception_weights", "eval_images")


def get_args_parser():
    p = ArgumentParser(description="Train a DCGAN (Radford et al. 2015) and log it to TensorBoard.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=("celeba", "folder", "synthetic"), default="celeba",
                   help="celeba: CelebA under --data-root in torchvision's, Kaggle's or a plain layout; "
                        "folder: every image under --data-root, recursively; synthetic: drawn demo faces, no download")
    g.add_argument("--data-root", default="data/celeba", help="where the images are")
    g.add_argument("--download", action="store_true", help="try torchvision's CelebA download into --data-root first")
    g.add_argument("--synthetic-size", type=at_least(1), default=10_000, help="images in the synthetic training set")
    g.add_argument("--workers", type=at_least(0), default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes decoding images with --no-cache or --dataset synthetic; 0 decodes in the main process")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the images once into a uint8 cache (memory-mapped, rebuilt when the files change) and "
                        "feed batches from it without loader workers; --no-cache decodes every image every epoch")
    g.add_argument("--cache-dir", default="data/cache", help="where image caches are kept (CelebA at 64x64 takes about 2.5 GB)")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=one_of(IMAGE_SIZES, "a power of two from 32 to 256"), default=64, help="image side: 32, 64, 128 or 256 (blocks are added or removed)")
    g.add_argument("--nz", type=at_least(1), default=100, help="length of the latent vector z")
    g.add_argument("--ngf", type=at_least(1), default=64, help="generator width (feature maps of its last hidden layer)")
    g.add_argument("--ndf", type=at_least(1), default=64, help="discriminator width (feature maps of its first layer)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=at_least(1), default=10, help="passes over the training split")
    g.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps in total, with a checkpoint (this invocation only, not kept on --resume)")
    g.add_argument("--batch", type=at_least(1), default=128, help="images per step")
    g.add_argument("--lr", type=at_least(1e-12, float), default=2e-4, help="Adam learning rate, both networks (paper: 2e-4)")
    g.add_argument("--beta1", type=below_one, default=0.5, help="Adam beta1 (paper: 0.5; the default 0.9 oscillates)")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, the noise and the data order")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (under torchrun: each rank's LOCAL_RANK GPU)")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on GPUs that support it, else fp32; fp16 uses a GradScaler and needs CUDA")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="keep images and activations channels-last in memory (NHWC), which the fast convolutions want")
    g.add_argument("--compile", action="store_true", help="torch.compile both networks (slow first steps; helps most on GPUs)")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun on GPUs: BatchNorm statistics over the global batch rather than each rank's share")
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


def new_run_dir(logdir, run_name, cfg):
    if run_name is None:
        taken = [int(m.group(1)) for d in (os.listdir(logdir) if os.path.isdir(logdir) else []) if (m := re.match(r"(\d+)-", d))]
        run_name = f"{max(taken, default=0) + 1:03d}-{cfg['dataset']}-{cfg['image_size']}"
    run_dir = os.path.join(logdir, run_name)
    if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --run-name")
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    return run_dir


def write_grid(G, z, path, writer=None, step=0):
    images = draw_samples(G, z).float().cpu()
    grid = make_grid(images, nrow=int(math.sqrt(len(images))) or 1, normalize=True, value_range=(-1, 1))
    save_image(grid, path)
    if writer is not None:
        writer.add_image("samples", grid, step)


def loader_batches(dataset, order, first_step, steps, batch, rank, world, device, workers, seed):
    """Batches decoded every epoch by DataLoader workers (--no-cache, synthetic faces); same images per step as cache.batches.

    Yields (images on the device, dataset indices of images that could not be decoded and were dropped).
    """
    share = batch // world
    plan = [order[s * batch + rank * share:s * batch + (rank + 1) * share] for s in range(first_step, steps)]
    loader = DataLoader(dataset, batch_sampler=plan, num_workers=workers, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))  # keeps the global RNG (the noise) untouched
    for (real, ok), indices in zip(loader, plan):
        bad = []
        if not ok.all():
            bad = [indices[i] for i in (~ok).nonzero().flatten().tolist()]
            real = real[ok]
        yield real.to(device, non_blocking=True), bad


def open_image_cache(dataset, cfg, rank):
    """The training split's uint8 cache, built by one process per machine while the others wait."""
    name = f"{cfg['dataset']}-{os.path.basename(os.path.normpath(cfg['data_root']))}-train"
    builder = int(os.environ.get("LOCAL_RANK", 0)) == 0
    cached = cache.load_or_build(dataset.files, cfg["image_size"], cfg["cache_dir"], name, build=builder)
    if dist.is_initialized():
        dist.barrier()
        if cached is None:
            cached = cache.load_or_build(dataset.files, cfg["image_size"], cfg["cache_dir"], name, build=False)
    if cached is None:
        raise UserError(f"process {rank} does not see the image cache under {cfg['cache_dir']}; "
                        "give --cache-dir a folder that all processes on a machine share")
    if cached.dropped and rank == 0:
        print(f"warning: {len(cached.dropped)} images could not be decoded and are left out "
              f"(named in {cfg['cache_dir']}/.../index.json)", file=sys.stderr)
    return cached


# -----------------------------------------------------------------------------
# training

def train(cfg, ckpt=None):
    """Train from scratch, or from a checkpoint dict, until cfg's epochs or max_steps; returns the last stats.

    Under torchrun every process calls this; only rank 0 prints, logs and writes files.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    is_main = rank == 0
    log = print if is_main else (lambda *args, **kwargs: None)
    device = pick_device(cfg["device"])
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per process
    if cfg["batch"] % world:
        raise UserError(f"--batch {cfg['batch']} is the global batch and must split evenly over {world} processes")
    use_fast_cuda_kernels(device)
    precision, amp_dtype = pick_precision(cfg["precision"], device)
    if cfg["sync_bn"] and world > 1 and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm does not run on CPU); leave it out")
    torch.manual_seed(cfg["seed"])
    if cfg["dataset"] == "celeba" and cfg.get("download") and is_main:
        data.download_celeba(cfg["data_root"])
    dataset = data.build_dataset(cfg["dataset"], cfg["data_root"], "train", cfg["image_size"], cfg["synthetic_size"])
    cached = open_image_cache(dataset, cfg, rank) if cfg["cache"] and isinstance(dataset, data.ImageFiles) else None
    if cached is not None:
        dataset = cached  # only decodable images, in the same order as the file list
        store = cache.to_device(cached.images, device)
    steps_per_epoch = len(dataset) // cfg["batch"]  # drop_last: every BatchNorm batch is full-sized
    if steps_per_epoch == 0:
        raise UserError(f"the training split has {len(dataset)} images, fewer than one batch of {cfg['batch']}; lower --batch or add images")
    if cfg["dataset"] == "synthetic":
        log(f"note: --dataset synthetic trains on {len(dataset):,} drawn cartoon faces, a demo set, not CelebA")
    source = "from the image cache" if cached is not None else f"{cfg['workers']} loader workers"
    log(f"training on {len(dataset):,} images ({steps_per_epoch:,} steps per epoch) on {device}"
        + (f" x {world} processes ({cfg['batch'] // world} images each per step)" if world > 1 else "")
        + f", {precision}, {source}")

    G, D = build_models(cfg)
    memory_format = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
    G, D = G.to(device, memory_format=memory_format), D.to(device, memory_format=memory_format)
    if cfg["sync_bn"] and world > 1:
        G, D = nn.SyncBatchNorm.convert_sync_batchnorm(G), nn.SyncBatchNorm.convert_sync_batchnorm(D)
    fused = device.type == "cuda"  # one kernel for the whole Adam update instead of several per tensor
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], 0.999), fused=fused or None)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=(cfg["beta1"], 0.999), fused=fused or None)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    fixed_noise = torch.randn(64, cfg["nz"], generator=torch.Generator().manual_seed(cfg["seed"]))
    epoch, done_in_epoch, step = 0, 0, 0
    if ckpt is not None:
        checkpoint.load_state(G, ckpt["G"], "generator", cfg["resume"])
        checkpoint.load_state(D, ckpt["D"], "discriminator", cfg["resume"])
        opt_G.load_state_dict(ckpt["opt_G"])
        opt_D.load_state_dict(ckpt["opt_D"])
        for group in opt_G.param_groups + opt_D.param_groups:
            group["fused"] = fused or None  # a checkpoint from another device must not bring its Adam kernel along
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        epoch, done_in_epoch, step = ckpt["epoch"], ckpt["done_in_epoch"], ckpt["step"]
        fixed_noise = ckpt["fixed_noise"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        log(f"resuming {cfg['run_dir']} at epoch {epoch}, step {step}")
    if rank > 0:  # every rank draws its own noise; the checkpoint keeps rank 0's generator, the others restart from here
        torch.manual_seed(cfg["seed"] * 100_003 + rank * 1_000_003 + step)
    fixed_noise = fixed_noise.to(device)

    # G and D stay the bare networks (checkpoints, samples); G_train and D_train are what the step runs.
    G_train, D_train = (torch.compile(G), torch.compile(D)) if cfg["compile"] else (G, D)
    if world > 1:
        # Two wrappers, one per network, so each backward all-reduces only its own network's gradients.
        ids = [device.index] if device.type == "cuda" else None
        G_train, D_train = DDP(G_train, device_ids=ids), DDP(D_train, device_ids=ids)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext

    run_dir = cfg["run_dir"]
    writer = SummaryWriter(run_dir) if is_main else None
    # held-out images for the per-epoch SWD and raw-D AUC, decoded once
    valid_real = data.load_images(data.build_dataset(cfg["dataset"], cfg["data_root"], "valid", cfg["image_size"], cfg["synthetic_size"]),
                                      cfg.get("eval_images", 1000), cfg["seed"], cfg["workers"]) if is_main else None
    if is_main and len(valid_real) < 2:
        raise UserError(f"the valid split has {len(valid_real)} decodable images; the per-epoch evaluation needs at least 2, so add images")
    if ckpt is None and is_main:
        writer.add_text("config", "```\n" + json.dumps(cfg, indent=2) + "\n```")
        if cfg["dataset"] == "synthetic":
            writer.add_text("data", "drawn cartoon faces (--dataset synthetic): a demo set, not CelebA")
        for summary in hparams({k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))},
                               {"loss/D": 0, "loss/G": 0}):
            writer._get_file_writer().add_summary(summary)

    def save_checkpoint(last):
        if last is not None:
            check_finite(last, step, run_dir)  # never overwrite the last good checkpoint with a diverged model
        checkpoint.save({
            "config": cfg, "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
            "epoch": epoch, "done_in_epoch": done_in_epoch, "step": step, "fixed_noise": fixed_noise.cpu(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
        }, os.path.join(run_dir, "checkpoint.pt"), "training")

    # Ctrl-C finishes the step in flight, writes a checkpoint and stops; a second Ctrl-C stops at once.
    # Not under torchrun: processes would stop after different steps and wait on each other forever.
    interrupted, main_pid = [], os.getpid()
    def on_sigint(signum, frame):
        if os.getpid() != main_pid:  # a DataLoader worker inherited this handler: the main process speaks for all
            return
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        tqdm.write("stopping after this step and writing a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if world == 1 else signal.getsignal(signal.SIGINT)

    last, skipped = None, [0]
    t0, images_since = time.time(), 0
    stop = cfg["max_steps"] is not None and step >= cfg["max_steps"]
    try:
        while epoch < cfg["epochs"] and not stop:
            order = data.epoch_order(len(dataset), cfg["seed"], epoch)
            if cached is not None:
                batches = cache.batches(store, order, done_in_epoch, steps_per_epoch, cfg["batch"], rank, world, device)
            else:
                batches = loader_batches(dataset, order, done_in_epoch, steps_per_epoch, cfg["batch"], rank, world, device,
                                         cfg["workers"], cfg["seed"])
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg['epochs']}", total=steps_per_epoch, initial=done_in_epoch,
                       dynamic_ncols=True, disable=not is_main)
            for real, bad in bar:
                if bad:
                    data.report_skipped(dataset, bad, skipped)
                if len(real) > 1:  # BatchNorm needs two images; a batch of all-broken files is passed over
                    last = train_step(G_train, D_train, opt_G, opt_D, real.contiguous(memory_format=memory_format), cfg["nz"],
                                      autocast, scaler)
                    images_since += len(real) * world
                step += 1
                done_in_epoch += 1

                if step % cfg["log_every"] == 0 and last is not None:
                    values = {k: v.item() for k, v in last.items()}  # a CPU-GPU sync point, hence only every log_every steps
                    check_finite(last, step, run_dir)
                    if is_main:  # rank 0's statistics, from its share of the batch
                        for k, v in values.items():
                            writer.add_scalar(k, v, step)
                        writer.add_scalar("perf/images_per_sec", images_since / (time.time() - t0), step)
                    t0, images_since = time.time(), 0
                    bar.set_postfix(loss_D=f"{values['loss/D']:.3f}", loss_G=f"{values['loss/G']:.3f}", D_x=f"{values['D(x)']:.2f}")
                if step % cfg["sample_every"] == 0 and is_main:
                    write_grid(G, fixed_noise, os.path.join(run_dir, "samples", f"step_{step:07d}.png"), writer, step)
                if interrupted or (cfg["max_steps"] is not None and step >= cfg["max_steps"]):
                    stop = True
                    break
            bar.close()
            if not stop:
                epoch, done_in_epoch = epoch + 1, 0
                if is_main:
                    write_grid(G, fixed_noise, os.path.join(run_dir, "samples", f"epoch_{epoch:03d}.png"), writer, step)
                    checkpoint.save_snapshot(G, cfg, epoch, step, run_dir)  # fakes from earlier generators for the detector
                    for k, v in metrics.epoch_metrics(G, D, valid_real, cfg, device, epoch).items():
                        writer.add_scalar(k, v, step)
            if is_main and (last is not None or not stop):  # a step was taken, or at least an epoch's end reached
                save_checkpoint(last)
        if is_main and not stop and epoch >= cfg["epochs"] and cfg.get("detector_steps", 0) > 0:
            # the GAN is done: fine-tune the detector, then the test-set report (detector.pt, metrics.json).
            # Its checkpoint is written, so from here Ctrl-C simply stops; evaluate.py can redo this part.
            signal.signal(signal.SIGINT, previous_handler)
            # plain copies: with --sync-bn the networks' BatchNorm would wait for ranks that have finished
            G_eval, D_eval = build_models(cfg)
            G_eval.load_state_dict(G.state_dict()), D_eval.load_state_dict(D.state_dict())
            metrics.evaluate_run(cfg, G_eval.to(device), D_eval.to(device), run_dir, step=step, epoch=epoch, detector_steps=cfg["detector_steps"],
                                  eval_images=cfg.get("eval_images", 1000), inception_weights=cfg.get("inception_weights"),
                                  detector_data=cfg.get("detector_data"), device=device, writer=writer)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if writer is not None:
            writer.close()
    if skipped[0]:
        print(f"warning: {skipped[0]} images could not be decoded and were skipped", file=sys.stderr)
    if interrupted:
        print(f"stopped at step {step}; continue with: python main.py --resume {run_dir}", file=sys.stderr)
    else:
        log(f"done at epoch {epoch}, step {step}; run folder: {run_dir}")
    stats = {k: v.item() for k, v in last.items()} if last is not None else {}
    return {**stats, "step": step, "epoch": epoch, "interrupted": bool(interrupted)}


def check_finite(stats, step, run_dir):
    bad = {k: v.item() for k, v in stats.items() if not torch.isfinite(v).all()}
    if bad:
        raise UserError(f"training diverged at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                        f"nothing was saved after it, so {run_dir} keeps the last good checkpoint if an epoch had finished. "
                        "Start a new run with a lower --lr or another --seed")


def check_paths(cfg):
    """Files the run needs only at its end must exist at its start."""
    if cfg["inception_weights"]:
        metrics.check_inception_weights(cfg["inception_weights"])
    if cfg["detector_data"]:
        data.check_detector_data(cfg["detector_data"])


def make_config(argv=None):
    """Flags -> (config dict, checkpoint dict or None). On --resume the checkpoint's config wins but for RESUME_OVERRIDES."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    cfg = vars(args)
    cfg["channels"] = 3
    check_paths(cfg)  # now, not after hours of training
    if args.resume is None:
        cfg["run_dir"] = new_run_dir(args.logdir, args.run_name, cfg)
        return cfg, None
    ckpt = checkpoint.load(args.resume, use="--resume")
    explicit = explicit_flags(parser, argv)
    for key in SHAPE_KEYS:
        if key in explicit and cfg[key] != ckpt["config"][key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {cfg[key]} differs from the checkpoint's {ckpt['config'][key]}; the model's shape comes from the checkpoint, so leave {flag} out")
    fixed = sorted(k for k in explicit - set(RESUME_OVERRIDES) - set(SHAPE_KEYS) - {"resume", "max_steps"}
                   if cfg[k] != ckpt["config"].get(k))
    if fixed:
        flags = ", ".join("--" + k.replace("_", "-") for k in fixed)
        raise UserError(f"{flags} cannot change when resuming (the run continues as it started); "
                        f"start a new run instead, or leave {'it' if len(fixed) == 1 else 'them'} out")
    resumed = dict(ckpt["config"])
    resumed.update({k: cfg[k] for k in RESUME_OVERRIDES if k in explicit or k not in resumed})  # new flags: today's defaults
    resumed["max_steps"] = cfg["max_steps"]  # a stop for one invocation: resuming a --max-steps run continues it
    resumed["resume"] = args.resume
    resumed["run_dir"] = os.path.dirname(os.path.abspath(checkpoint.resolve(args.resume)))
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


def on_rank0(fn):
    """Run fn on rank 0 alone (it may create folders, read checkpoints) and give every rank its result."""
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
    kind, value = box[0]
    if kind == "error":
        if dist.get_rank() == 0:
            raise UserError(value)
        raise SystemExit(2)  # rank 0 says why, once
    return value


def main(argv=None):
    rank, world = init_distributed()
    try:
        # Only rank 0 picks and creates the run folder (and reads the checkpoint, which the other
        # machines may not have); every rank gets the same config and checkpoint from it.
        cfg, ckpt = on_rank0(lambda: make_config(argv)) if world > 1 else make_config(argv)
        if rank == 0:
            print(json.dumps(cfg, indent=2))
            with open(os.path.join(cfg["run_dir"], "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
        result = train(cfg, ckpt)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
