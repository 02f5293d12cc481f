"""--cuda-graphs on a machine without CUDA: what can be checked without a GPU.

The capture itself needs CUDA; these tests check the parts it is built from (the noise drawn
outside the step, the warm-up undone in place, Adam's settings on resume) and that every way
the flag cannot work is one sentence.
"""

import copy
import itertools
import os
from types import SimpleNamespace

import pytest
import torch

import benchmark
import checkpoint
import main
import models
from cli import UserError, run_cli
from helpers import train_args

SHAPE = {"nz": 16, "ngf": 8, "ndf": 8, "channels": 3, "image_size": 32}


def pair(seed=0):
    torch.manual_seed(seed)
    G, D = models.build_models(SHAPE)
    return G, D, torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999)), torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))


def flat(G, D, opt_G, opt_D):
    """Every number a step changes, as one list of tensors."""
    out = [*G.state_dict().values(), *D.state_dict().values()]
    return out + [t for opt in (opt_G, opt_D) for s in opt.state.values() for t in s.values()]


def test_noise_drawn_into_a_static_buffer_is_the_noise_the_eager_step_draws():
    # the graphed step draws z outside the graph, into its buffer: same RNG stream, same steps
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    eager, buffered = pair(), pair()
    z = torch.empty(8, SHAPE["nz"])
    torch.manual_seed(1)
    a = [models.train_step(*eager, real, SHAPE["nz"]) for _ in range(2)]
    torch.manual_seed(1)
    b = []
    for _ in range(2):
        models.draw_noise(8, SHAPE["nz"], "cpu", out=z)
        b.append(models.train_step(*buffered, real, SHAPE["nz"], z=z))
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(x, y) for x, y in zip(flat(*eager), flat(*buffered)))


@pytest.mark.parametrize("steps_before", [0, 2])  # a fresh Adam, and one with state (a resumed run)
def test_warm_up_steps_are_undone_in_place_so_the_next_step_is_the_runs_next(steps_before):
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    run = pair()
    for _ in range(steps_before):
        models.train_step(*run, real, SHAPE["nz"])
    reference = copy.deepcopy(run)  # the run as it stands, never warmed up
    saved = models.training_state(*run)
    addresses = [t.data_ptr() for t in flat(*run)]
    torch.manual_seed(5)
    for _ in range(3):  # what CudaGraphStep's warm-up does to the run
        models.train_step(*run, real * 0.5, SHAPE["nz"])
    assert not all(torch.equal(x, y) for x, y in zip(flat(*run)[:4], flat(*reference)[:4]))
    models.restore_training_state(saved, *run)
    if steps_before:
        assert [t.data_ptr() for t in flat(*run)] == addresses  # a captured graph holds these addresses
    torch.manual_seed(7)
    a = models.train_step(*run, real, SHAPE["nz"])
    torch.manual_seed(7)
    b = models.train_step(*reference, real, SHAPE["nz"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(flat(*run), flat(*reference)))


def test_the_graphed_step_wants_capturable_adam():
    G, D, opt_G, opt_D = pair()
    with pytest.raises(ValueError, match="capturable"):
        models.CudaGraphStep(G, D, opt_G, opt_D, SHAPE["nz"], batch=8)


def test_cuda_graphs_on_a_cpu_is_one_sentence_and_leaves_no_run_folder(tmp_path, capsys):
    assert run_cli(main.main, train_args(tmp_path / "runs", "--device", "cpu", "--cuda-graphs")) == 2
    err = capsys.readouterr().err.strip()
    assert "--cuda-graphs needs a CUDA GPU and this run is on cpu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, phrase", [
    ({"compile": True}, "pick one"),
    ({"precision": "fp16"}, "use --precision bf16 or fp32"),
    ({"world": 2}, "not under torchrun"),
])
def test_what_a_graph_cannot_capture_is_one_sentence(change, phrase):
    cfg = SimpleNamespace(compile=change.get("compile", False))
    with pytest.raises(UserError, match=phrase):
        main.check_cuda_graphs(cfg, torch.device("cuda"), change.get("precision", "bf16"), change.get("world", 1))
    main.check_cuda_graphs(SimpleNamespace(compile=False), torch.device("cuda"), "bf16", 1)  # the supported case passes


