"""Benchmark: how good is the EVaLP prior? Against N(0, I) and a full-covariance GMM, on latents with
a known density and on real VAE latents.

    python bench/prior.py                                  # every set and method, default settings
    python -m bench.prior --quick --sets mixture           # a smoke run (about 15 s)
    python bench/prior.py --sets digits-b0.1 --methods gaussian,gmm,evalp \\
        --variants "fkl1:forward_kl_weight=1.0" "big:flow_blocks=12,flow_hidden=256"

Methods (all in the VAE's normalized latent space):
  gaussian    N(0, I), the VAE's own prior
  gmm         10-component full-covariance GMM fitted on posterior DRAWS (several per item when the
              items are few for the dimension), not on the means
  evalp       `latent_prior.train.fit` with the default config, samples from its sampler flow
  evalp-sir   the same prior, sampling-importance-resampling with M = 100 proposals
  langevin    the same energy, short-run Langevin, 60 steps of s = 0.4 from N(0, I) (LEBM)
  evalp-code  `fit(objective="evalp-code")` (the authors' WGAN-GP recipe), its sampler
  evalp[L]    one row per `--variants L:key=value,...`: a fit with those FitConfig overrides (its sampler;
              `--variant-sampling sampler,sir,langevin` adds rows for the other ways to sample it)

Columns, each against posterior draws of the HELD-OUT items (never seen by any fit):
  excess FD   FD(samples, held-out draws) − FD(train-posterior draws, held-out draws); 0 = as close as
              the training latents themselves (the floor). Mean ± sd over `--repeats` independent sample
              sets: one estimate from 3000 samples varies by ~0.005-0.015 on the 8-D sets, more than
              the gaps between good methods, so single draws must not be compared
  MMD²        unbiased RBF MMD², one bandwidth per set (median heuristic on train vs held-out draws)
  prec / rec  k-NN (k = 3) precision and recall, one draw per held-out item against as many samples,
              averaged over disjoint repeats
  log p_true  mean true log-density of the samples under the aggregate posterior (synthetic sets); the
              held-out row is the target: above it means samples piled onto the modes (low recall)
  conf        the digit classifier's mean max-softmax on decoded samples (digits VAEs)
  samples/s   one batch of `--timing-batch`, after a warm-up call, same device and threads for all
  fit s       wall seconds of the fit (shared by the rows that use the same fit)

Reference rows: "train posteriors" (draws of the training posteriors, the floor) and "held-out
posteriors" (decoded held-out draws: the confidence a perfect prior could reach).

The goals at the bottom are computed from the tables; a comparison "A ≤ B" that fails strictly but
holds within the measured noise is reported as such, never silently as a PASS.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python bench/prior.py`: make `bench` and `latent_prior` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.datasets import ALL_SETS, DIGITS_SETS, LatentSet, load_set
from latent_prior.baselines import GaussianPrior, GMMPrior
from latent_prior.config import add_arguments, from_dict, resolve, to_dict
from latent_prior.errors import LatentPriorError
from latent_prior.metrics import frechet_distance, median_bandwidth, mmd_rbf, precision_recall_knn

METHODS: dict[str, str] = {
    "gaussian": "N(0, I)",
    "gmm": "GMM (10, full cov, on posterior draws)",
    "evalp": "EVaLP sampler",
    "evalp-sir": "EVaLP + SIR (M=100)",
    "langevin": "Langevin (60, s=0.4) on EVaLP energy",
    "evalp-code": "evalp-code preset (sampler)",
}
# digits first: their tables (and the goals that need them) arrive before the slow spatial sets
DEFAULT_SETS = "digits-b1,digits-b0.1,mixture,ring,default-vae,spatial"
DEFAULT_METHODS = ",".join(METHODS)
DIGITS_GOAL_SETS = tuple(DIGITS_SETS)  # the "both digits VAEs" of the goals
FIT_TIME_GOAL_SETS = (*DIGITS_SETS, "default-vae")
FIT_TIME_LIMIT_S = 120.0
SPEEDUP_GOAL = 30.0

#: --quick: FitConfig fields for a smoke run (a few seconds per fit).
QUICK_FIT = dict(steps=120, batch_size=128, checkpoint_every=60, eval_samples=512, eval_latents=512, log_z_samples=2048)
QUICK_SPATIAL_STEPS = 40  # --quick on C×H×W sets (unless --steps is given)


@dataclass
class BenchConfig:
    """`python bench/prior.py`: one run, one table per latent set."""

    sets: str = field(default=DEFAULT_SETS, metadata={"help": "comma-separated latent sets, from "
            f"{', '.join(ALL_SETS)} (photos, 32-px crops of the bundled photos with a small AutoencoderKL trained on "
            "demand, is not in the default list: it adds ~20 minutes on 2 cores)"})
    methods: str = field(default=DEFAULT_METHODS, metadata={"help": f"comma-separated methods, from {', '.join(METHODS)}"})
    variants: tuple[str, ...] = field(default=(), metadata={"help": "extra EVaLP fits, each LABEL:key=value,key=value "
            "of FitConfig fields (a row 'evalp[LABEL]', sampler)"})
    variant_sampling: str = field(default="sampler", metadata={"help": "how each variant is sampled, one row each: "
            "comma-separated from sampler, sir, langevin, each optionally @T for a temperature (e.g. sampler@0.9)"})
    fit: tuple[str, ...] = field(default=(), metadata={"help": "FitConfig overrides key=value applied to every EVaLP "
            "fit (evalp, evalp-code and variants)"})
    steps: int | None = field(default=None, metadata={"help": "training steps of every EVaLP fit (FitConfig default "
            "when left out; 120 with --quick)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic sets, the fits, the draws and the samples"})
    quick: bool = field(default=False, metadata={"help": "smoke run: small sets, short fits, few samples (about 15 s "
            "per flat set, 2-3 min per 4x8x8 set on one free core)"})
    samples: int | None = field(default=None, metadata={"help": "samples per method for the metrics (3000; 600 with --quick)"})
    repeats: int | None = field(default=None, metadata={"help": "independent sample sets per method (5; 2 with "
            "--quick): the table shows their mean and the excess FD's spread, since one 3000-sample FD estimate "
            "varies by about 0.01 on the 8-D sets"})
    repeat_budget: float = field(default=120.0, metadata={"help": "seconds of sampling per method after which no "
            "further repeat is started (SIR and Langevin on 4x8x8 sets get one)"})
    timing_batch: int | None = field(default=None, metadata={"help": "batch size of the samples/s measurement (500; 200 with --quick)"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads; when left out, 2 (the goals are "
            "stated for 2 cores), or 1 when the load average leaves less than 1.5 cores free: two OpenMP threads "
            "stall when one of them is descheduled"})
    cache_dir: str = field(default="runs/bench_prior", metadata={"help": "folder where the VAEs trained on demand "
            "(digits, photos) are kept between runs"})
    vae_epochs: int | None = field(default=None, metadata={"help": "epochs of the flat digits VAEs (300; 40 with "
            "--quick); the photo VAE's are fixed in bench/datasets.py"})
    out: str = field(default="bench/results/prior.md", metadata={"help": "markdown report; the same results go to the .json beside it"})
    rerender: str | None = field(default=None, metadata={"help": "measure nothing: rebuild the report and goals of an "
            "earlier run from its .json (written to --out)"})


# ---------------------------------------------------------------------------------------------------
# the priors under test, behind one callable: n, generator -> NORMALIZED latents (n, *shape)


@dataclass
class Candidate:
    name: str  # row label
    draw: Callable[[int, torch.Generator], torch.Tensor]
    fit_seconds: float
    fit_key: str | None = None  # rows sharing a fit
    info: dict[str, Any] = field(default_factory=dict)


def _parse_overrides(items: Any, what: str) -> dict[str, Any]:
    """["k=v", "k2=v2"] or "k=v,k2=v2" -> {k: typed v}, checked against FitConfig's fields."""
    from latent_prior.fit_config import FitConfig

    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise LatentPriorError(f"{what} {item!r}: write key=value with a FitConfig field as key, e.g. forward_kl_weight=1.0.")
        if key in ("latents", "out"):
            raise LatentPriorError(f"{what} {item!r}: the benchmark sets `{key}` itself; drop it.")
        out[key] = _parse_value(value.strip(), fields[key].default, what, item)
    return out


