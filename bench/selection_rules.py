"""Which checkpoint should a fit export? Every selection rule replayed on one default fit per cell and seed.

For every cell and seed, one fit with FitConfig defaults (the suite's evalp fit) keeps all its checkpoints. Each
rule of RULES is replayed on the fit's validation history (`latent_prior.selection.replay`, the trainer's own
code), and every evaluated checkpoint is measured as the suite measures a prior: its EMA sampler's excess
FD, precision and recall, the ELBO gain over N(0, I) with a fresh log Ẑ (`bench.run.sampler_row`), the digit
classifier's confidence and the true density's figures; beside them the suite's GMM row for the same seed. So the
rules are compared on the same fits, and the default rule's rows are the suite's evalp rows. The tables end with
the checkpoint of each fit that is best on the test figure itself (`oracle_rows`): the ceiling of any rule.

    python -m bench.selection_rules --sets digits-d16-b0.1,syn-mix8-d16 --seeds 0,1,2 --json /tmp/sel.json

Writes markdown tables to stdout and every figure to --json (`--rerender A.json,B.json` prints them again).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from scipy.stats import rankdata

from bench.study import digit_classifier, stored_or_measured, study_parser

#: the row label of `oracle_rows`
ORACLE = "best test FD (oracle)"
#: label -> the FitConfig selection fields of the rule; "start" and "last" are the first and the last checkpoint
RULES: dict[str, dict[str, Any]] = {
    "gain_and_fd": {"select_by": "gain_and_fd"},
    "gain_within_fd 5%": {"select_by": "gain_within_fd", "select_fd_tolerance": 0.05},
    "gain_within_fd 10%": {"select_by": "gain_within_fd", "select_fd_tolerance": 0.1},
    "gain_within_fd 25%": {"select_by": "gain_within_fd", "select_fd_tolerance": 0.25},
    "gain": {"select_by": "gain"},
    "start": {},
    "last": {},
}
#: the figures of a row that the tables compare
FIGURES = ("excess_fd", "precision", "recall", "conf", "true_hole_share", "min_mode_ratio", "elbo_gain_nats")


def picks(prior: Any, run: Path) -> dict[str, int]:
    """rule -> the step it selects from the fit in `run` (the fit's own rule replayed must give its exported step)."""
    from latent_prior.checkpoints import checkpoint_dirs
    from latent_prior.selection import replay_run

    if replay_run(run) != prior.training_info["summary"]["selected_step"]:
        raise RuntimeError(f"{run}: replaying the fit's own rule does not pick the step it exported: replay is out of step")
    steps = {"start": prior.training_info["history"][0]["step"], "last": checkpoint_dirs(run / "train" / "checkpoints")[-1][0]}
    return steps | {label: replay_run(run, **rule) for label, rule in RULES.items() if rule}


def load_checkpoint(prior: Any, run: Path, step: int, log_z_samples: int, seed: int) -> Any:
    """The prior with the energy and EMA sampler of checkpoint `step` and a fresh log Ẑ (as the trainer's export)."""
    import copy

    from latent_prior.checkpoints import STEP_PREFIX, load_tensors
    from latent_prior.fit_config import SEEDS
    from latent_prior.sampling import estimate_log_z

    folder = run / "train" / "checkpoints" / f"{STEP_PREFIX}{step:07d}"
    prior = copy.deepcopy(prior)
    prior.energy_net.load_state_dict(load_tensors(folder / "energy.safetensors"))
    prior.flow.load_state_dict(load_tensors(folder / "flow_ema.safetensors"))
    generator = torch.Generator().manual_seed(seed + SEEDS.eval_log_z)
    with torch.no_grad():
        prior.log_z = estimate_log_z(
            prior.energy_net, prior.flow, log_z_samples, batch_size=min(log_z_samples, 4096), generator=generator
        ).log_z
    return prior


def measure(name: str, seed: int, cache_dir: str, classifier: Any) -> list[dict[str, Any]]:
    from bench.datasets import load_set
    from bench.fits import fit_evalp
    from bench.run import EVALUATIONS, _memory_source, _report, _row_of, sample_figures, sampler_row, true_hole_threshold

    start = time.perf_counter()
    lset = load_set(name, cache_dir=cache_dir, verbose=False)
    source, train, heldout = _memory_source(lset)
    threshold = true_hole_threshold(lset)
    samples = 3000
    with tempfile.TemporaryDirectory() as workdir:
        prior, seconds, summary = fit_evalp(lset, Path(workdir), f"seed{seed}", {"seed": seed, "keep_checkpoints": 10_000})
        run = Path(workdir) / f"fit-seed{seed}"
        steps = picks(prior, run)
        figures: dict[str, float] = {}

        def keep(method: str, z: torch.Tensor) -> None:
            figures.clear()
            figures.update(sample_figures(lset, z, classifier, threshold))

        log = lambda text: print(text, file=sys.stderr, flush=True)
        report, errors = _report(
            prior, source, heldout, train, ["gmm"], samples=samples, seed=seed, evaluations=EVALUATIONS, gain=False, keep=keep, log=log
        )
        gmm_row = {"error": errors["gmm"]} if errors else {**_row_of(report["rows"][0]), **figures}
        # every evaluated checkpoint, so that a rule not in RULES can be judged from the --json file later
        history = {h["step"]: h for h in prior.training_info["history"]}
        scored: dict[int, dict[str, Any]] = {}
        for step in sorted(set(history) | set(steps.values())):
            candidate = load_checkpoint(prior, run, step, prior.training_info["config"]["log_z_samples"], seed)
            row = sampler_row(candidate, source, heldout, train, samples=samples, seed=seed, evaluations=EVALUATIONS, keep=keep, log=log)
            validation = {k: history.get(step, {}).get(k) for k in ("val_gain_nats", "val_fd", "val_precision", "ess_fraction")}
            scored[step] = {**row, **figures, **validation}
    rows = [{"cell": name, "seed": seed, "rule": "GMM row", **gmm_row}]
    rows += [{"cell": name, "seed": seed, "rule": label, "step": step, **scored[step]} for label, step in steps.items()]
    rows += [{"cell": name, "seed": seed, "rule": "checkpoint", "step": step, **row} for step, row in scored.items()]
    for r in rows:
        r["fit_seconds"], r["seconds"] = seconds, time.perf_counter() - start
    return rows


def _two_se(a: list[float], b: list[float]) -> float:
    """2 s.e. of the difference of two seed means (0 with one seed: compared strictly), as the suite's goals."""
    var = lambda v: float(np.var(v, ddof=1)) / len(v) if len(v) > 1 else 0.0
    return 2.0 * math.sqrt(var(a) + var(b))


def _values(rows: list[dict[str, Any]], cell: str, rule: str, key: str) -> list[float]:
    return [
        float(r[key]) for r in rows if r["cell"] == cell and r["rule"] == rule and r.get(key) is not None and math.isfinite(float(r[key]))
    ]


def oracle_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell and seed, the scored checkpoint with the lowest test excess FD, as a row of rule ORACLE: what a rule
    that could see the test split would export, the ceiling of any selection rule on that figure."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        key = (r["cell"], r["seed"])
        if r["rule"] == "checkpoint" and math.isfinite(r.get("excess_fd", math.nan)):
            if key not in best or r["excess_fd"] < best[key]["excess_fd"]:
                best[key] = r
    return [{**r, "rule": ORACLE} for r in best.values()]


def table(rows: list[dict[str, Any]]) -> str:
    """Per rule over the cells: how often its excess FD is at most the GMM row's (strictly, and within 2 s.e. over
    seeds) and its digit confidence at least the GMM row's (within 2 s.e.), its median rank by excess FD among the
    rules, and the smallest mode ratio; then per cell the median over seeds of each rule's excess FD, confidence or
    smallest mode ratio, and the steps each picked. The last line of each table is ORACLE (not ranked)."""
    ranked = [r for r in RULES if any(x["rule"] == r for x in rows)]
    oracle = oracle_rows(rows)
    rows = rows + oracle
    rules = ranked + ([ORACLE] if oracle else [])
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    median = lambda v: float(np.median(v)) if v else float("nan")
    ranks: dict[str, list[float]] = {rule: [] for rule in rules}
    for cell in cells:
        fds = [median(_values(rows, cell, rule, "excess_fd")) for rule in ranked]
        for rule, rank in zip(ranked, rankdata(fds)):  # ties share their mean rank
            ranks[rule].append(float(rank))
    lines = [
        "| rule | excess FD ≤ GMM row's | within 2 s.e. | conf ≥ GMM row's within 2 s.e. | median rank by excess FD | worst mode ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for rule in rules:
        strict = within = conf_ok = conf_n = 0
        for cell in cells:
            ours, gmm = _values(rows, cell, rule, "excess_fd"), _values(rows, cell, "GMM row", "excess_fd")
            strict += median(ours) <= median(gmm)
            within += np.mean(ours) - np.mean(gmm) <= _two_se(ours, gmm)
            c_ours, c_gmm = _values(rows, cell, rule, "conf"), _values(rows, cell, "GMM row", "conf")
            if c_ours and c_gmm:
                conf_n += 1
                conf_ok += np.mean(c_gmm) - np.mean(c_ours) <= _two_se(c_ours, c_gmm)
        modes = [v for cell in cells for v in _values(rows, cell, rule, "min_mode_ratio")]
        lines.append(
            f"| {rule} | {strict} of {len(cells)} | {within} of {len(cells)} | {conf_ok} of {conf_n} | "
            f"{f'{median(ranks[rule]):.1f}' if ranks[rule] else '—'} | {min(modes, default=float('nan')):.2f} |"
        )
    every = ["GMM row", *rules]
    for title, key, fmt in (
        ("excess FD", "excess_fd", "+.4f"),
        ("digit confidence", "conf", ".4f"),
        ("min mode ratio", "min_mode_ratio", ".2f"),
    ):
        block = [f"| cell | {title}: " + " | ".join(every) + " |", "|---|" + "---:|" * len(every)]
        for cell in cells:
            figs = [_values(rows, cell, rule, key) for rule in every]
            if any(figs):
                block.append(f"| {cell} | " + " | ".join(format(median(f), fmt) if f else "—" for f in figs) + " |")
        lines += ["", *block]
    lines += ["", "| cell | steps picked (per seed): " + " | ".join(rules) + " |", "|---|" + "---:|" * len(rules)]
    for cell in cells:
        lines.append(f"| {cell} | " + " | ".join("/".join(str(int(v)) for v in _values(rows, cell, rule, "step")) for rule in rules) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0,1,2")
    args = parser.parse_args(argv)

    def say(rows: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"{r['rule']} {r.get('step', '')} {r.get('excess_fd', float('nan')):+.4f}" for r in rows if r["rule"] != "checkpoint"
        )

    measure_cell = lambda name, seed: measure(name, seed, args.cache_dir, digit_classifier(args.sets))
    print(table(stored_or_measured(args, parser, measure_cell, say)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
