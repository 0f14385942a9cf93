"""Shared test setup: never touch the network, and one CPU thread per process.

Our test models are tiny, so intra-op threading only adds overhead; with two processes per
distributed test on CI's 2 cores, more threads would oversubscribe the machine (measured: a tiny
flow step took 0.68 s with 2 threads under load vs 0.011 s with 1).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Inherited by subprocesses (kill-and-resume and `accelerate launch` tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
