import errno
import json
import os

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import checkpoint
import evaluate
import main
import metrics
import reports
from cli import run_cli

TINY = ["--dataset", "synthetic", "--image-size", "32", "--synthetic-size", "64", "--batch", "16", "--ngf", "8", "--ndf", "8",
        "--nz", "16", "--workers", "0", "--eval-images", "16"]


# Fine-tuning's real and fake images a step (64 + 64), and its 20 batches that recalibrate BatchNorm, make most
# of an evaluation's time; what these tests check does not depend on the batch size.
SMALL_BATCH = 16


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reports, "DETECTOR_BATCH", SMALL_BATCH)
        assert main.main(TINY + ["--epochs", "2", "--detector-steps", "5", "--logdir", str(logdir), "--run-name", "r"]) == 0
    return os.path.join(logdir, "r")


def test_training_keeps_snapshots_and_writes_detector_and_report(trained_run):
    assert sorted(os.listdir(os.path.join(trained_run, "snapshots"))) == ["G_epoch001.pt", "G_epoch002.pt"]
    model, threshold, kind, cfg = checkpoint.load_detector(trained_run)
    assert kind == "fine-tuned detector" and 0 < threshold < 1 and not model.training
    with open(os.path.join(trained_run, "metrics.json")) as f:
        report = json.load(f)
    for condition in ("clean", "jpeg50"):
        assert set(report["detection"][condition]) == {"raw_D", "fine_tuned", "spectrum"}
        for m in report["detection"][condition].values():
            assert {"auc", "ap", "eer", "tpr@1%fpr", "accuracy", "threshold"} <= set(m)
    assert report["detection"]["clean"]["fine_tuned"]["threshold"] == pytest.approx(threshold)
    assert report["detection"]["clean"]["raw_D"]["threshold"] == 0.5


def test_without_inception_weights_fid_is_skipped_with_directions(trained_run):
    with open(os.path.join(trained_run, "metrics.json")) as f:
        quality = json.load(f)["generator"]
    assert quality["fid"] is None
    assert "skipped" in quality["fid_skipped"] and "weights-inception-2015-12-05" in quality["fid_skipped"]
    assert quality["swd_x1e3"]["avg"] > 0


def test_epoch_metrics_and_report_reach_tensorboard(trained_run):
    events = EventAccumulator(trained_run, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"raw_D/auc", "raw_D/accuracy", "swd/avg", "swd/32", "swd/16"} <= scalars
    assert len(events.Scalars("swd/avg")) == 2  # one per epoch
    report = EventAccumulator(os.path.join(trained_run, "eval"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}).Reload()
    assert {"test_clean/fine_tuned/auc", "test_jpeg50/spectrum/auc", "test_jpeg50/raw_D/eer"} <= set(report.Tags()["scalars"])
    assert "test_clean/fine_tuned" in report.Tags()["tensors"]  # the PR curve
    assert "test_clean/fine_tuned/scores_fake" in report.Tags()["histograms"]
    assert not scalars & set(report.Tags()["scalars"])  # the report is not also in the training log


def test_evaluate_reuses_the_stored_detector(trained_run):
    with open(os.path.join(trained_run, "metrics.json")) as f:
        before = json.load(f)
    assert evaluate.main([trained_run]) == 0
    with open(os.path.join(trained_run, "metrics.json")) as f:
        after = json.load(f)
    assert after["detection"] == before["detection"]  # same detector, same seeded test fakes, same baseline


def events_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs if "tfevents" in f)


def test_evaluate_leaves_one_events_file_and_no_scalar_twice(trained_run):
    assert evaluate.main([trained_run]) == 0
    assert evaluate.main([trained_run]) == 0  # a second report replaces the first
    files = events_files(trained_run)
    assert len([f for f in files if f.startswith("eval" + os.sep)]) == 1, files
    assert len([f for f in files if os.sep not in f]) == 1, files  # the training log, untouched
    for folder in {os.path.dirname(f) for f in files}:  # each folder is one run in TensorBoard
        events = EventAccumulator(os.path.join(trained_run, folder), size_guidance={"scalars": 0}).Reload()
        if "test_clean/raw_D/auc" in events.Tags()["scalars"]:
            assert len(events.Scalars("test_clean/raw_D/auc")) == 1, folder


def test_evaluate_out_writes_the_report_elsewhere_and_leaves_the_run_alone(trained_run, tmp_path):
    listing = lambda: sorted((d, f, os.path.getmtime(os.path.join(d, f))) for d, _, fs in os.walk(trained_run) for f in fs)
    before = listing()
    out = tmp_path / "report"
    assert evaluate.main([trained_run, "--out", str(out), "--eval-images", "4"]) == 0
    assert listing() == before
    with open(out / "metrics.json") as f:
        assert "4 test-split real images" in json.load(f)["protocol"]["test"]
    assert events_files(out) == events_files(out)[:1] and len(events_files(out)) == 1
    assert evaluate.main([trained_run, "--out", str(out), "--detector-steps", "2"]) == 0
    assert sorted(os.listdir(out)) == sorted(["detector.pt", "metrics.json", events_files(out)[0]])
    assert listing() == before  # the new detector went into --out, not into the run


def test_evaluate_out_that_is_a_file_is_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "report.txt").write_text("not a folder")
    assert run_cli(evaluate.main, [trained_run, "--out", str(tmp_path / "report.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, so it cannot be the --out folder" in err[0]


def test_thresholds_are_printed_with_the_digits_they_need():
    assert reports.format_threshold(0.99995) == "0.999950"
    assert reports.format_threshold(0.00012) == "0.00012"
    assert reports.format_threshold(0.5713) == "0.571"
    from detector import format_score
    t = 0.99686  # shown 0.9969: a score just under it gets the digits that show it under
    assert [format_score(s, t) for s in (0.9966, 0.99685, 0.99686, 0.9970)] == ["0.9966", "0.99685", "0.9969", "0.9970"]
    assert format_score(0.4996, 0.5) == "0.4996" and format_score(0.5004, 0.5) == "0.500"


def test_evaluate_on_a_missing_run_is_one_line(tmp_path, capsys):
    assert run_cli(evaluate.main, [str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_evaluate_reports_fid_with_inception_weights(trained_run, random_inception_weights, monkeypatch):
    # The real network on 2 + 2 images, then only 64 of its 2048 features: the full matrix square root costs 25 s
    # on 2 cores, and test_metrics.py tests the maths; here what counts is that the weights reach the report.
    real_features = metrics.inception_features
    monkeypatch.setattr(metrics, "inception_features", lambda model, images: real_features(model, images)[:, :64])
    assert evaluate.main([trained_run, "--inception-weights", random_inception_weights, "--eval-images", "2"]) == 0
    with open(os.path.join(trained_run, "metrics.json")) as f:
        quality = json.load(f)["generator"]
    assert quality["fid"] > 0 and "kid_x1e3" in quality and "test-split" in quality["fid_protocol"]


def test_a_full_face_cache_is_one_line_not_every_file_left_out(trained_run, tmp_path, capsys, monkeypatch):
    for label in ("real", "fake"):
        (tmp_path / "faces" / label).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((32, 32, 3), 60 * k + (100 if label == "fake" else 0), np.uint8)).save(
                tmp_path / "faces" / label / f"{label}_{k}.png")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full_disk)
    argv = [trained_run, "--faces", str(tmp_path / "faces"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--workers", "1"]  # in this process, where the full disk is patched in
    assert run_cli(evaluate.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("files:")]  # less the bar
    assert len(err) == 1 and err[0].startswith(f"error: cannot write {tmp_path / 'cache' / 'faces'}") and "No space left" in err[0]