def _parse_value(text: str, default: Any, what: str, item: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    if isinstance(default, bool) or text.lower() in ("true", "false"):
        if text.lower() not in ("true", "false"):
            raise LatentPriorError(f"{what} {item!r}: pass true or false.")
        return text.lower() == "true"
    if isinstance(default, tuple):
        return tuple(float(v) for v in text.split("/"))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_variants(variants: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for spec in variants:
        label, sep, rest = spec.partition(":")
        if not sep or not label.strip():
            raise LatentPriorError(f"--variants {spec!r}: write LABEL:key=value,key=value, e.g. fkl1:forward_kl_weight=1.0.")
        out[label.strip()] = _parse_overrides(rest, f"--variants {label.strip()}:")
    return out


def fit_evalp(lset: LatentSet, workdir: Path, key: str, overrides: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
    """Fit an EVaLP prior on the training moments (fresh posterior draws each step); (prior, seconds, summary)."""
    from latent_prior.train import fit

    path = workdir / f"{lset.name}-train.safetensors"
    if not path.exists():
        lset.save_train(path)
    start = time.perf_counter()
    prior = fit(str(path), out=str(workdir / f"fit-{key}"), quiet=True, **overrides)
    seconds = time.perf_counter() - start
    summary = dict(prior.training_info.get("summary", {}))
    return prior, seconds, summary


def _prior_drawer(prior: Any, method: str, **options: Any) -> Callable[[int, torch.Generator], torch.Tensor]:
    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        raw = prior.sample(n, method=method, generator=generator, **options)
        return prior.normalization.normalize(raw)

    return draw


SAMPLING_OPTIONS: dict[str, dict[str, Any]] = {"sampler": {}, "sir": {"proposals": 100}, "langevin": {"steps": 60, "step_size": 0.4}}


def _parse_sampling(spec: str) -> tuple[str, float]:
    """"sir" -> ("sir", 1.0); "sampler@0.9" -> ("sampler", 0.9)."""
    how, _, temp = spec.strip().partition("@")
    try:
        temperature = float(temp) if temp else 1.0
    except ValueError:
        temperature = float("nan")
    if how not in SAMPLING_OPTIONS or not (math.isfinite(temperature) and temperature > 0):
        raise LatentPriorError(f"--variant-sampling {spec!r}: use one of {', '.join(SAMPLING_OPTIONS)}, optionally @T "
                "with T > 0 (e.g. sampler@0.9).")
    return how, temperature


def build_candidates(lset: LatentSet, methods: list[str], variants: dict[str, dict[str, Any]], fit_overrides: dict[str, Any],
                     workdir: Path, seed: int, log: Callable[[str], None],
                     variant_sampling: tuple[str, ...] = ("sampler",)) -> list[Candidate]:
    """Fit every prior that the requested methods need (each EVaLP fit once) and wrap them as candidates."""
    out: list[Candidate] = []
    g = torch.Generator().manual_seed(seed)
    if "gaussian" in methods:
        gauss = GaussianPrior().fit(lset.draws("train", 2, g))
        out.append(Candidate(METHODS["gaussian"], lambda n, gen: gauss.sample(n, generator=gen), 0.0))
    if "gmm" in methods:
        # Several draws per item when N/K < 2D, so no component is singular.
        k, n_items = 10, len(lset.train_mean)
        per_item = min(16, max(1, math.ceil(2 * k * lset.dims / n_items)))
        draws = lset.draws_per_item("train", per_item, g)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gmm = GMMPrior(n_components=k, covariance="full", seed=seed).fit(draws)
        seconds = time.perf_counter() - start
        for w in caught:
            log(f"  GMM warning: {w.message}")
        out.append(Candidate(METHODS["gmm"], lambda n, gen: gmm.sample(n, generator=gen), seconds,
                             info={"draws_per_item": per_item, "em_iterations": gmm.n_iter_, "converged": gmm.converged_}))
    fits: dict[str, tuple[Any, float, dict[str, Any]]] = {}

    def get_fit(key: str, overrides: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
        if key not in fits:
            log(f"  fitting {key} ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'}) ...")
            fits[key] = fit_evalp(lset, workdir, key, {"seed": seed, **overrides})
            prior, seconds, summary = fits[key]
            log(f"  {key}: {seconds:.1f} s, {summary.get('steps')} steps, selected step {summary.get('selected_step')}, "
                f"log Ẑ {summary.get('log_z', float('nan')):.3f} (ESS {100 * summary.get('log_z_ess_fraction', float('nan')):.1f}%), "
                f"held-out gain {summary.get('heldout_gain_nats', float('nan')):+.3f} nats")
        return fits[key]

    for method, how in (("evalp", "sampler"), ("evalp-sir", "sir"), ("langevin", "langevin")):
        if method in methods:
            prior, seconds, summary = get_fit("evalp", fit_overrides)
            out.append(Candidate(METHODS[method], _prior_drawer(prior, how, **SAMPLING_OPTIONS[how]), seconds, "evalp", {"fit": summary}))
    if "evalp-code" in methods:
        prior, seconds, summary = get_fit("evalp-code", {**fit_overrides, "objective": "evalp-code"})
        out.append(Candidate(METHODS["evalp-code"], _prior_drawer(prior, "sampler"), seconds, "evalp-code", {"fit": summary}))
    for label, overrides in variants.items():
        prior, seconds, summary = get_fit(f"variant-{label}", {**fit_overrides, **overrides})
        for spec in variant_sampling:
            how, temperature = _parse_sampling(spec)
            suffix = {"sampler": "", "sir": " + SIR", "langevin": " + Langevin"}[how]
            suffix += f" @T={temperature:g}" if temperature != 1.0 else ""
            out.append(Candidate(f"evalp[{label}]{suffix}",
                                 _prior_drawer(prior, how, temperature=temperature, **SAMPLING_OPTIONS[how]), seconds,
                                 f"variant-{label}", {"fit": summary, "overrides": overrides, "temperature": temperature}))
    return out


# ---------------------------------------------------------------------------------------------------
# measuring


def samples_per_second(draw: Callable[[int, torch.Generator], torch.Tensor], batch: int, seed: int, min_seconds: float) -> float:
    """Throughput of `draw` at a fixed batch: one warm-up call, then calls until min_seconds have passed."""
    g = torch.Generator().manual_seed(seed)
    draw(batch, g)  # warm-up: allocations, lazy init, caches
    calls, start = 0, time.perf_counter()
    while True:
        draw(batch, g)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return batch * calls / elapsed


@dataclass
class Judge:
    """Everything a set's rows are compared with, drawn once per set."""

    heldout: torch.Tensor  # (R·N_h, *shape) normalized, draw r of every held-out item in rows [r·N_h, (r+1)·N_h)
    n_heldout: int
    reference: torch.Tensor  # train-posterior draws, as many as the samples
    fd_floor: float
    fd_floor_noise: float  # spread of the floor over independent train-posterior draw sets (items reused, so small)
    bandwidth: float
    classifier: Any = None


def make_judge(lset: LatentSet, n_samples: int, seed: int, classifier: Any) -> Judge:
    g = torch.Generator().manual_seed(seed + 101)
    n_h = len(lset.heldout_mean)
    repeats = max(1, round(n_samples / n_h))
    heldout = lset.draws_per_item("heldout", repeats, g)
    reference = lset.draws("train", n_samples, g)
    floor = frechet_distance(reference, heldout)
    # The floor's own noise: excess FD of other independent train-posterior draw sets (their spread).
    others = [frechet_distance(lset.draws("train", n_samples, g), heldout) - floor for _ in range(4)]
    noise = float(torch.tensor([0.0, *others]).std().item())
    bandwidth = median_bandwidth(reference, heldout)
    return Judge(heldout, n_h, reference, floor, noise, bandwidth, classifier)


def evaluate_samples(z: torch.Tensor, lset: LatentSet, judge: Judge) -> dict[str, float]:
    """Metrics of normalized samples z (n, *shape) against the held-out draws."""
    row: dict[str, float] = {}
    row["excess_fd"] = frechet_distance(z, judge.heldout) - judge.fd_floor
    row["mmd2"] = mmd_rbf(z, judge.heldout, bandwidth=judge.bandwidth)
    n_h = judge.n_heldout
    repeats = min(len(judge.heldout) // n_h, len(z) // n_h)
    precisions, recalls = [], []
    for r in range(max(1, repeats)):
        real = judge.heldout[r * n_h:(r + 1) * n_h]
        fake = z[r * n_h:(r + 1) * n_h]
        pr = precision_recall_knn(real, fake, k=3)
        precisions.append(pr.precision)
        recalls.append(pr.recall)
    row["precision"], row["recall"] = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if lset.true_log_prob is not None:
        row["log_p_true"] = lset.true_log_prob(z).mean().item()
    if lset.decode is not None and judge.classifier is not None:
        from bench.digits import classifier_confidence

        images = lset.decode(lset.normalization.denormalize(z))
        row["confidence"] = classifier_confidence(judge.classifier, images)
        # its standard error, for the within-noise comparisons of the goals
        with torch.no_grad():
            conf = torch.softmax(judge.classifier(images), 1).amax(1)
        row["confidence_se"] = (conf.std() / math.sqrt(len(conf))).item()
    return row


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def measure_candidate(cand: Candidate, lset: LatentSet, judge: Judge, n_samples: int, repeats: int, budget_s: float,
                      seed: int) -> dict[str, Any]:
    """Metrics averaged over up to `repeats` independent sample sets of `n_samples` (each seeded from the
    method's name, so a method's samples do not depend on which other methods run). A repeat is not
    started once the sampling time so far plus one more set would pass `budget_s`; at least one runs.
    Adds `repeats`, `excess_fd_sd` (spread of one estimate; NaN with one repeat) and `sampling_seconds`."""
    import zlib

    base = seed * 1_000_003 + zlib.crc32(cand.name.encode())
    per_repeat: list[dict[str, float]] = []
    spent = 0.0
    for r in range(repeats):
        start = time.perf_counter()
        z = cand.draw(n_samples, torch.Generator().manual_seed(base + r))
        spent += time.perf_counter() - start
        per_repeat.append(evaluate_samples(z, lset, judge))
        if spent / (r + 1) + spent > budget_s:
            break
    row: dict[str, Any] = {k: _mean([m[k] for m in per_repeat]) for k in per_repeat[0]}
    if "confidence_se" in row:  # standard error of the mean over all repeats' samples
        row["confidence_se"] /= math.sqrt(len(per_repeat))
    fds = torch.tensor([m["excess_fd"] for m in per_repeat], dtype=torch.float64)
    row["excess_fd_sd"] = fds.std().item() if len(fds) > 1 else float("nan")
    row["repeats"] = len(per_repeat)
    row["sampling_seconds"] = spent / len(per_repeat)
    row["per_repeat_excess_fd"] = fds.tolist()
    return row


def typical_fd_sd(rows: list[dict[str, Any]]) -> float:
    """Spread of one excess-FD estimate: the median over the methods measured more than once (the median,
    because a method far from the data, like a collapsed sampler, has a much larger spread)."""
    sds = sorted(r["excess_fd_sd"] for r in rows if r.get("repeats", 0) > 1 and math.isfinite(r.get("excess_fd_sd", float("nan"))))
    return sds[len(sds) // 2] if sds else float("nan")


def run_set(lset: LatentSet, cfg: BenchConfig, methods: list[str], variants: dict[str, dict[str, Any]],
            fit_overrides: dict[str, Any], classifier: Any, log: Callable[[str], None]) -> dict[str, Any]:
    spatial_quick = cfg.quick and lset.dims >= 64  # conv energies and SIR are ~100× dearer per sample there
    n_samples = cfg.samples or (300 if spatial_quick else 600 if cfg.quick else 3000)
    batch = cfg.timing_batch or (50 if spatial_quick else 200 if cfg.quick else 500)
    if spatial_quick and cfg.steps is None:
        fit_overrides = {**fit_overrides, "steps": QUICK_SPATIAL_STEPS, "checkpoint_every": QUICK_SPATIAL_STEPS // 2}
    min_seconds = 0.2 if cfg.quick else 1.0
    repeats = cfg.repeats or (2 if cfg.quick else 5)
    set_start = time.perf_counter()
    judge = make_judge(lset, n_samples, cfg.seed, classifier)
    rows: list[dict[str, Any]] = []

    reference_row = {"method": "train posteriors (floor)", "reference": True, **evaluate_samples(judge.reference, lset, judge)}
    reference_row["excess_fd"] = 0.0  # by definition (it is the floor)
    rows.append(reference_row)
    if lset.true_log_prob is not None or (lset.decode is not None and classifier is not None):
        g = torch.Generator().manual_seed(cfg.seed + 202)
        held = lset.draws("heldout", n_samples, g)
        row: dict[str, Any] = {"method": "held-out posteriors", "reference": True}
        if lset.true_log_prob is not None:
            row["log_p_true"] = lset.true_log_prob(held).mean().item()
        if lset.decode is not None and classifier is not None:
            from bench.digits import classifier_confidence

            row["confidence"] = classifier_confidence(classifier, lset.decode(lset.normalization.denormalize(held)))
        rows.append(row)

    with tempfile.TemporaryDirectory(prefix=f"bench-prior-{lset.name}-") as tmp:
        candidates = build_candidates(lset, methods, variants, fit_overrides, Path(tmp), cfg.seed, log,
                                      tuple(p for p in cfg.variant_sampling.split(",") if p.strip()))
        for i, cand in enumerate(candidates):
            row = {"method": cand.name, "fit_seconds": cand.fit_seconds, "fit_key": cand.fit_key}
            t0 = time.perf_counter()
            try:
                row.update(measure_candidate(cand, lset, judge, n_samples, repeats, cfg.repeat_budget, cfg.seed))
                row["samples_per_second"] = samples_per_second(cand.draw, batch, cfg.seed + 2000 + i, min_seconds)
                log(f"  {cand.name}: excess FD {row['excess_fd']:+.4f} (sd {row['excess_fd_sd']:.4f}, {row['repeats']} sets), "
                    f"{row['samples_per_second']:,.0f} samples/s ({time.perf_counter() - t0:.0f} s)")
            except (LatentPriorError, RuntimeError, ValueError) as exc:  # a broken prior is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {exc}"
                log(f"  {cand.name}: FAILED: {row['error']}")
            row["info"] = cand.info
            rows.append(row)
    return {
        "name": lset.name,
        "description": lset.description,
        "latent_shape": list(lset.latent_shape),
        "n_train": len(lset.train_mean),
        "n_heldout": len(lset.heldout_mean),
        "n_samples": n_samples,
        "repeats": repeats,
        "heldout_draws": len(judge.heldout),
        "timing_batch": batch,
        "fd_floor": judge.fd_floor,
        "fd_floor_noise": judge.fd_floor_noise,
        "fd_noise": typical_fd_sd(rows),
        "mmd_bandwidth": judge.bandwidth,
        "seconds": time.perf_counter() - set_start,
        "info": lset.info,
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------------
# reporting


def fmt(value: Any, kind: str) -> str:
    """One figure as every bench table prints it; kind: fd, mmd, frac, logp, rate or sec ("—" for None/NaN)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if kind == "fd":
        return f"{value:+.4f}" if abs(value) < 10 else f"{value:+.2f}"
    if kind == "mmd":
        return f"{value:.2e}"
    if kind == "frac":
        return f"{value:.3f}"
    if kind == "logp":
        return f"{value:.3f}"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "sec":
        return f"{value:.1f}"
    return str(value)


def markdown_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    has_logp = any("log_p_true" in r for r in rows)
    has_conf = any("confidence" in r for r in rows)
    cols = [("method", "method", "text"), ("excess FD", "excess_fd", "fd"), ("MMD²", "mmd2", "mmd"),
            ("prec", "precision", "frac"), ("rec", "recall", "frac")]
    if has_logp:
        cols.append(("log p_true", "log_p_true", "logp"))
    if has_conf:
        cols.append(("conf", "confidence", "frac"))
    cols += [("samples/s", "samples_per_second", "rate"), ("fit s", "fit_seconds", "sec")]
    lines = [
        f"### {result['name']}: {result['description']}",
        "",
        f"latent shape {tuple(result['latent_shape'])}; {result['n_samples']} samples per method vs "
        f"{result['heldout_draws']} held-out posterior draws; FD floor {result['fd_floor']:.4f}; one excess-FD estimate "
        f"varies by sd {result['fd_noise']:.4f} between sample sets (median over methods; rows show the mean ± sd "
        f"of their sets, up to {result['repeats']} per method); MMD bandwidth {result['mmd_bandwidth']:.3f}; "
        f"samples/s at batch {result['timing_batch']}; set done in {result['seconds']:.0f} s",
        "",
        "| " + " | ".join(c[0] for c in cols) + " |",
        "|" + "|".join("---" if c[2] == "text" else "---:" for c in cols) + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error'][:120]} |" + " |" * (len(cols) - 2))
            continue
        cells = []
        for _, key, kind in cols:
            v = r.get(key)
            cell = f"*{v}*" if kind == "text" and r.get("reference") else fmt(v, kind)
            if key == "excess_fd" and r.get("repeats", 1) > 1:
                cell += f" ± {r['excess_fd_sd']:.4f}"
            elif key == "excess_fd" and r.get("repeats") == 1:
                cell += " (1 set)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row(result: dict[str, Any], method_key: str) -> dict[str, Any] | None:
    for r in result["rows"]:
        if r["method"] == METHODS.get(method_key, method_key) and "error" not in r:
            return r
    return None


def compare(a: float, b: float, tol: float, smaller_is_better: bool = True) -> str:
    """'pass' when a is at least as good as b, 'noise' when only within tol, else 'miss'."""
    diff = (a - b) if smaller_is_better else (b - a)
    return "pass" if diff <= 0 else "noise" if diff <= tol else "miss"


def _fd_tolerance(res: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> float:
    """Two standard errors of the difference of two rows' mean excess FD (each a mean of its sets); a row
    measured once borrows the set's typical spread."""
    typical = res["fd_noise"] if math.isfinite(res.get("fd_noise", float("nan"))) else res.get("fd_floor_noise", 0.0)

    def var_of_mean(row: dict[str, Any]) -> float:
        sd = row.get("excess_fd_sd", float("nan"))
        sd = sd if row.get("repeats", 1) > 1 and math.isfinite(sd) else typical
        return sd**2 / row.get("repeats", 1)

    return 2.0 * math.sqrt(var_of_mean(a) + var_of_mean(b))


def evaluate_goals(results: list[dict[str, Any]], cfg: BenchConfig, default_settings: bool) -> list[dict[str, Any]]:
    """The goals of docs/prior-development.md, computed from the tables; one dict per goal and set."""
    goals: list[dict[str, Any]] = []
    by_name = {r["name"]: r for r in results}

    def add(goal: str, status: str, detail: str) -> None:
        goals.append({"goal": goal, "status": status, "detail": detail})

    for name in DIGITS_GOAL_SETS:
        res = by_name.get(name)
        ev, ga, gm = (_row(res, k) if res else None for k in ("evalp", "gaussian", "gmm"))
        if ev is None or ga is None or gm is None:
            add(f"{name}: EVaLP excess FD ≤ 1/3 Gaussian's and ≤ GMM's; confidence ≥ GMM's", "n/a",
                "needs the set and the methods evalp, gaussian, gmm")
            continue
        tol = _fd_tolerance(res, ev, gm)
        third = "pass" if ev["excess_fd"] <= ga["excess_fd"] / 3 else "miss"
        add(f"{name}: EVaLP excess FD ≤ 1/3 of Gaussian's", third,
            f"{ev['excess_fd']:+.4f} vs {ga['excess_fd']:+.4f}/3 = {ga['excess_fd'] / 3:+.4f}")
        add(f"{name}: EVaLP excess FD ≤ GMM's", compare(ev["excess_fd"], gm["excess_fd"], tol),
            f"{ev['excess_fd']:+.4f} vs {gm['excess_fd']:+.4f} (2 s.e. of the difference ±{tol:.4f})")
        if "confidence" in ev and "confidence" in gm:
            ctol = 2 * math.hypot(ev.get("confidence_se", 0.0), gm.get("confidence_se", 0.0))
            add(f"{name}: classifier confidence EVaLP ≥ GMM", compare(ev["confidence"], gm["confidence"], ctol, smaller_is_better=False),
                f"{ev['confidence']:.4f} vs {gm['confidence']:.4f} (2 s.e. ±{ctol:.4f})")
    for res in results:
        ev, la = _row(res, "evalp"), _row(res, "langevin")
        if ev is None or la is None:
            continue
        speed = ev["samples_per_second"] / la["samples_per_second"]
        tol = _fd_tolerance(res, ev, la)
        fd = compare(ev["excess_fd"], la["excess_fd"], tol)
        status = "miss" if speed < SPEEDUP_GOAL or fd == "miss" else fd
        add(f"{res['name']}: sampler ≥ {SPEEDUP_GOAL:g}× faster than Langevin(60) at equal or better FD", status,
            f"{speed:.0f}× ({ev['samples_per_second']:,.0f} vs {la['samples_per_second']:,.0f} samples/s); excess FD "
            f"{ev['excess_fd']:+.4f} vs {la['excess_fd']:+.4f} (2 s.e. ±{tol:.4f})")
    for name in FIT_TIME_GOAL_SETS:
        res = by_name.get(name)
        ev = _row(res, "evalp") if res else None
        if ev is None:
            continue
        status = "pass" if ev["fit_seconds"] <= FIT_TIME_LIMIT_S else "miss"
        note = "" if default_settings else " (NOT the default fit settings, so this does not judge the goal)"
        threads = f"{cfg.threads} thread" + ("s" if cfg.threads != 1 else "")
        add(f"{name}: default fit ≤ {FIT_TIME_LIMIT_S:g} s on {threads}", status if default_settings else "n/a",
            f"{ev['fit_seconds']:.1f} s{note}")
    return goals


def goal_lines(goals: list[dict[str, Any]]) -> list[str]:
    label = {"pass": "PASS", "noise": "PASS within noise (fails strictly)", "miss": "MISS", "n/a": "N/A"}
    return [f"{label[g['status']]:>34}  {g['goal']}: {g['detail']}" for g in goals]


def choose_threads(requested: int | None) -> tuple[int, str]:
    """(threads, reason): the requested count, else 2 (1 when the load leaves < 1.5 cores free)."""
    if requested is not None:
        return requested, "--threads"
    cpus = os.cpu_count() or 1
    want = min(2, cpus)
    if want > 1 and hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        if cpus - load < 1.5:
            return 1, f"auto: 1-min load {load:.1f} on {cpus} CPUs leaves < 1.5 cores free, and 2 OpenMP threads then stall"
    return want, "auto"


def code_version() -> str:
    """git HEAD plus a hash of the package's source files (the working tree may hold uncommitted work)."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*root.glob("latent_prior/*.py"), *root.glob("adapters/*.py")]):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return f"git {head or 'unknown'}, sources sha256 {digest.hexdigest()[:12]}"


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "code": code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": [round(x, 2) for x in load] if load else None,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def write_report(path: Path, header: list[str], results: list[dict[str, Any]], goals: list[str], payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(["# EVaLP prior benchmark", "", *header, "", *(markdown_table(r) + "\n" for r in results)])
    if goals:
        text += "\n## Goals\n\n```\n" + "\n".join(goals) + "\n```\n"
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------
# entry point


def _split_list(text: str, allowed: Any, flag: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown or not items:
        raise LatentPriorError(f"{flag} {text!r}: unknown or empty ({', '.join(unknown)}); choose from {', '.join(allowed)}.")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, BenchConfig)
    args = parser.parse_args(argv)
    try:
        cfg = resolve(BenchConfig, args)
        if cfg.rerender:
            return rerender(Path(cfg.rerender), Path(cfg.out))
        return run(cfg, argv if argv is not None else sys.argv[1:])
    except LatentPriorError as exc:
        print(f"bench/prior.py: error: {exc}", file=sys.stderr)
        return 2


def rerender(source: Path, out: Path) -> int:
    """Rebuild tables and goals from a saved .json with this version's reporting (no measurement)."""
    try:
        payload = json.loads(source.read_text())
        results, saved_cfg, machine = payload["sets"], payload["config"], payload["machine"]
    except (OSError, ValueError, KeyError) as exc:
        raise LatentPriorError(f"--rerender {source}: not a readable report .json of bench/prior.py ({exc}).") from None
    cfg = from_dict(BenchConfig, saved_cfg, source=str(source))
    for result in results:
        result["fd_noise"] = typical_fd_sd(result["rows"])
        result.setdefault("repeats", max((r.get("repeats", 1) for r in result["rows"]), default=1))
    goals = evaluate_goals(results, cfg, default_settings=not payload.get("fit_overrides"))
    lines = goal_lines(goals)
    header = [
        f"command: `{payload['command']}`",
        f"machine: {machine['platform']}, {machine['cpu_count']} CPUs visible, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads, python {machine['python']}; load average at start {machine['load_average_start']}",
        f"seed: {cfg.seed}; date {machine['date']}; code {machine.get('code')}; EVaLP fit overrides: "
        f"{payload.get('fit_overrides') or 'none (FitConfig defaults)'}",
        f"total run time {payload.get('total_seconds', float('nan')):.0f} s; load average at end {payload.get('load_average_end')}",
        f"(tables and goals re-rendered from {source.name})",
    ]
    payload.update(goals=goals, sets=results)
    write_report(out, header, results, lines, payload)
    print("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def run(cfg: BenchConfig, argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sets = _split_list(cfg.sets, ALL_SETS, "--sets")
    methods = _split_list(cfg.methods, METHODS, "--methods")
    variants = _parse_variants(cfg.variants)
    for spec in [p for p in cfg.variant_sampling.split(",") if p.strip()] or [""]:  # fail before any work
        _parse_sampling(spec)
    fit_overrides = _parse_overrides(list(cfg.fit), "--fit")
    if cfg.quick:
        fit_overrides = {**QUICK_FIT, **fit_overrides}
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise LatentPriorError(f"--steps {cfg.steps}: pass a positive number of training steps.")
        fit_overrides["steps"] = cfg.steps
    for name, value in (("samples", cfg.samples), ("timing_batch", cfg.timing_batch), ("threads", cfg.threads)):
        if value is not None and value < 1:
            raise LatentPriorError(f"--{name.replace('_', '-')} {value}: pass a positive integer.")
    default_settings = not fit_overrides
    threads, why = choose_threads(cfg.threads)
    cfg = dataclasses.replace(cfg, threads=threads)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)

    machine = machine_info()
    command = " ".join(["python bench/prior.py", *(shlex.quote(a) for a in argv)])
    header = [
        f"command: `{command}`",
        f"machine: {machine['platform']}, {machine['cpu_count']} CPUs visible, torch {machine['torch']} with "
        f"{machine['torch_threads']} threads ({why}), python {machine['python']}; load average at start "
        f"{machine['load_average_start']} (other jobs share the cores: timings are upper bounds)",
        f"seed: {cfg.seed}; date {machine['date']}; code {machine['code']}; EVaLP fit overrides: "
        f"{fit_overrides or 'none (FitConfig defaults)'}",
    ]
    for line in header:
        print(line, flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731

    classifier = None
    if any(s in DIGITS_SETS or s == "default-vae" for s in sets):
        from bench.digits import load_digits_split, train_digit_classifier

        classifier = train_digit_classifier(load_digits_split(), seed=0)
        log(f"digit classifier: held-out accuracy {classifier.heldout_accuracy:.3f}")

    out = Path(cfg.out)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    payload: dict[str, Any] = {"config": to_dict(cfg), "command": command, "machine": machine, "fit_overrides": fit_overrides}
    for name in sets:
        log(f"\n== {name} ==")
        lset = load_set(name, cache_dir=cfg.cache_dir, quick=cfg.quick, seed=cfg.seed, vae_epochs=cfg.vae_epochs)
        result = run_set(lset, cfg, methods, variants, fit_overrides, classifier, log)
        results.append(result)
        table = markdown_table(result)
        print("\n" + table + "\n", flush=True)
        payload["sets"] = results
        write_report(out, header, results, [], payload)  # keep partial results if a later set fails

    goals = evaluate_goals(results, cfg, default_settings)
    lines = goal_lines(goals)
    total = time.perf_counter() - start
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    footer = f"total run time {total:.0f} s; load average at end {[round(x, 2) for x in load_end] if load_end else None}"
    header.append(footer)
    if lines:
        print("Goals (computed from the tables above):")
        for line in lines:
            print(line)
    print(footer)
    payload.update(goals=goals, total_seconds=total, load_average_end=load_end)
    write_report(out, header, results, lines, payload)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
