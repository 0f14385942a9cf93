"""Which GMM start should a fit choose? The measurement behind `Trainer._choose_base`'s rule.

For every cell and seed, the trainer's own candidates (EM GMMs with K = 10, 20, 40 and the k-means starts of
`BASE_EM_SEEDS`, fitted and scored on the trainer's validation split exactly as a default fit does) are scored
again on the cell's held-out items, as the suite scores a prior: excess FD of 3000 samples, k-NN precision and
recall, and on synthetic sets the true-density hole share. Then each selection rule picks a candidate from the
validation scores alone, and the table shows what its pick scores on the held-out items, as a ratio to the excess
FD of the suite's GMM row (10 components, the best likelihood of 5 k-means starts, `evaluate._fit_gmm`).

    python -m bench.base_choice --sets syn-mix8-d16,digits-d16-b0.1 --seeds 0,1,2

Writes a markdown table to stdout and every figure to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.datasets import LatentSet, load_set
from latent_prior.baselines import GMM_COMPONENTS, GMMPrior, gmm_fit_draws
from latent_prior.fit_config import FD_TOLERANCE, FitConfig, resolve_objective
from latent_prior.metrics import excess_frechet_distance, precision_recall_knn

SAMPLES = 3000


def _rank(values: list[float], reverse: bool = False) -> list[int]:
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=reverse)
    ranks = [0] * len(values)
    for r, i in enumerate(order):
        ranks[i] = r
    return ranks


def _admissible(rows: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    limit = (1 + tolerance) * min(r["val_fd"] for r in rows)
    return [r for r in rows if r["val_fd"] <= limit] or rows


#: name -> rule: the candidate picked from the validation scores (val_fd, val_precision, val_recall) alone
RULES: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    f"P+R, FD within {FD_TOLERANCE:g}": lambda rows: max(_admissible(rows, FD_TOLERANCE), key=lambda r: r["val_precision"] + r["val_recall"]),
    "P+R, FD within 0.2": lambda rows: max(_admissible(rows, 0.2), key=lambda r: r["val_precision"] + r["val_recall"]),
    "P+R, FD within 0.1": lambda rows: max(_admissible(rows, 0.1), key=lambda r: r["val_precision"] + r["val_recall"]),
    "lowest FD": lambda rows: min(rows, key=lambda r: r["val_fd"]),
    "best rank sum (FD, P+R)": lambda rows: min(rows, key=lambda r: r["rank_sum"]),
    "highest P+R": lambda rows: max(rows, key=lambda r: r["val_precision"] + r["val_recall"]),
}


def candidates(lset: LatentSet, seed: int) -> list[dict[str, Any]]:
    """The trainer's base candidates for this set and seed, with its validation scores, and the fitted GMMs."""
    from accelerate import Accelerator

    from latent_prior.cache import EncodedLatents
    from latent_prior.train import Trainer

    source = EncodedLatents(lset.train_mean.float(), lset.train_logvar.float(), normalization=lset.normalization,
                            description=f"<{lset.name}>")
    fitted: dict[tuple[int, int], Any] = {}
    original = Trainer._base_gmm

    def recording(self: Any, components: int, em_seed: int) -> Any:
        fitted[components, em_seed] = gmm = original(self, components, em_seed)
        return gmm

    Trainer._base_gmm = recording
    try:
        with tempfile.TemporaryDirectory() as out:
            config = resolve_objective(FitConfig(latents=f"<{lset.name}>", out=out, seed=seed))
            trainer = Trainer(config, source, Path(out), Accelerator(cpu=True))
    finally:
        Trainer._base_gmm = original
    rows = [dict(r, gmm=fitted[r["components"], r["em_seed"]]) for r in trainer.base_choice]
    for r, a, b in zip(rows, _rank([r["val_fd"] for r in rows]), _rank([r["val_precision"] + r["val_recall"] for r in rows], reverse=True)):
        r["rank_sum"] = a + b
    return rows


