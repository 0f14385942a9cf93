"""Does the subspace flow lose quality when its principal basis is low-rank (the form it takes above 4096 dims)?

Above `PrincipalBasis.DENSE_MAX_DIMS` the basis keeps `LOW_RANK_AXES` leading principal axes, and its trailing axes are
latent pixels orthogonalized against them rather than principal axes. No suite cell is that large, so this study shrinks
the scale: on a cell's latents it fits the subspace flow twice per seed with the same flags (`--flow-subspace-dims`,
FitConfig defaults otherwise, `--steps` long), once on a dense basis and once on a low-rank basis that keeps `--axes`
leading axes, and scores both with the suite's latent metrics (`evaluate.latent_report`, 3,000 samples, 3 evaluations):
excess FD, k-NN precision and recall, held-out gain.

    python -m bench.lowrank_basis --sets default-vae --seeds 0,1 --subspace-dims 64 --axes 128 --json /tmp/lowrank.json

Prints one row per cell, seed and basis, and writes every figure to --json.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import load_set
from bench.fits import fit_evalp
from bench.run import _memory_source
from bench.study import stored_or_measured, study_parser
from latent_prior.evaluate import latent_report
from latent_prior.flows import PrincipalBasis

SAMPLES = 3000
EVALUATIONS = 3


def measure(name: str, seed: int, cache_dir: str, subspace_dims: int, axes: int, steps: int) -> list[dict[str, Any]]:
    """[{"cell", "seed", "basis", "fit_seconds", "selected_step", "excess_fd", "excess_fd_se", "precision", "recall",
    "heldout_gain_nats"}] for the dense and the low-rank basis."""
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    source, train, heldout = _memory_source(lset)
    overrides = {"seed": seed, "flow_kind": "subspace", "flow_subspace_dims": subspace_dims, "steps": steps, "warmup_steps": steps // 2}
    rows = []
    for basis, dense_max in (("dense", PrincipalBasis.DENSE_MAX_DIMS), (f"low-rank, {axes} axes", axes)):
        saved = PrincipalBasis.DENSE_MAX_DIMS, PrincipalBasis.LOW_RANK_AXES
        PrincipalBasis.DENSE_MAX_DIMS, PrincipalBasis.LOW_RANK_AXES = dense_max, axes
        try:
            with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(sys.stderr):
                prior, seconds, summary = fit_evalp(lset, Path(work), f"seed{seed}", overrides)
                report = latent_report(
                    prior, source, heldout, train, samples=SAMPLES, seed=seed, methods=["evalp"], evaluations=EVALUATIONS
                )
        finally:
            PrincipalBasis.DENSE_MAX_DIMS, PrincipalBasis.LOW_RANK_AXES = saved
        row = report["rows"][0]
        rows.append(
            {
                "cell": name,
                "seed": seed,
                "basis": basis,
                "basis_axes": prior.flow.basis_axes,
                "fit_seconds": seconds,
                "selected_step": summary.get("selected_step"),
                "heldout_gain_nats": report["elbo_gain"]["gain_nats"],
                **{k: row.get(k) for k in ("excess_fd", "excess_fd_se", "precision", "recall")},
            }
        )
    return rows


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| cell | seed | basis | selected step | excess FD (± s.e.) | precision | recall | held-out gain (nats) | fit s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        gain = r.get("heldout_gain_nats")
        lines.append(
            f"| {r['cell']} | {r['seed']} | {r['basis']} | {r['selected_step']} | {r['excess_fd']:+.4f} ± "
            f"{r['excess_fd_se']:.4f} | {r['precision']:.3f} | {r['recall']:.3f} | "
            f"{'—' if gain is None else f'{gain:+.2f}'} | {r['fit_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0,1")
    parser.add_argument("--subspace-dims", type=int, default=64, help="the flow's leading axes (--flow-subspace-dims)")
    parser.add_argument("--axes", type=int, default=128, help="leading axes of the low-rank basis (at least --subspace-dims)")
    parser.add_argument("--steps", type=int, default=500, help="fit steps, half of them warm-up")
    args = parser.parse_args(argv)
    measure_cell = lambda name, seed: measure(name, seed, args.cache_dir, args.subspace_dims, args.axes, args.steps)
    results = stored_or_measured(args, parser, measure_cell, lambda rows: ", ".join(f"{r['basis']}: {r['excess_fd']:+.4f}" for r in rows))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
