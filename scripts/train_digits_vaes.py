"""Train the flat-latent digits VAEs of the prior benchmarks and save them with their latents.

The wide suite of `python -m bench` has one flat digits VAE per latent size d ∈ {8, 16, 32, 64}
and KL weight β ∈ {1, 0.1, 0.01}: its sets `digits-d<d>-b<β>` (`bench.datasets.DIGITS_SETS`). This script
trains them into the benchmark's cache folder, in the layout `bench.datasets.load_set` reads
(`bench.datasets.digits_vae_dir`: `digits_vae_beta<β>_epochs<E>/` for d = 8, `digits_vae_d<d>_beta<β>_epochs<E>/`
otherwise; see `bench.digits.save_digits_vae` for the files), so the suite never pays for the training. A
folder that is already complete is reloaded, not retrained. For each VAE it prints one JSON line: its
held-out figures, its training seconds (recorded when it was trained), and how digit-like (mean max-softmax of a
classifier trained on real digits) decoded posterior draws and decoded N(0, I) draws are.

    .venv/bin/python scripts/train_digits_vaes.py                       # all 12 into runs/bench_prior (~4-6 min on one core)
    .venv/bin/python scripts/train_digits_vaes.py --latent-dims 16 --betas 0.1 --output-dir /tmp/vaes
    .venv/bin/python scripts/train_digits_vaes.py --help

300 epochs for every size: measured on this 2-core machine under load, one VAE takes 17-21 s (d = 8 … 64)
on one thread, and the held-out reconstruction of the d = 64, β = 0.01 VAE still improves from 100 to 300
epochs (15.6 → 15.3 nats), so no size needs fewer.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `bench/` lives at the repo root

from bench.datasets import DIGITS_BETAS, DIGITS_DIMS, DIGITS_EPOCHS, build_digits_vae, digits_vae_dir  # noqa: E402
from bench.digits import (  # noqa: E402
    classifier_confidence,
    encode_moments,
    load_digits_split,
    load_digits_vae,
    train_digit_classifier,
)
from latent_prior.config import option, parse_config  # noqa: E402


@dataclass
class TrainDigitsVAEsConfig:
    output_dir: str = option("runs/bench_prior", "the benchmark's --cache-dir: one subfolder per (d, beta) is written here")
    latent_dims: tuple[int, ...] = option(DIGITS_DIMS, "latent sizes to train")
    betas: tuple[float, ...] = option(DIGITS_BETAS, "KL weights to train")
    epochs: int = option(DIGITS_EPOCHS, "epochs over the 1500 training digits (the benchmark's sets use 300)")
    threads: int = option(1, "torch CPU threads (1 is fastest for these small MLPs, and on shared cores)")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainDigitsVAEsConfig, argv, description=__doc__.split("\n\n")[0])
    torch.set_num_threads(cfg.threads)

    split = load_digits_split(seed=0)
    classifier = train_digit_classifier(split, seed=0)
    print(
        f"classifier held-out accuracy {classifier.heldout_accuracy:.3f}, "
        f"confidence on real held-out digits {classifier_confidence(classifier, split.heldout_x):.3f}",
        flush=True,
    )
    start = time.perf_counter()
    for latent_dim in cfg.latent_dims:
        for beta in cfg.betas:
            cached = (digits_vae_dir(Path(cfg.output_dir), beta, cfg.epochs, latent_dim) / "heldout_latents.safetensors").is_file()
            directory = build_digits_vae(latent_dim, beta, cfg.output_dir, cfg.epochs, verbose=False)
            model, _, _ = load_digits_vae(directory)
            gen = torch.Generator().manual_seed(0)
            mean, logvar = encode_moments(model, split.heldout_x)
            with torch.no_grad():
                posterior = model.decode(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen))
                gaussian = model.decode(torch.randn(2000, latent_dim, generator=gen))
            report = {
                "set": f"digits-d{latent_dim}-b{beta:g}",
                "latent_dim": latent_dim,
                "beta": beta,
                "epochs": cfg.epochs,
                "dir": str(directory),
                "cached": cached,
                **{f"heldout_{k}": round(v, 4) for k, v in model.metrics["heldout"].items()},
                "train_seconds": round(model.metrics["train_seconds"], 1),  # when it was trained
                "confidence_posterior_decodes": round(classifier_confidence(classifier, posterior), 4),
                "confidence_gaussian_decodes": round(classifier_confidence(classifier, gaussian), 4),
            }
            print(json.dumps(report), flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