def heldout_scores(lset: LatentSet, gmm: Any, seed: int) -> dict[str, float]:
    """What the suite measures of a prior's samples, for a GMM: excess FD, k-NN precision and recall (k = 3), and
    the true-density hole share on synthetic sets."""
    from bench.run import true_density_metrics, true_hole_threshold

    g = torch.Generator().manual_seed(1000 + seed)
    held = lset.draws_per_item("heldout", max(1, round(SAMPLES / len(lset.heldout_mean))), g).flatten(1)
    reference = lset.draws("train", len(held), g).flatten(1)
    samples = gmm.sample(len(held), generator=torch.Generator().manual_seed(2000 + seed)).flatten(1).float()
    m = min(len(held), len(samples))
    pr = precision_recall_knn(held[:m], samples[:m], k=3)
    out = {"excess_fd": excess_frechet_distance(samples, held, reference), "precision": pr.precision, "recall": pr.recall}
    threshold = true_hole_threshold(lset)
    if threshold is not None:
        truth = true_density_metrics(lset, samples.reshape(-1, *lset.latent_shape), threshold)
        out["true_hole_share"] = truth["true_hole_share"]
    return out


def suite_gmm(lset: LatentSet, seed: int) -> Any:
    """The suite's GMM row: 10 full-covariance components, the best likelihood of 5 k-means starts, on posterior draws."""
    _, count = gmm_fit_draws(len(lset.train_mean), lset.dims, False)
    draws = lset.draws("train", count, torch.Generator().manual_seed(3000 + seed)).flatten(1).double()
    return GMMPrior(n_components=GMM_COMPONENTS, covariance="full", seed=seed, n_init=5).fit(draws)


def measure(name: str, seed: int, cache_dir: str) -> dict[str, Any]:
    start = time.perf_counter()
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    rows = candidates(lset, seed)
    for r in rows:
        r.update(heldout_scores(lset, r.pop("gmm"), seed))
    baseline = heldout_scores(lset, suite_gmm(lset, seed), seed)
    picks = {rule: RULES[rule](rows) for rule in RULES}
    return {"cell": name, "seed": seed, "candidates": rows, "gmm_row": baseline, "seconds": time.perf_counter() - start,
            "picks": {rule: {"components": p["components"], "em_seed": p["em_seed"]} for rule, p in picks.items()},
            "ratios": {rule: p["excess_fd"] / baseline["excess_fd"] if baseline["excess_fd"] > 0 else float("nan")
                       for rule, p in picks.items()},
            "excess_fd": {rule: p["excess_fd"] for rule, p in picks.items()},
            "holes": {rule: p.get("true_hole_share") for rule, p in picks.items()}}


def table(results: list[dict[str, Any]]) -> str:
    """Per cell (median over seeds): the GMM row's excess FD, then each rule's pick as pick − GMM row (excess FD;
    < 0 is better than the GMM row) and its true-density hole share where known; then a summary line per rule."""
    cells = list(dict.fromkeys(r["cell"] for r in results))
    rules = list(RULES)
    lines = ["| cell | seeds | GMM row excess FD | " + " | ".join(f"{rule}: Δ FD (holes)" for rule in rules) + " |",
             "|---|---:|---:|" + "---:|" * len(rules)]
    wins = {rule: [0, 0] for rule in rules}
    for cell in cells:
        rs = [r for r in results if r["cell"] == cell]
        gmm = float(np.median([r["gmm_row"]["excess_fd"] for r in rs]))
        figs = []
        for rule in rules:
            diffs = [r["excess_fd"][rule] - r["gmm_row"]["excess_fd"] for r in rs]
            holes = [r["holes"][rule] for r in rs if r["holes"][rule] is not None]
            for d in diffs:
                wins[rule][0 if d <= 0 else 1] += 1
            figs.append(f"{np.median(diffs):+.4f}" + (f" ({np.median(holes):.3f})" if holes else ""))
        lines.append(f"| {cell} | {len(rs)} | {gmm:+.4f} | " + " | ".join(figs) + " |")
    lines.append("| **pick ≤ GMM row (cell-seeds)** | | | " + " | ".join(f"{w[0]} of {sum(w)}" for w in wins.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", required=True, help="comma-separated cells of the suite (flat ones: syn-*, digits-*)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--cache-dir", default="runs/bench_prior", help="where the digits VAEs are trained once")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            results.append(measure(name, seed, args.cache_dir))
            r = results[-1]
            print(f"[{r['seconds']:6.1f} s] {name} seed {seed}: GMM row {r['gmm_row']['excess_fd']:+.4f}; "
                  + "; ".join(f"{rule} {r['excess_fd'][rule]:+.4f}" for rule in RULES), file=sys.stderr, flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
