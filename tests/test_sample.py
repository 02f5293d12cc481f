"""sample.py: the grid and the single images it draws, the paths it writes, the files it refuses."""

import errno
import os

import torch
from PIL import Image

import main
import sample
from cli import run_cli
from helpers import assert_one_clear_line, run_program, train_args


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
    assert err == [f"error: {tmp_path / 'a_file'} is a file, so it cannot be the folder for --out; "
                   "give the path of a folder (one that does not exist yet is made)"]

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


def test_sampling_a_file_without_a_generator_and_discriminator_says_so(tiny_run):
    snapshot = os.path.join(tiny_run, "snapshots", "G_epoch001.pt")
    assert_one_clear_line(run_program("sample.py", snapshot), "is a snapshot file", "give the run folder")


def test_sample_refuses_files_that_are_not_checkpoints_in_one_line(tmp_path, capsys):
    torch.save({"model": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    for name, phrase in (("foreign.pt", "not a checkpoint written by this project"), ("text.pt", "cannot read checkpoint"),
                         ("missing", "does not exist")):
        assert run_cli(sample.main, [str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and phrase in err[0], err


def test_an_out_without_an_image_ending_is_one_line(tmp_path, capsys):
    assert run_cli(sample.main, [str(tmp_path), "--out", str(tmp_path / "grid")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an image file ending" in err[0]
