"""Which GMM start should a fit choose? The measurement behind `Trainer._choose_base`'s rule.

For every cell and seed, the trainer's own candidates (EM GMMs with K = 10, 20, 40 and the k-means starts of
`BASE_EM_SEEDS`, fitted and scored on the trainer's validation split exactly as a default fit does) are scored
again on the cell's held-out items, as the suite scores a prior: excess FD of 3000 samples, k-NN precision and
recall, and on synthetic sets the true-density hole share. Then each selection rule picks a candidate from the
validation scores alone, and the tables show what its pick scores on the held-out items against the suite's GMM
row (10 components, the best of 5 k-means starts on the posterior moments, `evaluate._fit_gmm`): excess FD, the true-density hole
share (synthetic sets), the digit classifier's confidence on decoded samples (digits sets), and the pick's held-out
gain over N(0, I) (nats per item).

    python -m bench.base_choice --sets syn-mix8-d16,digits-d16-b0.1 --seeds 0,1,2

Writes markdown tables to stdout and every figure to --json (`--rerender A.json,B.json` prints them again).
"""

from __future__ import annotations

import math
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
from bench.study import digit_classifier, stored_or_measured, study_parser
from latent_prior.baselines import GMM_COMPONENTS, GMM_KMEANS_STARTS, GMMPrior
from latent_prior.fit_config import FD_TOLERANCE, FitConfig, resolve_objective
from latent_prior.metrics import excess_frechet_distance, precision_recall_knn
from latent_prior.vae import posterior_moments

SAMPLES = 3000


