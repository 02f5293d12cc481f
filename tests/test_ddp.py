"""torchrun with two CPU processes (gloo): one run folder, identical weights on both ranks, a checkpoint any world size resumes."""

import glob
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
from checkpoint import load as load_checkpoint  # noqa: E402
from helpers import make_images  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("source", ["synthetic", "cache"])
def test_torchrun_two_processes_then_resume_in_one(tmp_path, source):
    logdir = tmp_path / "runs"
    if source == "synthetic":  # decoded by the DataLoader path
        data_flags = ["--dataset", "synthetic", "--synthetic-size", "64"]
    else:  # one process builds the image cache while the other waits
        make_images(tmp_path / "img", 40)
        data_flags = ["--dataset", "folder", "--data-root", str(tmp_path / "img"), "--cache-dir", str(tmp_path / "cache")]
    flags = [*data_flags, "--image-size", "32", "--ngf", "8", "--ndf", "8",
             "--batch", "16", "--workers", "0", "--max-steps", "3", "--log-every", "1", "--logdir", str(logdir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(HERE, "ddp_worker.py"), str(tmp_path), *flags],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    # one run folder, one set of event files, written by rank 0 alone
    runs = os.listdir(logdir)
    assert len(runs) == 1, runs
    run_dir = logdir / runs[0]
    assert len(glob.glob(str(run_dir / "**" / "events.out.tfevents.*"), recursive=True)) == 1
    assert done.stdout.count("done at epoch") == 1  # only rank 0 prints
    if source == "cache":
        assert len(os.listdir(tmp_path / "cache")) == 1  # one cache, whole, no temporary folder left

    # both ranks end with the same weights, and the checkpoint holds them
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ckpt = load_checkpoint(str(run_dir))
    assert ckpt["step"] == 3
    for net in ("G", "D"):
        for name, value in ranks[0][net].items():
            assert torch.equal(value, ranks[1][net][name]), f"{net}.{name} differs between ranks"
            assert torch.equal(value, ckpt[net][name])

    # the two-process checkpoint resumes in a single process
    cfg, resumed = main.make_config(["--resume", str(run_dir), "--max-steps", "5"])
    result = main.train(cfg, resumed)
    assert result["step"] == 5 and load_checkpoint(str(run_dir))["step"] == 5
