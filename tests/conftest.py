"""Fixtures the test files share. Plain helper functions are in helpers.py."""

import os
import shutil

# The tests' tensors are tiny: a second thread only adds OpenMP hand-offs, and on a shared machine each
# hand-off waits for a free core (docs/speed.md, "A note on shared CPUs"). Set before torch starts its
# thread pool, and inherited by the programs the tests start.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import main
from helpers import train_args


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One epoch of a tiny run (4 steps): checkpoint.pt, snapshots/G_epoch001.pt, config.json. Read it, never change it."""
    logdir = tmp_path_factory.mktemp("tiny")
    assert main.main(train_args(logdir, "--epochs", "1", "--run-name", "r")) == 0
    return str(logdir / "r")


@pytest.fixture
def tiny_run_copy(tiny_run, tmp_path):
    """A copy of tiny_run that a test may change."""
    return shutil.copytree(tiny_run, tmp_path / "r")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """detect.py's --checkpoint in tests: a checkpoint shaped like main.py's, its discriminator's weights spread out so scores differ from face to face."""
    import checkpoint as ckpt_file
    from models import build_models
    cfg = vars(main.get_args_parser().parse_args(["--image-size", "32", "--ngf", "8", "--ndf", "8"]))
    cfg["channels"] = 3
    torch.manual_seed(0)
    G, D = build_models(cfg)
    with torch.no_grad():
        for p in D.parameters():
            p.normal_(0, 0.3)
        for name, b in D.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2)
    opt_G, opt_D = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    ckpt_file.save({"config": cfg, "G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(),
                     "opt_D": opt_D.state_dict(), "epoch": 0, "done_in_epoch": 0, "step": 0,
                     "fixed_noise": torch.randn(4, cfg["nz"]), "rng": {"torch": torch.get_rng_state(), "cuda": None}}, path, "training")
    return str(path)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """A weights file of the right shape with random values: the real one is 91 MB and needs a download."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe
    patch = pytest.MonkeyPatch()
    patch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
    patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    patch.undo()
    for m in model.modules():  # He initialisation, so that features do not fade to zero through 90-odd layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save(model.state_dict(), path)
    return str(path)
