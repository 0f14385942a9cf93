"""What should the GMM be fitted on: posterior draws or posterior moments? The measurement behind `GMMPrior.fit`'s
`variances`, which both the GMM baseline and the EVaLP flow's GMM start use.

For every cell and seed, the suite's GMM (10 full-covariance components, the best of 5 k-means starts) is
fitted three ways on the same training items and scored on the held-out items as the suite scores a prior
(`bench.base_choice.heldout_scores`): excess FD of 3000 samples, k-NN precision and recall, the true-density hole
share on synthetic sets, the digit classifier's confidence on decoded digits, and the held-out gain over N(0, I)
(nats per item, one posterior draw each).

- `draws`: posterior draws, one per item where the items are many for the dimension (`gmm_fit_draws`, the rule
  before the moments);
- `draws x16`: 16 draws per item, at most GMM_MAX_DRAWS in all (EM's cost grows with them: ~35 s per fit at d = 64);
- `moments`: the items' posterior means and variances, `GMMPrior.fit(means, variances)`.

    python -m bench.gmm_fit_data --sets digits-d16-b0.1,digits-d64-b1,syn-mix8-d16 --seeds 0,1

Writes a markdown table to stdout (one row per cell and way, medians over the seeds) and every figure to --json.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.base_choice import heldout_scores
from bench.datasets import LatentSet, load_set
from bench.study import digit_classifier, stored_or_measured, study_parser
from latent_prior.baselines import GMM_COMPONENTS, GMM_KMEANS_STARTS, GMM_MAX_DRAWS, GMMPrior, gmm_fit_draws
from latent_prior.vae import posterior_moments

WAYS = ("draws", "draws x16", "moments")
FIGURES = (
    ("excess_fd", "excess FD", "+.4f"),
    ("precision", "precision", ".3f"),
    ("recall", "recall", ".3f"),
    ("conf", "digit conf", ".4f"),
    ("true_hole_share", "hole share", ".3f"),
    ("heldout_gain", "held-out gain", "+.2f"),
    ("fit_seconds", "fit s", ".1f"),
)


def fit_data(lset: LatentSet, way: str, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (N, D) float64 data and variances (or None) that `way` fits the GMM on, from the cell's training items."""
    norm, g = lset.normalization, torch.Generator().manual_seed(3000 + seed)
    n = len(lset.train_mean)
    if way == "moments":
        means, variances = posterior_moments(lset.train_mean, lset.train_logvar, normalization=norm)
        return means.flatten(1).double(), variances.flatten(1).double()
    if way == "draws":
        _, count = gmm_fit_draws(n, lset.dims, False)
        return lset.draws("train", count, g).flatten(1).double(), None
    return lset.draws_per_item("train", max(1, min(16, GMM_MAX_DRAWS // n)), g).flatten(1).double(), None


def measure(name: str, seed: int, cache_dir: str, classifier: Any) -> list[dict[str, Any]]:
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    rows = []
    for way in WAYS:
        data, variances = fit_data(lset, way, seed)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # EM's notes on few points per component are the subject here
            gmm = GMMPrior(n_components=GMM_COMPONENTS, covariance="full", seed=seed, n_init=GMM_KMEANS_STARTS).fit(data, variances)
        seconds = time.perf_counter() - start
        scores = heldout_scores(lset, gmm, seed, classifier if lset.decode is not None else None)
        rows.append({"cell": name, "seed": seed, "way": way, "fit_items_or_draws": len(data), "fit_seconds": seconds, **scores})
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | seeds | fitted on | " + " | ".join(title for _, title, _ in FIGURES) + " |",
        "|---|---:|---|" + "---:|" * len(FIGURES),
    ]
    for cell in dict.fromkeys(r["cell"] for r in results):
        for way in WAYS:
            rows = [r for r in results if r["cell"] == cell and r["way"] == way]
            cells = []
            for key, _, fmt in FIGURES:
                values = [r[key] for r in rows if r.get(key) is not None]
                cells.append(format(float(np.median(values)), fmt) if values else "—")
            lines.append(f"| {cell} | {len(rows)} | {way} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0,1")
    args = parser.parse_args(argv)
    results = stored_or_measured(
        args,
        parser,
        lambda name, seed: measure(name, seed, args.cache_dir, digit_classifier(args.sets)),
        lambda rows: "excess FD " + ", ".join(f"{r['way']} {r['excess_fd']:+.4f}" for r in rows),
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