def _admissible(rows: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    limit = (1 + tolerance) * min(r["val_fd"] for r in rows)
    return [r for r in rows if r["val_fd"] <= limit] or rows


def _likely(rows: list[dict[str, Any]], ses: float) -> list[dict[str, Any]]:
    """The candidates whose held-out gain is within `ses` paired standard errors of the best candidate's."""
    return [r for r in rows if not r["val_gain_gap"] > ses * r["val_gain_gap_se"]] or rows


def _pr(row: dict[str, Any]) -> float:
    return row["val_precision"] + row["val_recall"]


def _likeliest_near_best_pr(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Among the FD-admissible candidates whose P+R is within `tolerance` of the best, the highest held-out gain."""
    admissible = _admissible(rows, FD_TOLERANCE)
    top = max(_pr(r) for r in admissible)
    return max((r for r in admissible if _pr(r) >= top - tolerance), key=lambda r: r["val_gain_nats"])


def _baseline_estimator(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate that is the GMM row's own estimator (several k-means starts); KeyError in a file without one."""
    for r in rows:
        if r.get("em_starts", 1) > 1:
            return r
    raise KeyError("em_starts")


def _baseline_unless_better(rows: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    """The GMM row's estimator, unless an FD-admissible candidate with FD no worse than its own has a P+R above its
    own by more than `margin`: then the best such P+R."""
    base = _baseline_estimator(rows)
    rivals = [
        r for r in _admissible(rows, FD_TOLERANCE) if r["val_fd"] <= (1 + FD_TOLERANCE) * base["val_fd"] and _pr(r) > _pr(base) + margin
    ]
    return max(rivals, key=_pr) if rivals else base


#: name -> rule: the candidate picked from the validation scores (val_fd, val_precision, val_recall, val_gain_*) alone
RULES: dict[str, Callable[[list[dict[str, Any]]], dict[str, Any]]] = {
    f"P+R, FD within {FD_TOLERANCE:g}": lambda rows: max(_admissible(rows, FD_TOLERANCE), key=_pr),
    f"P+R, FD within {FD_TOLERANCE:g}, gain within 2 s.e.": lambda rows: max(_admissible(_likely(rows, 2.0), FD_TOLERANCE), key=_pr),
    f"P+R, FD within {FD_TOLERANCE:g}, gain within 4 s.e.": lambda rows: max(_admissible(_likely(rows, 4.0), FD_TOLERANCE), key=_pr),
    "highest gain among P+R within 0.01 of the best": lambda rows: _likeliest_near_best_pr(rows, 0.01),
    "highest gain among P+R within 0.03 of the best": lambda rows: _likeliest_near_best_pr(rows, 0.03),
    "highest gain": lambda rows: max(rows, key=lambda r: r["val_gain_nats"]),
    "the GMM row's estimator": _baseline_estimator,
    "the GMM row's estimator unless P+R +0.02": lambda rows: _baseline_unless_better(rows, 0.02),
    "the GMM row's estimator unless P+R +0.05": lambda rows: _baseline_unless_better(rows, 0.05),
    "lowest FD": lambda rows: min(rows, key=lambda r: r["val_fd"]),
}


def picks(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """rule -> the candidate it picks for one cell and seed, for every rule the candidates' scores allow (a file of an
    earlier version of this study has no held-out gains)."""
    chosen = {}
    for name, rule in RULES.items():
        try:
            chosen[name] = rule(result["candidates"])
        except KeyError:
            continue
    return chosen


def candidates(lset: LatentSet, seed: int) -> list[dict[str, Any]]:
    """The trainer's base candidates for this set and seed, with its validation scores, and the fitted GMMs."""
    from accelerate import Accelerator

    from latent_prior.cache import EncodedLatents
    from latent_prior.trainer import Trainer

    source = EncodedLatents(
        lset.train_mean.float(), lset.train_logvar.float(), normalization=lset.normalization, description=f"<{lset.name}>"
    )
    fitted: dict[tuple[int, int, int], Any] = {}
    original = Trainer._base_gmm

    def recording(self: Any, components: int, em_seed: int, em_starts: int = 1) -> Any:
        fitted[components, em_seed, em_starts] = gmm = original(self, components, em_seed, em_starts)
        return gmm

    Trainer._base_gmm = recording
    try:
        with tempfile.TemporaryDirectory() as out:
            config = resolve_objective(FitConfig(latents=f"<{lset.name}>", out=out, seed=seed))
            trainer = Trainer(config, source, Path(out), Accelerator(cpu=True))
    finally:
        Trainer._base_gmm = original
    rows = [dict(r, gmm=fitted[r["components"], r["em_seed"], r.get("em_starts", 1)]) for r in trainer.base_choice]
    return rows


def heldout_scores(lset: LatentSet, gmm: Any, seed: int, classifier: Any) -> dict[str, float]:
    """What the suite measures of a prior's samples, for a GMM: excess FD, k-NN precision and recall (k = 3), the
    true-density hole share on synthetic sets, the digit classifier's mean confidence on decoded samples where the
    set decodes to digits, and the held-out gain over N(0, I) (nats per item, one posterior draw per held-out item)."""
    from bench.digits import classifier_confidence
    from bench.run import true_density_metrics, true_hole_threshold
    from latent_prior.sampling import log_standard_normal

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
        if "min_mode_ratio" in truth:
            out["min_mode_ratio"] = truth["min_mode_ratio"]
    if classifier is not None and lset.decode is not None:
        with torch.no_grad():
            raw = lset.normalization.denormalize(samples.reshape(-1, *lset.latent_shape))
            out["conf"] = classifier_confidence(classifier, lset.decode(raw))
    one = lset.draws_per_item("heldout", 1, torch.Generator().manual_seed(4000 + seed)).flatten(1).double()
    out["heldout_gain"] = (gmm.log_prob(one) - log_standard_normal(one)).mean().item()
    return out


def suite_gmm(lset: LatentSet, seed: int) -> Any:
    """The suite's GMM row: 10 full-covariance components, the best of 5 k-means starts, on the training
    items' posterior moments (`evaluate._fit_gmm`)."""
    means, variances = posterior_moments(lset.train_mean, lset.train_logvar, normalization=lset.normalization)
    return GMMPrior(n_components=GMM_COMPONENTS, covariance="full", seed=seed, n_init=GMM_KMEANS_STARTS).fit(means, variances)


def measure(name: str, seed: int, cache_dir: str, classifier: Any) -> dict[str, Any]:
    start = time.perf_counter()
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    rows = candidates(lset, seed)
    for r in rows:
        r.update(heldout_scores(lset, r.pop("gmm"), seed, classifier))
    baseline = heldout_scores(lset, suite_gmm(lset, seed), seed, classifier)
    return {"cell": name, "seed": seed, "candidates": rows, "gmm_row": baseline, "seconds": time.perf_counter() - start}


def _known(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def _per_cell(
    results: list[dict[str, Any]], rules: list[str], title: str, figure: Callable[[int, str], float | None], fmt: str
) -> list[str]:
    """One row per cell: the median over seeds of `figure(result index, rule)` for each rule (cells where it is None
    for every seed are left out)."""
    lines = [f"| cell | seeds | {title}: " + " | ".join(rules) + " |", "|---|---:|" + "---:|" * len(rules)]
    for cell in dict.fromkeys(r["cell"] for r in results):
        ids = [i for i, r in enumerate(results) if r["cell"] == cell]
        figs = [[v for i in ids if (v := figure(i, rule)) is not None] for rule in rules]
        if any(figs):
            lines.append(f"| {cell} | {len(ids)} | " + " | ".join(format(float(np.median(f)), fmt) if f else "—" for f in figs) + " |")
    return lines


def table(results: list[dict[str, Any]]) -> str:
    """A summary line per rule over every cell and seed, then per cell (median over seeds): the pick's excess FD
    minus the GMM row's (< 0: better than the GMM row), its true-density hole share (synthetic sets), its digit
    confidence minus the GMM row's (digits sets), and its held-out gain over N(0, I) (nats per item). Each rule
    picks from the stored candidates' validation scores, so a new rule needs no new measurement."""
    chosen = [picks(r) for r in results]
    rules = [rule for rule in RULES if all(rule in c for c in chosen)]

    def figure(key: str) -> Callable[[int, str], float | None]:
        return lambda i, rule: _known(chosen[i][rule].get(key))

    def versus_gmm(key: str) -> Callable[[int, str], float | None]:
        return lambda i, rule: None if (v := figure(key)(i, rule)) is None else v - results[i]["gmm_row"][key]

    lines = [
        "| rule | excess FD ≤ GMM row | conf ≥ GMM row − 0.005 | median Δ conf | worst hole share "
        "| held-out gain ≥ 0 | median held-out gain (nats) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rule in rules:
        fd = [versus_gmm("excess_fd")(i, rule) <= 0 for i in range(len(results))]
        conf = [v for i in range(len(results)) if (v := versus_gmm("conf")(i, rule)) is not None]
        holes = [v for i in range(len(results)) if (v := figure("true_hole_share")(i, rule)) is not None]
        gains = [v for i in range(len(results)) if (v := figure("heldout_gain")(i, rule)) is not None]
        lines.append(
            f"| {rule} | {sum(fd)} of {len(fd)} | {sum(c >= -0.005 for c in conf)} of {len(conf)} | "
            f"{np.median(conf) if conf else float('nan'):+.4f} | {max(holes, default=float('nan')):.3f} | "
            f"{sum(g >= 0 for g in gains)} of {len(gains)} | {np.median(gains) if gains else float('nan'):+.2f} |"
        )
    for title, value, fmt in (
        ("Δ excess FD", versus_gmm("excess_fd"), "+.4f"),
        ("hole share", figure("true_hole_share"), ".3f"),
        ("min mode ratio", figure("min_mode_ratio"), ".2f"),
        ("Δ conf", versus_gmm("conf"), "+.4f"),
        ("held-out gain", figure("heldout_gain"), "+.2f"),
    ):
        lines += ["", *_per_cell(results, rules, title, value, fmt)]
    return "\n".join(lines)


def candidate_table(results: list[dict[str, Any]]) -> str:
    """Every candidate of every cell and seed: its validation scores (what the rules see) beside its held-out figures
    (what the suite would measure), and the GMM row's held-out figures below each cell and seed."""
    keys = ("excess_fd", "precision", "recall", "true_hole_share", "min_mode_ratio", "conf", "heldout_gain")
    lines = [
        "| cell | seed | K | start | val FD | val P | val R | val gain | held-out: excess FD | P | R | hole share | "
        "min mode ratio | conf | gain (nats) |",
        "|---|---:|---:|---:|" + "---:|" * 11,
    ]

    def held(row: dict[str, Any]) -> str:
        return " | ".join("—" if _known(row.get(k)) is None else format(row[k], "+.4f" if k == "excess_fd" else ".3f") for k in keys)

    for r in results:
        for c in r["candidates"]:
            start = f"{c['em_seed']}" + (f" (best of {c['em_starts']})" if c.get("em_starts", 1) > 1 else "")
            lines.append(
                f"| {r['cell']} | {r['seed']} | {c['components']} | {start} | {c['val_fd']:.3f} | "
                f"{c['val_precision']:.3f} | {c['val_recall']:.3f} | {c['val_gain_nats']:+.2f} | {held(c)} |"
            )
        lines.append(f"| {r['cell']} | {r['seed']} | *GMM row* | | | | | | {held(r['gmm_row'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0,1,2")
    parser.add_argument("--candidates", action="store_true", help="also print every candidate's validation scores and held-out figures")
    args = parser.parse_args(argv)

    def say(rows: list[dict]) -> str:
        picked = "; ".join(f"{rule} {p['excess_fd']:+.4f}" for rule, p in picks(rows[0]).items())
        return f"GMM row {rows[0]['gmm_row']['excess_fd']:+.4f}; {picked}"

    measure_cell = lambda name, seed: [measure(name, seed, args.cache_dir, digit_classifier(args.sets))]
    results = stored_or_measured(args, parser, measure_cell, say)
    print(table(results) + ("\n\n" + candidate_table(results) if args.candidates else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
