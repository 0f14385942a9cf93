"""How many torch CPU threads the small networks of a prior run on: the one place that decides.

    with cpu_threads(config.cpu_threads):      # fit, sample, eval: 0 or None = the policy below
        ...

The energy, the flows and the baselines are small MLPs and convs: their matmuls gain nothing from intra-op
threads, and on a machine where another job runs, the threads wait for each other's cores. Measured on 2
shared cores: a default 8-D fit took 76 s on one thread and 541 s on two; `latent-prior sample -n 20000` took
0.2 s on one thread and 3.1-13 s on two. So the default is ONE thread, unless the user chose: an explicit
count (`--cpu-threads N`) wins, and so does OMP_NUM_THREADS / MKL_NUM_THREADS set in the environment
(torch has then already taken that count, and we keep it). A GPU run is not affected (CPU threads only).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

#: the environment variables through which a user sets torch's CPU threads
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def policy_threads(requested: int | None = None) -> int:
    """The thread count to use: `requested` when positive, else the user's environment setting (torch's
    current count), else 1."""
    if requested:
        return int(requested)
    if any(os.environ.get(name, "").strip() for name in THREAD_ENV_VARS):
        return torch.get_num_threads()
    return 1


@contextmanager
def cpu_threads(requested: int | None = None) -> Iterator[int]:
    """Run the block with `policy_threads(requested)` torch threads; the previous count is restored after."""
    before = torch.get_num_threads()
    threads = policy_threads(requested)
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
