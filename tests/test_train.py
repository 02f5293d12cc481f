import errno
import json
import os
import re
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

import checkpoint
import main
import models
from cli import UserError, run_cli
from helpers import train_args, write_jpegs
from models import build_models


def test_a_few_steps_change_the_weights_and_give_finite_losses():
    torch.manual_seed(0)
    cfg = {"nz": 16, "ngf": 8, "ndf": 8, "channels": 3, "image_size": 32}
    G, D = build_models(cfg)
    before_G = [p.clone() for p in G.parameters()]
    before_D = [p.clone() for p in D.parameters()]
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(3):
        stats = models.train_step(G, D, opt_G, opt_D, real, 16)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(0 <= stats[k] <= 1 for k in ("D(x)", "D(G(z))/D_step", "D(G(z))/G_step"))
    assert all(not torch.equal(a, b) for a, b in zip(before_G, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_D, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # the G step gives D its gradients back


def test_a_short_run_writes_events_config_samples_and_a_checkpoint(tmp_path, capsys):
    assert main.main(train_args(tmp_path, "--epochs", "2", "--run-name", "r", "--sample-every", "3")) == 0
    assert "done at epoch 2/2, step 8;" in capsys.readouterr().out
    run = tmp_path / "r"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["image_size"] == 32 and cfg["epochs"] == 2
    assert sorted(os.listdir(run / "samples")) == ["epoch_001.png", "epoch_002.png", "step_0000003.png", "step_0000006.png"]
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss/D", "loss/G", "D(x)", "D(G(z))/D_step", "D(G(z))/G_step", "perf/images_per_sec"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss/D")] == list(range(1, 9))  # 4 steps an epoch, logged every step
    assert "samples" in tags["images"] and len(events.Images("samples")) == 4
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["done_in_epoch"]) == (2, 8, 0)


