"""The programs as a user runs them: exit codes and messages, in a fresh process."""

import errno
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import detect
import main
from cli import UserError, pick_precision, run_cli, write_atomically, write_or_keep
from helpers import ROOT, assert_one_clear_line, read_until, run_program, train_args


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
    assert_one_clear_line(run_program("main.py", "--epochs", "0", "--logdir", str(tmp_path)), "--epochs")


def test_missing_dataset_explains_where_it_looked_without_a_traceback(tmp_path):
    result = run_program("main.py", "--data-root", str(tmp_path / "celeba"), "--logdir", str(tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("error: no CelebA images found under") and str(tmp_path / "celeba") in first
    assert "--dataset synthetic" in result.stderr and "kaggle" in result.stderr.lower()


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


def test_a_checkpoint_from_a_different_model_is_refused(tmp_path, tiny_run):
    ckpt = torch.load(os.path.join(tiny_run, "checkpoint.pt"), weights_only=True)
    ckpt["config"]["ndf"] = 16  # says ndf 16, holds ndf 8 weights
    del ckpt["format"], ckpt["kind"]
    checkpoint.save(ckpt, str(tmp_path / "other.pt"), "training")
    assert_one_clear_line(run_program("main.py", "--resume", str(tmp_path / "other.pt")), "does not fit")
    assert sorted(os.listdir(tmp_path)) == ["other.pt"]  # a refused resume writes nothing, not even config.json


def test_precision_flags_on_cpu(tmp_path):
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == ("fp32", None) and pick_precision("bf16", cpu) == ("bf16", torch.bfloat16)
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        main.main(train_args(tmp_path, "--precision", "fp16", "--max-steps", "1", "--run-name", "fp16"))
    assert not (tmp_path / "fp16").exists()
    cfg, ckpt = main.make_config(train_args(tmp_path, "--precision", "bf16", "--max-steps", "2", "--run-name", "bf16"))
    stats = main.train(cfg, ckpt)
    assert stats["step"] == 2 and all(math.isfinite(stats[k]) for k in ("loss/D", "loss/G"))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed "
                                                  "writing file data/0: file write failed")])  # torch.save's, on a full disk