def test_adam_state_saved_with_gpu_settings_resumes_exactly_here():
    # a GPU run's checkpoint has capturable (and fused) Adam groups; resumed on this machine
    # they take this run's settings and the step count moves to where this Adam keeps it
    real = torch.rand(8, 3, 32, 32) * 2 - 1
    run = pair()
    torch.manual_seed(0)
    models.train_step(*run, real, SHAPE["nz"])
    saved = copy.deepcopy(run[3].state_dict())
    for group in saved["param_groups"]:
        group["capturable"], group["fused"] = True, True
    for s in saved["state"].values():
        s["step"] = s["step"].to(torch.float32)
    opt = torch.optim.Adam(run[1].parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt.load_state_dict(saved)
    main.adopt_adam_settings(opt, fused=False, capturable=False)
    assert all(g["capturable"] is False and g["fused"] is None for g in opt.param_groups)
    for p, s in opt.state.items():
        assert s["step"].device.type == "cpu" and s["step"] == run[3].state[p]["step"]
    run[1].zero_grad(set_to_none=True)
    run[1](real).mean().backward()
    for p in run[1].parameters():
        p.grad_copy = p.grad.clone()
    before = [p.detach().clone() for p in run[1].parameters()]
    opt.step()  # runs: a capturable Adam on the CPU would refuse
    moved = [p.detach().clone() for p in run[1].parameters()]
    with torch.no_grad():
        for p, b in zip(run[1].parameters(), before):
            p.copy_(b)
            p.grad = p.grad_copy
    run[3].step()  # the Adam that wrote the state takes the same step
    assert all(torch.equal(a, p) for a, p in zip(moved, run[1].parameters()))


def test_a_run_saved_with_cuda_graphs_resumes_here_with_no_cuda_graphs(tiny_run_copy, capsys):
    path = os.path.join(tiny_run_copy, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["cuda_graphs"] = True  # as a GPU run with --cuda-graphs would have saved it, Adam capturable and fused
    for group in ckpt["opt_G"]["param_groups"] + ckpt["opt_D"]["param_groups"]:
        group["capturable"], group["fused"] = True, True
    del ckpt["format"], ckpt["kind"]
    checkpoint.save(ckpt, path, "training")
    assert run_cli(main.main, ["--resume", str(tiny_run_copy), "--epochs", "2", "--max-steps", "5"]) == 2
    assert "--no-cuda-graphs when resuming" in capsys.readouterr().err
    cfg, ckpt = main.make_config(["--resume", str(tiny_run_copy), "--epochs", "2", "--max-steps", "5", "--no-cuda-graphs"])
    run = main.setup(cfg, ckpt)
    run.writer.close()
    assert all(g["capturable"] is False and g["fused"] is None for g in run.nets.opt_G.param_groups + run.nets.opt_D.param_groups)
    assert main.train(cfg, ckpt)["step"] == 5


def test_the_benchmark_times_eager_only_on_a_cpu_and_says_why(capsys, monkeypatch):
    clock = itertools.count()
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: next(clock) * 0.5)  # every timed run takes 0.5 s
    rows = benchmark.bench_graphs(SHAPE, torch.device("cpu"), "fp32", None, [4, 8], steps=2, warmup=1, flops_per_image=1e12, seed=0)
    out = capsys.readouterr().out
    assert "CUDA graphs: need a CUDA GPU; this run is on cpu" in out
    # 2 steps of 4 and of 8 images in 0.5 s: 16 and 32 images/s, each image 1 TFLOP
    assert [r[:4] for r in rows] == [(4, "eager", 16.0, 16.0), (8, "eager", 32.0, 32.0)]
    for (batch, _, rate, tflops, _, loss_d, loss_g) in rows:
        assert f"| batch {batch}, eager | {rate:.1f} | {tflops:.2f} | - | {loss_d:.4f}, {loss_g:.4f} |" in out
        assert 0 < loss_d < 10 and 0 < loss_g < 10
    assert "CUDA graph /" not in out


# -----------------------------------------------------------------------------
# on a CUDA GPU only (skipped here): the capture itself, which no CPU can run

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_the_graphed_step_trains_as_the_eager_step_does():
    real = torch.rand(16, 3, 32, 32, device="cuda") * 2 - 1

    def five_steps(graphed):
        torch.manual_seed(0)
        G, D = (m.cuda() for m in models.build_models(SHAPE))
        opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), fused=True, capturable=graphed) for m in (G, D)]
        step = (models.CudaGraphStep(G, D, *opts, SHAPE["nz"], batch=16) if graphed
                else lambda x: models.train_step(G, D, *opts, x, SHAPE["nz"]))
        torch.manual_seed(1)  # the same noise for both: the graph draws it outside, as the eager step does
        stats = [{k: v.item() for k, v in step(real).items()} for _ in range(5)]
        return stats, [p.detach().clone() for p in (*G.parameters(), *D.parameters())]

    (eager, w_eager), (graphed, w_graphed) = five_steps(False), five_steps(True)
    for a, b in zip(eager, graphed):
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-4), k
    for a, b in zip(w_eager, w_graphed):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@cuda
def test_a_resumed_graphed_run_equals_an_uninterrupted_one(tmp_path):
    flags = ("--device", "cuda", "--precision", "fp32", "--cuda-graphs", "--epochs", "2")
    whole_cfg, ckpt = main.make_config(train_args(tmp_path, *flags, "--run-name", "whole"))
    whole = main.train(whole_cfg, ckpt)
    part_cfg, ckpt = main.make_config(train_args(tmp_path, *flags, "--run-name", "part", "--max-steps", "3"))
    main.train(part_cfg, ckpt)
    cfg, ckpt = main.make_config(["--resume", part_cfg.run_dir])
    assert cfg.cuda_graphs
    resumed = main.train(cfg, ckpt)
    assert resumed["step"] == whole["step"] == 8
    a = torch.load(os.path.join(whole_cfg.run_dir, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part_cfg.run_dir, "checkpoint.pt"), weights_only=True)
    for net in ("G", "D"):
        for name, tensor in a[net].items():
            # cuDNN's autotuner may pick other kernels in another process: equal to rounding, not bit for bit
            torch.testing.assert_close(tensor, b[net][name], rtol=1e-4, atol=1e-6, msg=f"{net}.{name} differs after resume")
