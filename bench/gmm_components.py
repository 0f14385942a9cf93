"""How many components should the GMM start have? EM GMMs of 10, 20 and 40 components on each set's training
posterior draws, scored on its held-out draws (the measurement behind `flow_base_components=0`).

    python -m bench.gmm_components digits-d8-b0.1 digits-d16-b0.1 syn-mix20-d64 syn-spiral-d16 digits-d64-b1

One line per set and K: held-out mean log-likelihood (nats), excess FD of 3000 samples, k-NN precision, and on
synthetic sets the samples' mean true log-density. Full covariances within 10·256² values, else diagonal.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.datasets import load_set
from latent_prior.baselines import GMMPrior, gmm_fit_draws
from latent_prior.metrics import frechet_distance, precision_recall_knn


def main(argv: list[str] | None = None, cache_dir: str = "runs/bench_prior") -> int:
    torch.set_num_threads(1)
    for name in argv if argv is not None else sys.argv[1:]:
        lset = load_set(name, cache_dir=cache_dir, verbose=False)
        g = torch.Generator().manual_seed(0)
        dims, n = lset.dims, len(lset.train_mean)
        held = lset.draws_per_item("heldout", max(1, round(3000 / len(lset.heldout_mean))), g).flatten(1)
        floor = frechet_distance(lset.draws("train", len(held), g).flatten(1), held)
        for k in (10, 20, 40):
            cov = "full" if k * dims * dims <= 10 * 256 * 256 else "diag"
            _, count = gmm_fit_draws(n, dims, False, k)
            start = time.perf_counter()
            gmm = GMMPrior(n_components=k, covariance=cov, seed=0, n_init=1).fit(lset.draws("train", count, g).flatten(1))
            seconds = time.perf_counter() - start
            samples = gmm.sample(len(held), generator=torch.Generator().manual_seed(1)).flatten(1)
            m = len(lset.heldout_mean)
            precision = [
                precision_recall_knn(held[r * m : (r + 1) * m], samples[r * m : (r + 1) * m], k=3).precision for r in range(len(held) // m)
            ]
            line = (
                f"{name} K={k} {cov} draws={count} fit {seconds:.1f}s held-out log-lik {gmm.log_prob(held).mean():.3f} "
                f"excess FD {frechet_distance(samples, held) - floor:+.4f} precision {sum(precision) / len(precision):.3f}"
            )
            if lset.true_log_prob is not None:
                line += f" true log p {lset.true_log_prob(samples.reshape(-1, *lset.latent_shape)).mean():.3f}"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
