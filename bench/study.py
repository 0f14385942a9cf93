"""What the study scripts of bench/ share (base_choice, gmm_fit_data, eval_noise): their flags, and the loop over
cells and seeds that writes every figure to --json after each cell and seed, so that a killed study keeps what it
measured.

    parser = study_parser(__doc__, seeds="0,1")
    args = parser.parse_args(argv)
    results = stored_or_measured(args, parser, lambda cell, seed: [...], lambda rows: "excess FD ...")

A study measures on one torch thread (`measure_all` sets it), so two of them can share the 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

#: a study's figures: one dict per measurement
Rows = list[dict[str, Any]]
#: measure(cell, seed) -> its rows
Measure = Callable[[str, int], Rows]
#: say(rows) -> the progress line's summary of them
Say = Callable[[Rows], str]


def study_parser(doc: str, seeds: str) -> argparse.ArgumentParser:
    """--sets, --seeds (default `seeds`), --cache-dir, --json and --rerender, described by the first paragraph of `doc`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument(
        "--sets", default="", help="comma-separated cells of the suite (python -m bench --help lists them); required unless --rerender"
    )
    parser.add_argument("--seeds", default=seeds, help="comma-separated seeds")
    parser.add_argument("--cache-dir", default="runs/bench_prior", help="where the digits VAEs are trained once")
    parser.add_argument("--json", dest="json_out", default=None, help="write every figure here")
    parser.add_argument("--rerender", default=None, help="measure nothing: print the tables of these comma-separated --json files")
    return parser


def stored(args: argparse.Namespace) -> Rows | None:
    """The results of the --rerender files, one list, or None without --rerender."""
    if not args.rerender:
        return None
    return [r for path in args.rerender.split(",") for r in json.loads(Path(path).read_text())]


@functools.cache
def digit_classifier(sets: str) -> Any:
    """The suite's digit classifier (bench.digits, seed 0, in eval mode) when --sets names a digits cell, else None;
    trained once per process."""
    if "digits" not in sets:
        return None
    from bench.digits import load_digits_split, train_digit_classifier

    return train_digit_classifier(load_digits_split(), seed=0).eval()


def stored_or_measured(args: argparse.Namespace, parser: argparse.ArgumentParser, measure: Measure, say: Say) -> Rows:
    """The results of the --rerender files (`stored`), or without --rerender those of `measure_all`."""
    results = stored(args)
    return measure_all(args, parser, measure, say) if results is None else results


def measure_all(args: argparse.Namespace, parser: argparse.ArgumentParser, measure: Measure, say: Say) -> Rows:
    """measure(cell, seed) for every cell of --sets and seed of --seeds, in order, on one torch thread; after each, a
    progress line (seconds, cell, seed, `say` of its results) on stderr and every result so far to --json."""
    import torch

    if not args.sets:
        parser.error("--sets is required (or --rerender FILE)")
    torch.set_num_threads(1)
    results: Rows = []
    for name in args.sets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            new = measure(name, seed)
            results += new
            print(f"[{time.perf_counter() - start:6.1f} s] {name} seed {seed}: {say(new)}", file=sys.stderr, flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(results, indent=1, default=str))
    return results
