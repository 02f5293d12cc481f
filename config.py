"""A GAN run's config: one field per flag of main.py, plus what a run adds.

main.py's flags take their defaults from here. It is a library module, not part of main.py,
so that evaluate.py and the reports read a run's config without importing the program.
"""

import dataclasses
import os


@dataclasses.dataclass
class Config:
    """Everything a run is made from. config.json and checkpoints store it as a plain dict (to_dict)."""
    # data
    dataset: str = "celeba"                # celeba | folder | synthetic
    data_root: str = "data/celeba"
    download: bool = False                 # try torchvision's CelebA download first
    synthetic_size: int = 10_000           # images in the synthetic training set
    workers: int = min(4, os.cpu_count() or 1)  # DataLoader processes when there is no cache
    cache: bool = True                     # decode once into a uint8 cache
    cache_dir: str = "data/cache"
    # model: SHAPE_KEYS, which a resumed run takes from its checkpoint
    image_size: int = 64
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    channels: int = 3
    # training
    epochs: int = 10
    max_steps: int | None = None           # a stop for one invocation, not kept on --resume
    batch: int = 128                       # the global batch, split over torchrun's processes
    lr: float = 2e-4
    beta1: float = 0.5
    seed: int = 0
    device: str = "auto"
    # speed
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False              # off until measured faster on a GPU (it has not been)
    sync_bn: bool = False
    # evaluation and detector
    eval_images: int = 1000
    detector_steps: int = 2000
    inception_weights: str | None = None
    # output
    logdir: str = "runs/generative_model"
    run_name: str | None = None
    log_every: int = 50
    sample_every: int = 500
    resume: str | None = None              # the run folder or checkpoint this run continues
    run_dir: str | None = None             # chosen by make_config

    @classmethod
    def from_dict(cls, saved):
        """A stored config; keys it lacks (flags added since it was written) take today's defaults, keys no longer used are dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self):
        return dataclasses.asdict(self)
