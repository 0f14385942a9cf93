"""Train the flat-latent digits VAEs used by the prior benchmarks and save them with their latents.

For each beta it writes `<output-dir>/beta<beta>/` (see `bench.digits.save_digits_vae`):
model.safetensors, config.json, split.safetensors, train_latents.safetensors and
heldout_latents.safetensors; then it prints each VAE's figures and how digit-like (mean max-softmax
of a classifier trained on real digits) decoded posterior draws and decoded N(0, I) draws are.

    .venv/bin/python scripts/train_digits_vaes.py --output-dir runs/digits_vaes
    .venv/bin/python scripts/train_digits_vaes.py --help
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `bench/` lives at the repo root

from bench.digits import (  # noqa: E402
    classifier_confidence,
    encode_moments,
    load_digits_split,
    save_digits_vae,
    train_digit_classifier,
    train_digits_vae,
)
from latent_prior.config import add_arguments, resolve  # noqa: E402


@dataclass
class TrainDigitsVAEsConfig:
    output_dir: str = field(default="runs/digits_vaes", metadata={"help": "one subfolder per beta is written here"})
    betas: tuple[float, ...] = field(default=(1.0, 0.1), metadata={"help": "KL weights to train"})
    latent_dim: int = field(default=8, metadata={"help": "latent dimensions"})
    epochs: int = field(default=300, metadata={"help": "epochs over the 1500 training digits"})
    seed: int = field(default=0, metadata={"help": "seed for init and batches (the split uses seed 0)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is fastest for these small MLPs, and on shared cores)"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, TrainDigitsVAEsConfig)
    cfg = resolve(TrainDigitsVAEsConfig, parser.parse_args(argv))
    torch.set_num_threads(cfg.threads)

    split = load_digits_split(seed=0)
    classifier = train_digit_classifier(split, seed=0)
    print(f"classifier held-out accuracy {classifier.heldout_accuracy:.3f}, "
          f"confidence on real held-out digits {classifier_confidence(classifier, split.heldout_x):.3f}")
    gen = torch.Generator().manual_seed(cfg.seed)
    for beta in cfg.betas:
        model, _ = train_digits_vae(beta, cfg.latent_dim, cfg.seed, cfg.epochs, split=split)
        directory = save_digits_vae(model, split, Path(cfg.output_dir) / f"beta{beta:g}")
        mean, logvar = encode_moments(model, split.heldout_x)
        with torch.no_grad():
            posterior = model.decode(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen))
            gaussian = model.decode(torch.randn(2000, cfg.latent_dim, generator=gen))
        report = {
            "beta": beta,
            "dir": str(directory),
            **{f"heldout_{k}": round(v, 4) for k, v in model.metrics["heldout"].items()},
            "train_seconds": round(model.metrics["train_seconds"], 1),
            "confidence_posterior_decodes": round(classifier_confidence(classifier, posterior), 4),
            "confidence_gaussian_decodes": round(classifier_confidence(classifier, gaussian), 4),
        }
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
