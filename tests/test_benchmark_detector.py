"""benchmark.py detector: its PIL baseline degrades faces as blends.frame_augment does, and the report is printed."""

import torch

import benchmark
import data
import blends


def test_the_pil_baseline_and_frame_augment_degrade_alike():
    # the before-and-after comparison means something only if both do the same work
    faces = torch.stack([data.SyntheticFaces(32, 32, seed=0)[i][0] for i in range(32)]).repeat(12, 1, 1, 1)
    clean = data.quantize(faces)
    shares = []
    for augment in (lambda x, g: benchmark.pil_frame_augment(x, g), lambda x, g: blends.frame_augment(x, g)):
        out = augment(faces, torch.Generator().manual_seed(0))
        assert torch.equal(out, data.quantize(out))
        flipped = (out - clean.flip(-1)).abs().flatten(1).mean(1) < (out - clean).abs().flatten(1).mean(1)
        as_drawn = torch.where(flipped[:, None, None, None], out.flip(-1), out)
        shares.append(((as_drawn == clean).flatten(1).all(1).float().mean(), flipped.float().mean(),
                       (as_drawn - clean).abs().mean()))
    (untouched_a, flips_a, change_a), (untouched_b, flips_b, change_b) = shares
    assert abs(flips_a - 0.5) < 0.08 and abs(flips_b - 0.5) < 0.08
    assert abs(untouched_a - untouched_b) < 0.06  # about 0.1 each: nothing but a flip drawn
    assert 0.8 < change_a / change_b < 1.25


def test_bench_detector_reports_the_rates_and_their_ratio_from_its_clock(capsys, monkeypatch):
    # a clock that moves only while augmenting, 3 s a PIL batch and 1 s a tensor batch: the rates and their ratio are known
    now = [0.0]
    real_pil, real_tensor = benchmark.pil_frame_augment, benchmark.frame_augment

    def taking(seconds, augment):
        def timed_augment(*args, **kwargs):
            now[0] += seconds
            return augment(*args, **kwargs)
        return timed_augment

    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(benchmark, "pil_frame_augment", taking(3.0, real_pil))
    monkeypatch.setattr(benchmark, "frame_augment", taking(1.0, real_tensor))
    assert benchmark.cli(["detector", "--image-size", "32", "--batch", "4", "--ngf", "8", "--ndf", "8", "--faces", "8",
                          "--steps", "2", "--rounds", "1", "--threads", "1", "--arch", "dcgan"]) == 0
    out = capsys.readouterr().out
    assert "benchmark detector: cpu (" in out and "torch threads 1" in out
    assert "| cpu, 32x32, 8 images a step | PIL per image (before) | tensor ops on the device (after) | after / before |" in out
    for row in ("augmentations alone, images/s", "detector training, images/s"):  # 8 images a batch in 3 s and in 1 s
        assert f"  {row}: PIL per image (before) 3, tensor ops on the device (after) 8" in out
        assert f"| {row} | 2.7 | 8.0 | 3.0x |" in out


def test_bench_networks_reports_each_networks_rate_against_the_first(capsys, monkeypatch):
    # a clock that moves only in the networks' forward pass, by a time per network: the rates and their ratios are known
    import detector
    now = [0.0]
    cost = {"mobilenet_v3_large": 2.0, "tf_efficientnet_lite0": 0.5}
    real_forward = detector.Detector.forward

    def timed_forward(self, x):
        now[0] += cost[self.arch]
        return real_forward(self, x)
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(detector.Detector, "forward", timed_forward)
    assert benchmark.cli(["networks", "mobilenet_v3_large:32", "tf_efficientnet_lite0:32:freeze2", "--batch", "4", "--faces", "4",
                          "--steps", "2", "--rounds", "1", "--warmup", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| mobilenet_v3_large 32px | 2.0 | 1.00x | 833 |" in out  # 4 faces in 2 s; 100,000 faces in 833 minutes
    assert "| tf_efficientnet_lite0 32px, stem and 2 blocks frozen | 8.0 | 4.00x | 208 |" in out
