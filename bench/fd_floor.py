"""How much of the trainer's validation FD is the floor of an FD from few held-out items?

The trainer compares `fd_samples` (2,048) sampler draws with a fixed reference: posterior draws of the validation
items (10 % of the latents, at most `eval_latents`), each drawn round(2048 / items) times. This study puts posterior
draws of other training items in the sampler's place, so the FD it prints is what a perfect sampler would score:
the floor under every checkpoint's validation FD, over --splits random splits of the cell's training items.

    python -m bench.fd_floor --set photos-c32 --items 300 --cache-dir /tmp/bench/cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

SAMPLES = 2048  # FitConfig.fd_samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fd_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="photos-c32", help="a cell of the suite")
    parser.add_argument("--items", type=int, default=300, help="validation items in the reference (a fit of 3,000 latents holds out 300)")
    parser.add_argument("--splits", type=int, default=6, help="random splits of the training items")
    parser.add_argument(
        "--cache-dir", default="runs/bench_prior", help="where the suite trains its VAEs once (python -m bench --cache-dir)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from bench.datasets import load_set
    from latent_prior.metrics import frechet_distance

    lset = load_set(args.set, cache_dir=args.cache_dir, verbose=False)
    mean, logvar = lset.train_mean, lset.train_logvar
    if not 2 <= args.items <= len(mean) - SAMPLES // 4:
        parser.error(f"--items {args.items}: give 2 to {len(mean) - SAMPLES // 4} (the cell has {len(mean)} training items)")
    repeats = max(1, round(SAMPLES / args.items))
    floors = []
    for split in range(args.splits):
        g = torch.Generator().manual_seed(split)
        order = torch.randperm(len(mean), generator=g)
        held, other = order[: args.items], order[args.items :]
        other = other[torch.randint(len(other), (SAMPLES,), generator=g)] if len(other) < SAMPLES else other[:SAMPLES]
        reference = torch.cat([lset.draws_of(mean[held], logvar[held], g) for _ in range(repeats)]).flatten(1).double()
        floors.append(frechet_distance(lset.draws_of(mean[other], logvar[other], g).flatten(1).double(), reference))
        print(f"split {split}: FD {floors[-1]:.2f}", flush=True)
    t = torch.tensor(floors)
    print(
        f"{args.set}, {args.items} items × {repeats} draws, {mean[0].numel()} dims: floor {t.mean():.2f} ± {t.std():.2f} (s.d. over splits)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
