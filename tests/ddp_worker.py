"""Run by tests/test_ddp.py under torchrun: main.main(argv), then save this rank's final parameters to OUT/rankN.pt.

Usage: torchrun --nproc_per_node 2 tests/ddp_worker.py OUT [main.py flags...]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import main  # noqa: E402
import models  # noqa: E402

networks = {}
train_step = models.train_step


def remember_networks(G, D, *args, **kwargs):
    networks["G"], networks["D"] = G, D  # the DDP wrappers this rank trains
    return train_step(G, D, *args, **kwargs)


models.train_step = remember_networks
status = main.main(sys.argv[2:])
torch.save({name: {k: v.detach().clone() for k, v in net.module.named_parameters()} for name, net in networks.items()},
           os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
sys.exit(status)