def test_a_write_that_fails_is_one_line_and_leaves_the_old_file_and_no_temporary_one(tmp_path, capsys, failure):
    path = tmp_path / "report.json"
    path.write_text("the last good report")

    def half_then_fail(f):
        f.write(b"half a fi")
        raise failure

    assert run_cli(lambda argv: write_atomically(str(path), half_then_fail)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {path} (") and f"free space in {tmp_path} " in err[0]
    assert os.listdir(tmp_path) == ["report.json"] and path.read_text() == "the last good report"


def test_a_bug_inside_a_write_still_raises_and_leaves_no_temporary_file(tmp_path):
    def buggy(f):
        f.write(b"x")
        raise RuntimeError("a bug, not a disk")

    with pytest.raises(RuntimeError, match="a bug"):
        write_atomically(str(tmp_path / "out.bin"), buggy)
    assert os.listdir(tmp_path) == []


def test_work_that_cannot_be_written_where_asked_is_kept_in_the_current_folder(tmp_path, monkeypatch, capsys):
    run, here = tmp_path / "run", tmp_path / "here"
    run.mkdir(), here.mkdir()
    monkeypatch.chdir(here)
    (here / "run-detector.pt").write_text("the user's own file")  # never overwritten

    def full_disk_in_run(f):  # the run's disk is full, the current folder's is not
        if f.name.startswith(str(run)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        f.write(b"hours of training")

    assert run_cli(lambda argv: write_or_keep(str(run / "detector.pt"), full_disk_in_run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    kept = here / "run-2-detector.pt"
    assert len(err) == 1 and f"cannot write {run / 'detector.pt'} (No space left on device)" in err[0] and str(kept) in err[0]
    assert kept.read_bytes() == b"hours of training" and (here / "run-detector.pt").read_text() == "the user's own file"
    assert os.listdir(run) == []


def test_a_detector_run_folder_that_cannot_be_made_is_refused_before_any_data_is_read(tmp_path):
    (tmp_path / "taken").write_text("a file where the run folder should go")
    # the data folder does not exist either: the run folder must be what is refused, since it is checked first
    result = run_program("train_detector.py", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "taken" / "run"),
                         "--device", "cpu")
    assert_one_clear_line(result, "cannot create the run folder", str(tmp_path / "taken" / "run"))


def test_a_refused_detector_run_leaves_no_empty_run_folder(tmp_path):
    result = run_program("train_detector.py", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run"), "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def every_parser():
    """Each program's parser, and each of benchmark.py's subcommands."""
    import argparse
    import importlib
    for name in ("main", "train_detector", "detect", "evaluate", "sample", "benchmark"):
        parser = importlib.import_module(name).get_args_parser()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from ((f"{name} {sub}", p) for sub, p in action.choices.items())


def test_every_help_states_each_default_once(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: a flag's entry is its line and, for a long one, the next
    entries = {name: re.split(r"\n(?=  \S)", parser.format_help()) for name, parser in every_parser()}
    programs = {"main", "train_detector", "detect", "evaluate", "sample", "benchmark"}
    assert programs | {f"benchmark {c}" for c in ("train", "detector", "video", "finder-memory", "archive")} <= set(entries)
    for name, flags in entries.items():
        for entry in flags:
            assert "(default: None)" not in entry and "(default: False)" not in entry, f"{name}: {entry}"
            assert entry.count("(default") <= 1, f"{name}: {entry}"
    help_of = lambda name, flag: " ".join(next(e for e in entries[name] if e.strip().startswith(flag)).split())
    assert help_of("detect", "--batch").endswith("(default: 64)")  # a default of its own is still stated
    assert help_of("train_detector", "--out").endswith("(default: runs/detector/NNN-ARCH-SIZE, numbered)")
    assert help_of("detect", "--threshold").endswith("(default: the threshold stored with the detector)")
    assert "default" not in help_of("detect", "--every")  # nothing to state, so nothing said


class CreatesAFile:
    """An attacker's object: unpickling it calls open(path, "w"), which creates the file (os.system would do worse)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_file_holding_code_is_refused_in_our_words_and_its_code_never_runs(tmp_path, capsys):
    pickle.loads(pickle.dumps(CreatesAFile(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists()  # the payload is live: an ordinary unpickling runs it
    target = tmp_path / "created"
    payload = {"format": 2, "kind": "detector", "detector": CreatesAFile(str(target)), "threshold": 0.5}
    torch.save(payload, tmp_path / "saved.pt")  # torch's format
    with open(tmp_path / "pickled.pt", "wb") as f:
        pickle.dump(payload, f)  # a plain pickle, over which torch also warns on stderr
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    argv = lambda name: [str(tmp_path / "face.png"), "--checkpoint", str(tmp_path / name), "--device", "cpu"]
    phrases = lambda name: (f"checkpoint {tmp_path / name} holds Python objects", "loading it could run code, so it was not loaded")
    result = run_program("detect.py", *argv("pickled.pt"))  # a fresh process: all it prints, warnings included
    assert_one_clear_line(result, *phrases("pickled.pt"))
    assert "weights_only" not in result.stderr + result.stdout
    assert run_cli(detect.main, argv("saved.pt")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(p in err[0] for p in phrases("saved.pt")) and "weights_only" not in err[0]
    assert re.search(r"objects \([\w.]*open\)", err[0])  # torch's format names what it holds
    for name in ("saved.pt", "pickled.pt"):
        with pytest.raises(UserError, match="^--weights .* holds Python objects") as e:
            checkpoint.load_weights_file(str(tmp_path / name))
        assert "weights_only" not in str(e.value)
    assert not target.exists()


def test_a_truncated_or_foreign_checkpoint_keeps_its_sentence_without_torchs_advice(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:500])
    with open(tmp_path / "foreign.pkl", "wb") as f:
        pickle.dump({"plain": [1, 2.0, "data"]}, f)  # no objects, but not torch's format either
    for name in ("cut.pt", "foreign.pkl"):
        with pytest.raises(UserError, match=f"^cannot read checkpoint .*{name} .*; it may be truncated or not a PyTorch file$") as e:
            checkpoint.load(str(tmp_path / name))
        assert "weights_only" not in str(e.value) and "Python objects" not in str(e.value)
