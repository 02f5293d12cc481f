"""The programs as a user runs them: exit codes and messages, in a fresh process."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import main
import sample
from cli import run_cli
from helpers import read_until, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=120)


def assert_one_clear_line(result, *phrases):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


@pytest.mark.parametrize("flags, phrase", [
    (["--epochs", "0"], "--epochs: must be at least 1"),
    (["--batch", "0"], "--batch: must be at least 1"),
    (["--image-size", "48"], "--image-size: must be a power of two"),
    (["--beta1", "1.5"], "--beta1: must be in [0, 1)"),
])
def test_flags_out_of_range_get_one_line(capsys, flags, phrase):
    # argparse exits before anything heavy, so this runs in-process
    with pytest.raises(SystemExit) as e:
        main.get_args_parser().parse_args(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]


def test_flag_errors_from_the_command_line(tmp_path):
    assert_one_clear_line(run("main.py", "--epochs", "0", "--logdir", str(tmp_path)), "--epochs")


def test_missing_dataset_explains_where_it_looked_without_a_traceback(tmp_path):
    result = run("main.py", "--data-root", str(tmp_path / "celeba"), "--logdir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: no CelebA images found under") and str(tmp_path / "celeba") in first
    assert "--dataset synthetic" in result.stderr and "kaggle" in result.stderr.lower()


def test_a_checkpoint_from_a_different_model_is_refused(tmp_path, tiny_run, capsys):
    ckpt = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    ckpt["config"]["ndf"] = 16  # says ndf 16, holds ndf 8 weights
    del ckpt["format"], ckpt["kind"]
    checkpoint.save(ckpt, str(tmp_path / "other.pt"), "training")
    assert_one_clear_line(run("main.py", "--resume", str(tmp_path / "other.pt")), "does not fit")
    assert sorted(os.listdir(tmp_path)) == ["other.pt"]  # a refused resume writes nothing, not even config.json
    # the same errors from sample.py, in this process: a fresh one costs seconds, and test_sampling_a_file... starts one
    torch.save({"model": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, phrase in (("foreign.pt", "not a checkpoint written by this project"), ("text.pt", "cannot read checkpoint"),
                         ("missing", "does not exist")):
        assert run_cli(sample.main, [str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err


def test_sample_draws_a_grid_and_separate_images_from_a_checkpoint(tmp_path, tiny_run):
    out = tmp_path / "grid.png"
    assert sample.main([tiny_run, "--n", "16", "--out", str(out), "--separate", str(tmp_path / "each")]) == 0
    assert Image.open(out).size == (4 * 32 + 5 * 2, 4 * 32 + 5 * 2)  # 4 x 4 images of 32 px, 2 px padding
    assert len(os.listdir(tmp_path / "each")) == 16
    again = tmp_path / "again.jpg"
    sample.main([tiny_run, "--n", "16", "--out", str(again)])
    assert Image.open(again).format == "JPEG"  # the type the name asks for
    sample.main([tiny_run, "--n", "16", "--out", str(again.with_suffix(".png"))])
    assert Image.open(out).tobytes() == Image.open(again.with_suffix(".png")).tobytes()  # same seed, same images


def test_sample_to_an_unwritable_or_full_place_is_one_line_and_leaves_no_temporary_file(tmp_path, tiny_run, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("")
    assert run_cli(sample.main, [tiny_run, "--out", str(tmp_path / "a_file" / "grid.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: cannot create the folder for --out {tmp_path / 'a_file'} (File exists); "
                   "give a folder you can write to, or free space on its disk"]

    def disk_fills_up(images, f, **kwargs):
        f.write(b"\x89PNG half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sample, "save_image", disk_fills_up)
    assert run_cli(sample.main, [tiny_run, "--out", str(tmp_path / "grid.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {tmp_path / 'grid.png'} (No space left on device); free space in {tmp_path}" in err[0]
    assert os.listdir(tmp_path) == ["a_file"]


def test_sample_writes_nothing_outside_the_paths_it_is_given(tmp_path, monkeypatch):
    main.main(train_args(tmp_path / "runs", "--max-steps", "1", "--run-name", "r"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the old default wrote samples.png here even with only --separate
    files = lambda: sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    before = files()
    assert sample.main([str(tmp_path / "runs" / "r"), "--n", "4", "--separate", str(tmp_path / "each")]) == 0
    assert files() == sorted(before + [f"each/{i:06d}.png" for i in range(4)])
    assert sample.main([str(tmp_path / "runs" / "r"), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert files() == sorted(before + [f"each/{i:06d}.png" for i in range(4)] + ["grid.png"])


def test_ctrl_c_writes_a_checkpoint_that_resumes(tmp_path):
    args = train_args(tmp_path, "--synthetic-size", "4096", "--run-name", "r")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        read_until(proc, lambda seen: "epoch 1/10:" in seen and "/256 [" in seen, timeout=120)  # steps are being taken
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in err
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["step"] == ckpt["done_in_epoch"] and ckpt["epoch"] == 0
    cfg, loaded = main.make_config(["--resume", str(tmp_path / "r"), "--max-steps", str(ckpt["step"] + 1)])
    assert main.train(cfg, loaded)["step"] == ckpt["step"] + 1


def test_sampling_a_file_without_a_generator_and_discriminator_says_so(tiny_run):
    snapshot = os.path.join(tiny_run, "snapshots", "G_epoch001.pt")
    assert_one_clear_line(run("sample.py", snapshot), "is a snapshot file", "give the run folder")


def test_output_paths_that_are_files_or_unknown_kinds_get_one_line(tmp_path, capsys):
    import detect
    import sample
    from cli import run_cli
    (tmp_path / "taken").write_text("a file where a folder should go")
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    assert run_cli(detect.main, [str(tmp_path / "face.png"), "--faces", "none", "--extract", str(tmp_path / "taken")]) == 2
    assert run_cli(sample.main, [str(tmp_path), "--out", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cannot create the --extract folder" in err[0] and "needs an image file ending" in err[1]
