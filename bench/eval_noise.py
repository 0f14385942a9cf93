"""How much of a cell's excess FD is the evaluation's own noise? The measurement behind reading the suite's
"EVaLP ≤ GMM" verdicts.

For every cell and fit seed, one EVaLP fit with FitConfig defaults (as `python -m bench` fits it), then the suite's
latent metrics (`evaluate.latent_report`, 3000 samples) of the EVaLP sampler and of the GMM row at several
evaluation seeds: each draws new samples, new held-out and training reference draws, and refits the GMM row with
that seed, as a suite run with that seed would. The fit stays the same, so the spread over evaluation seeds is what
one suite figure can move without any change to the prior.

    python -m bench.eval_noise --sets digits-d16-b0.1,syn-knot-d32 --seeds 0 --eval-seeds 0,1,2,3,4

Prints a markdown table (one row per cell and fit seed) and writes every figure to --json.
bench/results/eval_noise.* were measured before b9bb624, when the evaluation's streams were seeded as `seed + offset`
(the matched-seed effect of docs/prior-development.md); `latent_report` now hashes them.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.datasets import load_set
from bench.fits import fit_evalp
from bench.run import _memory_source
from bench.study import stored_or_measured, study_parser
from latent_prior.evaluate import latent_report

SAMPLES = 3000


def measure(name: str, seed: int, eval_seeds: list[int], cache_dir: str) -> dict[str, Any]:
    """{"cell", "seed", "fit_seconds", "evaluations": [{"eval_seed", "evalp", "gmm"}: excess FD per method]}."""
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    source, train, heldout = _memory_source(lset)
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(sys.stderr):  # the fit's summary line: not the table's
        prior, seconds, _ = fit_evalp(lset, Path(work), f"seed{seed}", {"seed": seed})
    evaluations = []
    for eval_seed in eval_seeds:
        report = latent_report(prior, source, heldout, train, samples=SAMPLES, seed=eval_seed, methods=["gmm", "evalp"], gain=False)
        evaluations.append({"eval_seed": eval_seed, **{r["method"]: r["excess_fd"] for r in report["rows"]}})
    return {"cell": name, "seed": seed, "fit_seconds": seconds, "evaluations": evaluations}


def _mean_sd(values: list[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return f"{np.mean(values):+.4f} ± {sd:.4f}"


def _row(r: dict[str, Any]) -> str:
    evalp = [e["evalp"] for e in r["evaluations"]]
    gmm = [e["gmm"] for e in r["evaluations"]]
    diff = [a - b for a, b in zip(evalp, gmm)]
    return (
        f"| {r['cell']} | {r['seed']} | {len(evalp)} | {_mean_sd(evalp)} | {min(evalp):+.4f} .. {max(evalp):+.4f} | "
        f"{_mean_sd(gmm)} | {min(gmm):+.4f} .. {max(gmm):+.4f} | {_mean_sd(diff)} | "
        f"{sum(d <= 0 for d in diff)} of {len(diff)} |"
    )


def table(results: list[dict[str, Any]]) -> str:
    """Per cell and fit seed: each method's excess FD, mean ± s.d. over the evaluation seeds and its range, then the
    paired difference EVaLP − GMM (mean ± s.d.) and in how many evaluations EVaLP's is at most the GMM's."""
    header = [
        "| cell | fit seed | evaluations | EVaLP: mean ± s.d. | EVaLP range | GMM row: mean ± s.d. | GMM range | "
        "EVaLP − GMM: mean ± s.d. | EVaLP ≤ GMM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(header + [_row(r) for r in results])


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0")
    parser.add_argument("--eval-seeds", default="0,1,2,3,4", help="comma-separated evaluation seeds per fit")
    args = parser.parse_args(argv)
    eval_seeds = [int(s) for s in args.eval_seeds.split(",")]
    measure_cell = lambda name, seed: [measure(name, seed, eval_seeds, args.cache_dir)]
    results = stored_or_measured(args, parser, measure_cell, lambda rows: f"fitted in {rows[0]['fit_seconds']:.0f} s")
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
