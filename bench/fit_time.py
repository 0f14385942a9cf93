"""How long a default fit takes on a machine doing nothing else: the goal "a default fit on ≤ 2,000 latents of ≤ 64
dimensions takes ≤ 2 minutes on 2 cores", which the suite's `--jobs 2` runs cannot judge (two cells share the cores,
so their fit times are upper bounds and the page marks the goal N/A).

One default fit per cell and seed (`bench.fits.fit_evalp`, the fit the suite times: FitConfig defaults and the seed),
one after another, each on the thread count a default fit takes (`latent_prior.threads`: one, unless OMP_NUM_THREADS
is set), with the 1-minute load average before and after each. Run nothing else beside it: the load is recorded so
that a reader can see whether it was alone.

    python -m bench.fit_time --sets digits-d8-b1,digits-d64-b0.01 --cache-dir /tmp/bench/cache --json /tmp/bench/ft.json
    python -m bench.fit_time --flat --cache-dir /tmp/bench/cache --into bench/results/suite.json   # every flat cell

--into records the measurement in a suite JSON (its "fit_time" key; a cell measured again replaces its figure) and
rerenders docs/benchmarks.md from it: the goal's row then takes its verdict from this measurement. `--rerender
FILE --into SUITE` records a --json written earlier without measuring again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import load_set
from bench.fits import fit_evalp
from bench.run import (
    CELLS,
    FIT_TIME_LIMIT_S,
    FIT_TIME_MAX_DIMS,
    FIT_TIME_MAX_LATENTS,
    SPATIAL_CELLS,
    _read_run,
    code_version,
    evaluate_targets,
    rerender,
    save_json,
)
from bench.study import study_parser
from latent_prior.errors import LatentPriorError


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def measure(name: str, seed: int, cache_dir: str) -> dict[str, Any]:
    """One default fit of cell `name` with `seed`: {"cell", "seed", "dims", "n_train", "seconds" (wall, the fit
    alone: loading the set is not timed), "selected_step", "load_before", "load_after"}."""
    lset = load_set(name, cache_dir=cache_dir, seed=seed, verbose=False)
    dims = math.prod(lset.latent_shape)
    n_train = int(lset.train_mean.shape[0])
    if dims > FIT_TIME_MAX_DIMS or n_train > FIT_TIME_MAX_LATENTS:
        raise LatentPriorError(
            f"--sets {name}: {n_train} latents of {dims} dims lie outside the goal (≤ {FIT_TIME_MAX_LATENTS} latents, "
            f"≤ {FIT_TIME_MAX_DIMS} dims); choose flat cells."
        )
    load_before = _load()
    with tempfile.TemporaryDirectory() as work, contextlib.redirect_stdout(sys.stderr):  # the fit's summary: not the table's
        _, seconds, summary = fit_evalp(lset, Path(work), f"seed{seed}", {"seed": seed})
    return {
        "cell": name,
        "seed": seed,
        "dims": dims,
        "n_train": n_train,
        "seconds": seconds,
        "selected_step": summary.get("selected_step"),
        "load_before": load_before,
        "load_after": _load(),
    }


def table(record: dict[str, Any]) -> str:
    """One row per cell and seed: latents, fit seconds, selected step, load before / after, verdict."""
    lines = [
        f"{record['threads']} torch thread(s) on {record['cpu_count']} CPUs, {record['code']}, {record['date']}",
        "",
        f"| cell | seed | latents | fit s | selected step | 1-min load before / after | ≤ {FIT_TIME_LIMIT_S:g} s |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for r in record["rows"]:
        verdict = "PASS" if r["seconds"] <= FIT_TIME_LIMIT_S else "**MISS**"
        lines.append(
            f"| {r['cell']} | {r['seed']} | {r['dims']}, {r['n_train']} | {r['seconds']:.1f} | {r['selected_step']} | "
            f"{r['load_before']} / {r['load_after']} | {verdict} |"
        )
    return "\n".join(lines)


def record_into(suite_json: Path, record: dict[str, Any]) -> None:
    """Store `record` under the suite JSON's "fit_time" key; rows of a cell and seed measured again replace the old."""
    result = _read_run(suite_json)  # a suite JSON, or a LatentPriorError naming the file: nothing else is rewritten
    old = result.get("fit_time", {"runs": []})
    new_keys = {(r["cell"], r["seed"]) for r in record["rows"]}
    runs = []
    for run in old["runs"]:
        kept = [r for r in run["rows"] if (r["cell"], r["seed"]) not in new_keys]
        if kept:
            runs.append({**run, "rows": kept})
    result["fit_time"] = {"runs": [*runs, record]}
    result["targets"] = evaluate_targets(result)
    save_json(result, suite_json)


