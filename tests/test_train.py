import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import main
from cli import UserError
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
        stats = main.train_step(G, D, opt_G, opt_D, real, 16)
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(0 <= stats[k] <= 1 for k in ("D(x)", "D(G(z))/D_step", "D(G(z))/G_step"))
    assert all(not torch.equal(a, b) for a, b in zip(before_G, G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before_D, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())  # the G step gives D its gradients back


def test_a_short_run_writes_events_config_samples_and_a_checkpoint(tmp_path):
    assert main.main(train_args(tmp_path, "--epochs", "2", "--run-name", "r", "--sample-every", "3")) == 0
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
    real_step, calls = main.train_step, []

    def diverging_step(*args):
        calls.append(1)
        stats = real_step(*args)
        if len(calls) > 5:  # during the second epoch
            stats["loss/D"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(main, "train_step", diverging_step)
    with pytest.raises(UserError, match="diverged at step 6"):
        run_to_end(tmp_path, "--run-name", "r")
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4  # the end of epoch 1, untouched


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
    with pytest.raises(UserError, match="needs two subfolders, real/ and fake/"):
        main.make_config(train_args(tmp_path, "--detector-data", str(tmp_path)))
    with pytest.raises(UserError, match="--inception-weights .* is not a file"):
        main.make_config(train_args(tmp_path, "--inception-weights", str(tmp_path / "missing.pth")))
    assert not os.listdir(tmp_path)  # and no run folder was made


def test_a_tiny_validation_split_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="the valid split has 1 decodable images"):
        run_to_end(tmp_path, "--synthetic-size", "16", "--batch", "8")
