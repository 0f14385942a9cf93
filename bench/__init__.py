"""Benchmarks of latent-prior (run from the repo root: `python -m bench`, `python bench/encode.py`)."""