def test_a_short_run_has_a_loss_point_at_every_epochs_end_and_a_rate_over_training_time(tmp_path, monkeypatch):
    real_metrics, real_clock, skipped = main.reports.epoch_metrics, time.perf_counter, [0.0]

    def slow_metrics(*args):
        skipped[0] += 100  # as if the evaluation took 100 s: a clock that counted it would see under 1 image a second
        return real_metrics(*args)

    monkeypatch.setattr(main.reports, "epoch_metrics", slow_metrics)
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + skipped[0])
    assert main.main(train_args(tmp_path, "--epochs", "2", "--run-name", "r", "--log-every", "1000")) == 0
    events = EventAccumulator(str(tmp_path / "r"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for tag in ("loss/D", "loss/G", "D(x)", "perf/images_per_sec"):
        assert [e.step for e in events.Scalars(tag)] == [4, 8], tag
    second_epoch = events.Scalars("perf/images_per_sec")[1].value  # 64 images, after the first epoch's evaluation
    assert second_epoch > 1, second_epoch
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: [t for t in c.multiline.tag] for c in layout.category[0].chart}
    assert {t for t in events.Tags()["scalars"] if any(re.fullmatch(p, t) for p in charts["D(x) and D(G(z))"])} == \
        {"D(x)", "D(G(z))/D_step", "D(G(z))/G_step"}
    assert {t for t in events.Tags()["scalars"] if any(re.fullmatch(p, t) for p in charts["loss_D and loss_G"])} == {"loss/D", "loss/G"}


@pytest.mark.parametrize("flags, phrase", [
    (["--dataset", "celeba", "--data-root", "NOWHERE"], "no CelebA images found"),
    (["--synthetic-size", "16", "--batch", "8"], "the valid split has 1 decodable images"),
    (["--dataset", "folder", "--data-root", "IMAGES", "--cache-dir", "A_FILE/cache"], "cannot create the cache folder"),
])
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, flags, phrase):
    write_jpegs(str(tmp_path / "images"), [f"{i}.jpg" for i in range(30)])
    (tmp_path / "a_file").write_text("")
    paths = {"NOWHERE": tmp_path / "nowhere", "IMAGES": tmp_path / "images", "A_FILE/cache": tmp_path / "a_file" / "cache"}
    argv = train_args(tmp_path / "runs", *[str(paths.get(f, f)) for f in flags])
    assert run_cli(main.main, argv) == 2
    assert phrase in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_an_unwritable_logdir_or_a_full_disk_is_one_sentence_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    assert run_cli(main.main, train_args(tmp_path / "a_file" / "runs", "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot create the run folder {tmp_path / 'a_file' / 'runs'}")

    def disk_fills_up(grid, f, format):
        f.write(b"\x89PNG half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(main, "save_image", disk_fills_up)
    assert run_cli(main.main, train_args(tmp_path, "--epochs", "1", "--run-name", "r")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot write {tmp_path / 'r' / 'samples' / 'epoch_001.png'} (No space left on device)")
    assert not [f for _, _, files in os.walk(tmp_path / "r") for f in files if f.endswith(".tmp")]


def test_a_snapshot_or_a_detector_given_to_resume_is_one_line(tiny_run_copy, capsys):
    run_dir = str(tiny_run_copy)
    model, _, _, info = checkpoint.load_detector(run_dir)
    checkpoint.save_detector(os.path.join(run_dir, "detector.pt"), model, 0.5, info["config"])
    for path, kind in ((os.path.join(run_dir, "snapshots", "G_epoch001.pt"), "snapshot"), (os.path.join(run_dir, "detector.pt"), "detector")):
        assert run_cli(main.main, ["--resume", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is a {kind} file, but --resume needs a training checkpoint; give the run folder" in err[0]


def test_a_stale_temporary_checkpoint_is_replaced_by_the_next_write(tmp_path):
    _, run_dir = run_to_end(tmp_path, "--run-name", "r", "--max-steps", "1")
    stale = os.path.join(run_dir, "checkpoint.pt.tmp")
    with open(stale, "wb") as f:
        f.write(b"left by a crash mid-write")
    cfg, ckpt = main.make_config(["--resume", run_dir, "--max-steps", "2"])
    main.train(cfg, ckpt)
    assert not os.path.exists(stale)
    assert checkpoint.load(run_dir)["step"] == 2


def test_an_old_checkpoint_whose_config_lacks_newer_flags_resumes(tmp_path):
    _, run_dir = run_to_end(tmp_path, "--run-name", "r", "--max-steps", "2")
    path = os.path.join(run_dir, "checkpoint.pt")
    old = torch.load(path, weights_only=True)
    for key in ("eval_images", "sync_bn", "channels_last", "cuda_graphs"):  # flags added after the run started
        del old["config"][key]
    old["config"]["retired_flag"] = 1  # and one no longer read (as --detector-data is)
    del old["format"], old["kind"]
    checkpoint.save(old, path, "training")
    cfg, ckpt = main.make_config(["--resume", run_dir, "--max-steps", "3"])
    assert (cfg.eval_images, cfg.sync_bn, cfg.channels_last, cfg.cuda_graphs) == (1000, False, True, False)  # the flags' defaults
    assert main.train(cfg, ckpt)["step"] == 3
    assert "retired_flag" not in json.loads(open(os.path.join(run_dir, "config.json")).read())


def run_to_end(logdir, *extra):
    cfg, ckpt = main.make_config(train_args(logdir, "--epochs", "2", *extra))
    return main.train(cfg, ckpt), cfg.run_dir


@pytest.mark.parametrize("stop_at", [3, 4])  # mid-epoch, and exactly at an epoch's end
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, stop_at):
    whole, whole_dir = run_to_end(tmp_path, "--run-name", "whole")
    part, part_dir = run_to_end(tmp_path, "--run-name", "part", "--max-steps", str(stop_at))
    assert part["step"] == stop_at
    resumed, resumed_dir = run_to_end(tmp_path, "--resume", part_dir)
    assert resumed_dir == os.path.abspath(part_dir) and resumed["step"] == whole["step"] == 8
    for key in ("loss/D", "loss/G", "D(x)"):
        assert resumed[key] == whole[key]
    a = torch.load(os.path.join(whole_dir, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part_dir, "checkpoint.pt"), weights_only=True)
    for net in ("G", "D"):
        for name, tensor in a[net].items():
            assert torch.equal(tensor, b[net][name]), f"{net}.{name} differs after resume"
    assert torch.equal(a["opt_G"]["state"][0]["exp_avg"], b["opt_G"]["state"][0]["exp_avg"])


def test_resume_may_extend_training_but_not_change_the_model(tmp_path):
    _, run_dir = run_to_end(tmp_path, "--run-name", "r")
    cfg, ckpt = main.make_config(train_args(tmp_path, "--resume", run_dir, "--epochs", "3"))
    assert cfg.epochs == 3 and cfg.ngf == 8 and ckpt["step"] == 8
    assert main.train(cfg, ckpt)["step"] == 12
    with pytest.raises(UserError, match="--ngf 16 differs from the checkpoint's 8"):
        main.make_config(["--resume", run_dir, "--ngf", "16"])


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    main.main(train_args(tmp_path, "--max-steps", "1", "--run-name", "r"))
    with pytest.raises(UserError, match="--resume"):
        main.make_config(train_args(tmp_path, "--run-name", "r"))
    assert main.make_config(train_args(tmp_path))[0].run_dir.endswith("001-synthetic-32")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, calls = models.train_step, []

    def diverging_step(*args):
        calls.append(1)
        stats = real_step(*args)
        if len(calls) > 5:  # during the second epoch
            stats["loss/D"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(models, "train_step", diverging_step)
    with pytest.raises(UserError, match="diverged at step 6"):
        run_to_end(tmp_path, "--run-name", "r")
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4  # the end of epoch 1, untouched


@pytest.mark.parametrize("net, tensor", [("G", "main.0.weight"), ("D", "running_var")])
def test_non_finite_weights_at_an_epochs_end_stop_the_run_before_anything_is_written(tmp_path, monkeypatch, net, tensor):
    real_step, calls = models.train_step, []

    def diverging_step(G, D, *args):
        calls.append(1)
        stats = real_step(G, D, *args)
        if len(calls) == 8:  # the last step of epoch 2: the losses were finite, the update was not
            broken = next(v for k, v in {"G": G, "D": D}[net].state_dict().items() if k.endswith(tensor))
            broken.fill_(float("inf"))  # running_var: what --lr 1e9 did, with every parameter finite
        return stats

    monkeypatch.setattr(models, "train_step", diverging_step)
    with pytest.raises(UserError, match=f"diverged at step 8 \\(non-finite weights in {net}: [a-z0-9.]*{tensor}"):
        run_to_end(tmp_path, "--run-name", "r", "--log-every", "1000")
    run = tmp_path / "r"
    assert os.listdir(run / "snapshots") == ["G_epoch001.pt"]
    assert sorted(os.listdir(run / "samples")) == ["epoch_001.png"]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.parametrize("source", [["--no-cache"], ["--cache-dir", "CACHE"]])
def test_undecodable_images_are_skipped_and_counted(tmp_path, capsys, source):
    paths = write_jpegs(str(tmp_path / "imgs"), [f"{i:03d}.jpg" for i in range(80)])
    broken = [p for p in paths if "/imgs/00" in p][:3]
    for p in broken:
        with open(p, "w") as f:
            f.write("not a jpeg")
    args = ["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--batch", "8", "--image-size", "32",
            "--ngf", "8", "--ndf", "8", "--workers", "0", "--epochs", "1", "--detector-steps", "0", "--logdir", str(tmp_path / "runs"),
            *[str(tmp_path / "cache") if a == "CACHE" else a for a in source]]
    assert main.main(args) == 0
    err = capsys.readouterr().err
    in_train = [p for p in broken if main.data.hash_split(os.path.basename(p)) == "train"]
    assert in_train, "the fixture should put at least one broken file into the training split"
    for p in in_train:
        assert f"skipped {p}" in err
    assert f"{len(in_train)} images could not be decoded" in err


def test_a_stop_within_an_epoch_is_counted_as_the_bar_counts_it(tmp_path, capsys):
    assert main.main(train_args(tmp_path, "--epochs", "1", "--max-steps", "3", "--run-name", "r")) == 0
    out, err = capsys.readouterr()
    assert "epoch 1/1:" in err and "epoch 0" not in err + out  # the bar and the last line name the same epoch
    assert "done at epoch 1/1, step 3;" in out


def test_resume_refuses_flags_that_cannot_change(tmp_path):
    _, run_dir = run_to_end(tmp_path, "--run-name", "r", "--max-steps", "1")
    with pytest.raises(UserError, match="--lr cannot change when resuming"):
        main.make_config(train_args(tmp_path, "--resume", run_dir, "--lr", "1e-5"))


def test_an_epochs_end_reached_on_resume_without_a_step_is_checkpointed(tmp_path):
    _, run_dir = run_to_end(tmp_path, "--run-name", "r", "--max-steps", "4")  # 4 steps an epoch: stops on the boundary
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["done_in_epoch"]) == (0, 4)
    cfg, ckpt = main.make_config(train_args(tmp_path, "--resume", run_dir, "--epochs", "1"))
    main.train(cfg, ckpt)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ckpt["epoch"], ckpt["done_in_epoch"], ckpt["step"]) == (1, 0, 4)


def test_paths_needed_at_the_end_are_checked_at_the_start(tmp_path):
    with pytest.raises(UserError, match="--inception-weights .* is not a file"):
        main.make_config(train_args(tmp_path, "--inception-weights", str(tmp_path / "missing.pth")))
    assert not os.listdir(tmp_path)  # and no run folder was made


def test_a_tiny_validation_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="the valid split has 1 decodable images"):
        run_to_end(tmp_path, "--synthetic-size", "16", "--batch", "8")


def test_a_checkpoint_the_run_folder_cannot_take_is_kept_in_the_current_folder(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    real_save = torch.save

    def full_run_disk(obj, f, *args, **kwargs):
        if getattr(f, "name", "").endswith(os.path.join("r", "checkpoint.pt.tmp")):
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/0: "
                               "file write failed")  # what torch.save raises on a full disk
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_run_disk)
    with pytest.raises(UserError, match=f"cannot write .*checkpoint.pt .*saved to {here / 'r-checkpoint.pt'} instead"):
        main.main(train_args(tmp_path, "--epochs", "1", "--run-name", "r"))
    kept = checkpoint.load(str(here / "r-checkpoint.pt"))
    assert kept["step"] == 4 and kept["epoch"] == 1 and not (tmp_path / "r" / "checkpoint.pt").exists()
