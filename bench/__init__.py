"""Benchmarks of latent-prior (run from the repo root: `python -m bench.prior`, `python bench/encode.py`)."""
