"""Seeds: the one formula that turns the run's seed into each task's and each use's seed.

Every random stream of a run (weight init, shuffling, augmentation, alignment
samples, MIST's second view) is seeded from `task_seed(seed, t, salt)`, one
salt per use, so the streams are independent of each other and of the order in
which stages run. Data loading draws from its own `torch.Generator`; only
`seed_everything`, at the start of a training stage, touches the global RNGs.
"""

from __future__ import annotations

import random

import numpy as np
import torch

# salt of each random stream of task t
TRAIN = 0  # global RNGs at the start of training (weight init of the new head, dropout)
LOADER = 1  # the training loader's epoch order and augmentation
ALIGN = 2  # classifier alignment: Gaussian samples, shuffling
DRIFT = 3  # drift compensation: the weak-nonlinear map's training and samples
MIST_VIEW = 5  # MIST's on-device second view and Bernoulli masks


def task_seed(seed: int, t: int, salt: int = TRAIN) -> int:
    """The seed of random stream `salt` of task t of a run seeded with `seed`."""
    return seed * 1000 + 17 * t + salt


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Python's, NumPy's and torch's global generators; torch deterministic algorithms if asked."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on `device` seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed)