def _read_record(path: Path) -> dict[str, Any]:
    """A --json that this script wrote, or an error naming the file."""
    try:
        record = json.loads(path.read_text())
        record["rows"], record["command"], record["code"], record["threads"]  # noqa: B018 - the keys the page needs
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LatentPriorError(f"--rerender {path}: not a readable --json of bench.fit_time ({exc}).") from None
    return record


def flat_cells() -> list[str]:
    """The suite's cells the goal covers: the flat digits and synthetic sets."""
    return [name for name in CELLS if name not in SPATIAL_CELLS]


def main(argv: list[str] | None = None) -> int:
    parser = study_parser(__doc__, seeds="0")
    parser.add_argument("--flat", action="store_true", help="every flat cell of the suite (instead of --sets)")
    parser.add_argument("--into", default=None, help="record the figures in this suite JSON and rerender its page from it")
    parser.add_argument("--out", default=None, help="with --into: the page to rewrite (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    names: list[str] = []
    if not args.rerender:
        names = flat_cells() if args.flat else [n for n in args.sets.split(",") if n]
        if not names:
            parser.error("pass --sets or --flat (or --rerender FILE)")
        unknown = [n for n in names if n not in CELLS]
        if unknown:
            parser.error(f"--sets: unknown cells {', '.join(unknown)}; python -m bench --help lists them")
        spatial = [n for n in names if n in SPATIAL_CELLS]
        if spatial:  # refused before their VAEs are trained: the goal covers flat latents of ≤ 64 dims
            parser.error(
                f"--sets: {', '.join(spatial)} are spatial cells, outside the goal (≤ {FIT_TIME_MAX_DIMS} dims); choose flat cells"
            )
    try:
        records = [_read_record(Path(path)) for path in args.rerender.split(",")] if args.rerender else [time_fits(args, names, argv)]
        for record in records:
            print(table(record))
            if args.into:
                record_into(Path(args.into), record)
        return rerender(Path(args.into), Path(args.out) if args.out else None) if args.into else 0
    except LatentPriorError as exc:
        print(f"python -m bench.fit_time: error: {exc}", file=sys.stderr)
        return 2


def time_fits(args: Any, names: list[str], argv: list[str] | None) -> dict[str, Any]:
    """`measure` every cell of `names` and seed of --seeds, one at a time; the record so far goes to --json after each."""
    from latent_prior.threads import policy_threads

    record: dict[str, Any] = {
        "command": "python -m bench.fit_time " + " ".join(argv if argv is not None else sys.argv[1:]),
        "code": code_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "threads": policy_threads(None),  # what a default fit runs on (latent_prior.threads)
        "cpu_count": os.cpu_count(),
        "rows": [],
    }
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            row = measure(name, seed, args.cache_dir)
            record["rows"].append(row)
            print(
                f"[fit_time] {name} seed {seed}: {row['seconds']:.1f} s (load {row['load_before']} / {row['load_after']})", file=sys.stderr
            )
            if args.json_out:
                save_json(record, Path(args.json_out))
    return record


if __name__ == "__main__":
    raise SystemExit(main())
