"""`FitConfig`: every setting of a fit, one dataclass shared by `latent-prior fit --latents`, the Python API
(`latent_prior.train.fit(latents, FitConfig(...))` or keywords) and the saved `train/fit_config.json`.

`objective` picks the defaults of the loss weights and learning rates (`OBJECTIVES`); a field set
explicitly (flag, config file or keyword) always wins over the objective's default (`resolve_objective`).
`check_config` refuses settings that cannot run, naming the flag. docs/prior-development.md records the
measurements that chose the defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from latent_prior.config import option
from latent_prior.errors import LatentPriorError

#: Defaults that depend on the objective. "vml": variational maximum likelihood (λ = 1), with the
#: stabilizers of published generator-based EBM trainers (VERA, MEG, LEBM) and forward KL for a mass-covering sampler. "evalp-code": the
#: authors' public code, a WGAN-GP critic and a sampler with a tiny KL weight (a critic, not a
#: normalized prior; kept for comparison).
OBJECTIVES: dict[str, dict[str, Any]] = {
    "vml": {
        "energy_base": "flow",
        "warmup_steps": 1000,
        "flow_base_components": 0,
        "flow_base_covariance": "auto",
        "flow_base_init": "em",
        "kl_weight": 1.0,
        "energy_magnitude_penalty": 0.1,
        "grad_penalty": 0.1,
        "wgan_gp_weight": 0.0,
        "forward_kl_weight": 0.5,
        "lr_energy": 1e-3,
        "lr_sampler": 1e-3,
        "lr_linear_power": 0.0,
        "sampler_steps_per_energy_step": 1,
    },
    "evalp-code": {
        "energy_base": "gaussian",
        "warmup_steps": 0,
        "flow_base_components": 1,
        "flow_base_covariance": "diag",
        "flow_base_init": "kmeans",
        "kl_weight": 1e-3,
        "energy_magnitude_penalty": 0.0,
        "grad_penalty": 0.0,
        "wgan_gp_weight": 10.0,
        "forward_kl_weight": 0.0,
        "lr_energy": 5e-4,
        "lr_sampler": 5e-4,
        "lr_linear_power": 0.0,
        "sampler_steps_per_energy_step": 1,
    },
}

#: Latents of at most SUBSPACE_MIN_DIMS dimensions are modelled by the flat networks (MLP energy, RealNVP flow) even
#: when they are C×H×W: on the embedded default's 4×8×8 latents they reached the GMM's latent FD and the conv /
#: multi-scale pair did not (docs/prior-development.md).
#: Latents of more than SUBSPACE_MIN_DIMS dimensions (4×16×16, 32×8×8, 4×32×32, 4×64×64) get the subspace flow under
#: flow_kind=auto: a full-covariance mixture start and flat networks on their leading principal axes, a diagonal
#: Gaussian per mixture component on the rest (`latent_prior.flows.SubspaceFlow`). Up to 512 dims the full-covariance
#: base covers every dimension. Above 4096 dims its basis keeps 512 principal axes and completes them by Householder
#: reflectors (`PrincipalBasis`), since the D × D rotation is 1 GB at 4×64×64; the multi-scale flow with the conv
#: energy, which auto took there before, cost 14.8 s per alternating step already at 4×32×32 (docs/benchmarks-flagship.md).
SUBSPACE_MIN_DIMS = 512


@dataclass(frozen=True)
class _SeedOffsets:
    """Every random stream of a fit is seeded as `seed + offset`: one named offset per stream, so no two
    streams share draws and each is reproduced alone. (The values are historical; changing one changes
    that stream, and so the figures of earlier runs.)"""

    training_draws: int = 1  # posterior draws and data order of the training steps (× 1,000,003 + rank)
    eval_train_items: int = 1  # which training latents the evaluations score
    eval_val_items: int = 2  # which held-out latents the evaluations score
    init_items: int = 3  # which latents initialize ActNorm and the mixture base
    init_draws: int = 17  # their posterior draws
    mixture_refit: int = 19  # the draws that refit the mixture's weights after the warm-up
    eval_energy_draws: int = 101  # posterior draws scored by the energy at each evaluation
    eval_log_z: int = 202  # importance samples of log Z at each evaluation and at the export
    invertibility_check: int = 303  # the flow draws that check sampling against its inverse after the warm-up
    eval_heldout_draws: int = 404  # held-out posterior draws of the FD / precision reference
    eval_sampler_draws: int = 505  # sampler draws scored against them
    tracker_grid: int = 606  # the sampler draws decoded into the trackers' sample grid at each checkpoint


SEEDS = _SeedOffsets()
#: flow_base_components=0 chooses among these: the first always, a larger K where its full-covariance base has at
#: most FULL_BASE_BUDGET values (`base_em_starts`)
BASE_COMPONENT_CHOICES = (10, 20, 40)
#: the k-means starts of EM scored for each K (each its own candidate: see Trainer._choose_base)
BASE_EM_SEEDS = (0, 1, 2)
#: K·D² of the largest full-covariance base that the start search tries beyond its first K: 20 components in 64
#: dims. The base's log-density costs K·D² per latent and pass, and EM as much per item and iteration; at d = 64 a
#: 40-component start made a default fit miss the 2-minute goal (docs/prior-development.md, twelfth session)
FULL_BASE_BUDGET = 20 * 64**2


def base_em_starts(dims: int) -> dict[int, tuple[int, ...]]:
    """The start search's EM candidates for flow_base_components=0 in `dims` dimensions, {K: k-means seeds}: each K of
    BASE_COMPONENT_CHOICES whose K·dims² is within FULL_BASE_BUDGET (the first always) with the seeds BASE_EM_SEEDS,
    and the seeds of the K beyond the budget go to the largest K within it, the first excepted: {10: 0-2, 20: 0-2,
    40: 0-2} up to 45 dims, {10: 0-2, 20: 0-5} up to 64, {10: 0-2} above. More starts, because the best of three
    K = 20 starts can merge two of 20 separated modes where one of six does not (docs/prior-development.md)."""
    first, *larger = BASE_COMPONENT_CHOICES
    kept = [k for k in larger if k * dims**2 <= FULL_BASE_BUDGET]
    starts = {k: BASE_EM_SEEDS for k in (first, *kept)}
    dropped = len(larger) - len(kept)
    if kept and dropped:
        after = max(BASE_EM_SEEDS) + 1
        starts[kept[-1]] = (*BASE_EM_SEEDS, *range(after, after + dropped * len(BASE_EM_SEEDS)))
    return starts


#: relative held-out FD a larger mixture may lose against the first choice and still be chosen: a sanity bound,
#: not a criterion, since a GMM that merges modes keeps the first two moments, which is all FD compares (20
#: separated modes in 4-D: FD 0.70 with 10 components and precision 0.37, 0.82 and 0.94 with 40)
FD_TOLERANCE = 0.5
#: held-out k-NN precision a checkpoint may lose against the GMM start and still be selected: about 1.5 s.e. of
#: the estimate at 150 held-out items × 14 draws. A strict comparison kept the start on 8-D digits whose warmed-up
#: flow had a better held-out gain (+0.09 vs −0.88 nats) and FD (0.083 vs 0.119) at precision 0.866 vs 0.873.
PRECISION_TOLERANCE = 0.01
#: the values of `FitConfig.select_by` (latent_prior.selection describes each)
SELECT_BY_RULES = ("auto", "gain_and_fd", "gain_within_fd", "gain")
#: k of the k-NN precision that model selection compares (as `evaluate.latent_report`'s PR_NEIGHBOURS)
PRECISION_NEIGHBOURS = 3

#: Fields that do not change what is trained: a run differing only in these is the same run.
COSMETIC_FIELDS = ("resume", "quiet", "log_with", "log_every", "num_workers", "cpu_threads", "out")


def _objective_help(name: str, unit: str = "") -> str:
    values = ", ".join(f"{obj} {OBJECTIVES[obj][name]:{'' if isinstance(OBJECTIVES[obj][name], str) else 'g'}}{unit}" for obj in OBJECTIVES)
    return f"when left out, from --objective ({values})"


@dataclass
class FitConfig:
    """`latent-prior fit`: every knob of the trainer. Field names = CLI flags = keys of fit_config.json.

    The defaults are the same for every latent shape (the networks follow the shape: `energy_kind`,
    `flow_kind`); docs/prior-development.md records the measurements that chose them.
    """

    latents: str | None = option(
        None,
        "latent cache folder (from `latent-prior encode`) or a .safetensors file with `mean` (N, *shape) and optional `logvar`",
        required=True,
    )
    out: str | None = option(
        None,
        "output folder: receives the exported prior in prior/ "
        "(config.json, model.safetensors, README.md) and the training records in train/ (checkpoints/, "
        "metrics.csv, fit_config.json, fit_summary.json, training.png)",
        required=True,
    )
    # -- length, seed and objective
    steps: int = option(2000, "training steps (one energy update, preceded by the sampler updates, per step)")
    seed: int = option(0, "random seed (initialization, data order, posterior draws, validation split)")
    batch_size: int = option(256, "latents per step and process (positives; as many negatives are drawn from the sampler)")
    objective: str = option(
        "vml",
        "vml: variational maximum likelihood (lambda=1, a "
        "normalized prior); evalp-code: the authors' WGAN-GP critic with a tiny KL weight (for comparison)",
        choices=tuple(OBJECTIVES),
    )
    # -- networks
    energy_kind: str = option(
        "auto", "energy network: auto (conv beside --flow-kind multiscale, else mlp), mlp or conv", choices=("auto", "mlp", "conv")
    )
    energy_hidden: int = option(256, "MLP energy: hidden width")
    energy_depth: int = option(3, "energy: hidden layers (MLP) or residual stages (conv)")
    energy_channels: int = option(32, "conv energy: channels")
    spectral_norm: bool = option(False, "spectral-normalize the energy's hidden layers")
    flow_kind: str = option(
        "auto",
        "sampler flow: auto (realnvp up to 512 latent dims, "
        "subspace above), realnvp, spline, multiscale or subspace (a realnvp on the latents' leading principal axes, "
        "see --flow-subspace-dims)",
        choices=("auto", "realnvp", "spline", "multiscale", "subspace"),
    )
    flow_blocks: int | None = option(
        None, "flow couplings (realnvp/spline) or blocks per scale (multiscale); the flow's default when left out"
    )
    flow_hidden: int = option(128, "realnvp/spline: width of the couplings' MLP conditioners")
    flow_channels: int = option(32, "multiscale: channels of the couplings' conv conditioners")
    flow_subspace_dims: int = option(
        256,
        "subspace flow: principal axes of the latents that "
        "the flow and its full-covariance mixture base model (each component has a diagonal Gaussian on the "
        "rest); flow-kind auto picks the subspace flow for latents of more than 512 dims",
    )
    flow_layers: int | None = option(None, "realnvp/spline: hidden layers per conditioner; the flow's default when left out")
    flow_base_components: int | None = option(
        None,
        "components of the flow's base "
        "distribution: 1 is N(0, I), K > 1 a learned mixture of K Gaussians, which keeps separate modes (digit "
        "classes) apart instead of joining them by bridges of blended samples; 0 chooses K from 10, 20, 40 by the "
        "held-out precision + recall of EM GMMs with 3 k-means starts per K (K > 10 only "
        "where K·D² ≤ 20·64², i.e. 40 up to 45 dims and 20, with 6 starts, up to 64; a full EM base starts as the GMM chosen, for a K given too); "
        + _objective_help("flow_base_components"),
    )
    flow_base_covariance: str | None = option(
        None,
        "covariances of the mixture base's "
        "components: full, diag, or auto (full up to 512 latent dims, diag above, as the GMM baseline); "
        + _objective_help("flow_base_covariance"),
        choices=("auto", "full", "diag"),
    )
    flow_base_init: str | None = option(
        None,
        "how the mixture base starts: em (the GMM that "
        "EM fits to the posterior moments of the training latents, so training starts at the GMM baseline) or kmeans "
        "(diagonal components from k-means); " + _objective_help("flow_base_init"),
        choices=("em", "kmeans"),
    )
    # -- the energy's base and the warm-up (None = from --objective)
    energy_base: str | None = option(
        None,
        "flow: E(z) = log p0(z) - log q_base(z) + "
        "E_res(z), where q_base is the sampler flow frozen after its maximum-likelihood warm-up, so the energy "
        "only corrects what the flow gets wrong; gaussian: E = E_res on top of N(0, I) alone (the paper's form); "
        + _objective_help("energy_base"),
        choices=("flow", "gaussian"),
    )
    warmup_steps: int | None = option(
        None,
        "first steps that train only the sampler, by "
        "maximum likelihood on posterior draws (capped at half of --steps); " + _objective_help("warmup_steps"),
    )
    # -- losses and optimisation (None = from --objective)
    kl_weight: float | None = option(
        None, "lambda in the sampler loss E_q[E] + lambda*KL(q||p0); 1 is maximum likelihood; " + _objective_help("kl_weight")
    )
    energy_magnitude_penalty: float | None = option(
        None, "alpha in alpha*(E_pos^2 + E_neg^2); " + _objective_help("energy_magnitude_penalty")
    )
    grad_penalty: float | None = option(None, "gamma in gamma*0.5*|grad E(z_pos)|^2; " + _objective_help("grad_penalty"))
    wgan_gp_weight: float | None = option(None, "weight of (|grad E(interpolate)| - 1)^2; " + _objective_help("wgan_gp_weight"))
    forward_kl_weight: float | None = option(
        None,
        "weight of the flow's maximum-likelihood term -E_data[log q(z_pos)] in the sampler loss; " + _objective_help("forward_kl_weight"),
    )
    lr_energy: float | None = option(None, "Adam learning rate of the energy; " + _objective_help("lr_energy"))
    lr_sampler: float | None = option(None, "Adam learning rate of the sampler flow; " + _objective_help("lr_sampler"))
    lr_linear_power: float | None = option(
        None,
        "the sampler's D×D factors (its invertible "
        "linear maps, its full-covariance base) learn at lr_sampler × D^-power, since Adam moves a D×D matrix by "
        "about lr·√D per step (0: at lr_sampler); " + _objective_help("lr_linear_power"),
    )
    sampler_steps_per_energy_step: int | None = option(
        None, "sampler updates before each energy update; " + _objective_help("sampler_steps_per_energy_step")
    )
    lr_final_fraction: float = option(
        0.05,
        "both learning rates follow a cosine from their "
        "value at step 0 down to this fraction of it at the last step (1 keeps them constant); the decay "
        "sharpened the digits decoded from the sampler",
    )
    betas: tuple[float, ...] = option((0.5, 0.999), "Adam betas of both optimizers")
    clip_grad_norm: float = option(10.0, "clip each network's gradient norm to this (0 disables)")
    ema_decay: float = option(0.995, "EMA decay of the sampler's weights (the exported flow is the EMA); 0 disables")
    # -- validation, checkpoints, model selection
    validation_fraction: float = option(
        0.1, "fraction of latents held out to evaluate the ELBO gain and select the checkpoint (0: no split, keep the last)"
    )
    checkpoint_every: int = option(250, "write a checkpoint and evaluate on the held-out latents every N steps (and at the end)")
    keep_checkpoints: int = option(2, "most recent checkpoints to keep, besides the best one")
    early_stop_patience: int = option(
        2,
        "stop after N evaluations of the alternating phase without a better candidate by --select-by's rule (the "
        "warm-up's evaluations do not count, so the energy trains for at least N evaluations; 0: never stop early; "
        "why 2: docs/prior-development.md)",
    )
    min_ess_fraction: float = option(
        0.01, "checkpoints whose importance-sampling ESS fraction is below this cannot be selected (their log Z is unreliable)"
    )
    select_by: str = option(
        "auto",
        "model selection on the held-out latents: "
        "gain_and_fd (a checkpoint must match the first candidate, the GMM start, on held-out gain AND on the "
        "latent FD and k-NN precision of its samples, and the lowest FD among those wins), gain_within_fd (the same "
        "guards, but the FD may be up to --select-fd-tolerance worse than the start's, and the highest held-out gain "
        "among those wins), gain (the highest held-out gain) or auto (gain_within_fd for the subspace flow, i.e. "
        "latents of more than 512 dims under --flow-kind auto; gain_and_fd otherwise)",
        choices=SELECT_BY_RULES,
    )
    select_fd_tolerance: float = option(
        0.1,
        "with --select-by gain_within_fd (and auto for the subspace flow): the relative held-out FD loss against the first "
        "candidate a checkpoint may have",
    )
    fd_samples: int = option(2048, "sampler draws for the held-out latent FD at each evaluation")
    eval_samples: int = option(4096, "importance samples for log Z at each evaluation")
    eval_latents: int = option(4096, "at most this many held-out (and training) latents per evaluation")
    log_z_samples: int = option(32768, "importance samples for the exported log Z")
    divergence_threshold: float = option(1e4, "stop when |E| exceeds this many nats (or any loss is NaN/inf)")
    resume: bool = option(
        False, "continue the run in --out from its last checkpoint (also accepts changed settings, e.g. a lower lr after a divergence)"
    )
    # -- runtime
    mixed_precision: str = option("no", "no or bf16 (energy evaluations under autocast; flows stay in float32)", choices=("no", "bf16"))
    log_with: str = option(
        "none",
        "Accelerate trackers besides metrics.csv, by Accelerate's "
        "names, comma-separated: tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, ... (those your "
        "Accelerate knows); all (every one installed); none. When fit encodes images (not --latents), a grid of "
        "16 decoded sampler draws also goes to the trackers that take images at every checkpoint",
    )
    log_every: int = option(25, "write averaged training metrics every N steps")
    quiet: bool = option(False, "no progress bar")
    num_workers: int = option(0, "background threads reading the cache ahead of training (0: read in the training loop)")
    cpu_threads: int = option(
        0,
        "torch threads per process when training on CPU (0: one, or "
        "OMP_NUM_THREADS when set, because these small networks ran 7x faster on one thread than on two on a "
        "shared 2-core machine; latent_prior.threads); the previous setting is restored afterwards",
    )


def resolve_objective(config: FitConfig) -> FitConfig:
    """Fill the fields left as None with the defaults of `config.objective`."""
    if config.objective not in OBJECTIVES:
        raise LatentPriorError(f"--objective {config.objective!r}: choose one of {', '.join(OBJECTIVES)}.")
    preset = OBJECTIVES[config.objective]
    return dataclasses.replace(config, **{k: v for k, v in preset.items() if getattr(config, k) is None})


def tracker_names(log_with: str) -> list[str] | str | None:
    """--log-with as Accelerate takes it: None (metrics.csv only), "all", or the named trackers, each checked against
    the trackers this Accelerate knows and those installed, so a typo or a missing package stops the fit before
    it starts."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [n.strip() for n in log_with.split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    if names == ["all"]:
        return "all"
    known = sorted(LOGGER_TYPE_TO_CLASS)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LatentPriorError(
            f"--log-with {log_with}: {', '.join(unknown)} is not a tracker that Accelerate knows; "
            f"choose from {', '.join(known)}, all or none."
        )
    installed = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in installed]
    if missing:
        raise LatentPriorError(
            f"--log-with {log_with}: {', '.join(missing)} is not installed (pip install "
            f"{' '.join(missing)}), or pass --log-with none to log to metrics.csv only."
        )
    return names


def check_config(config: FitConfig) -> None:
    def need(ok: bool, flag: str, value: Any, what: str) -> None:
        if not ok:
            raise LatentPriorError(f"--{flag.replace('_', '-')} {value!r}: {what}.")

    c = config
    need(isinstance(c.steps, int) and c.steps > 0, "steps", c.steps, "the number of training steps must be a positive integer")
    need(c.batch_size >= 2, "batch_size", c.batch_size, "use at least 2 latents per step")
    need(0.0 <= c.validation_fraction < 1.0, "validation_fraction", c.validation_fraction, "pass a fraction in [0, 1), e.g. 0.1")
    need(0.0 <= c.ema_decay < 1.0, "ema_decay", c.ema_decay, "pass a decay in [0, 1), e.g. 0.995")
    need(c.lr_energy > 0 and c.lr_sampler > 0, "lr_energy/--lr-sampler", (c.lr_energy, c.lr_sampler), "learning rates must be positive")
    need(c.lr_linear_power >= 0, "lr_linear_power", c.lr_linear_power, "pass 0 (no scaling) or a positive power, e.g. 0.5")
    need(0.0 < c.lr_final_fraction <= 1.0, "lr_final_fraction", c.lr_final_fraction, "pass a fraction in (0, 1]")
    need(len(c.betas) == 2 and all(0.0 <= b < 1.0 for b in c.betas), "betas", c.betas, "pass two Adam betas in [0, 1), e.g. 0.5 0.999")
    need(c.warmup_steps >= 0, "warmup_steps", c.warmup_steps, "pass 0 (no warm-up) or a number of steps")
    need(c.energy_base in ("flow", "gaussian"), "energy_base", c.energy_base, "choose flow or gaussian")
    need(c.sampler_steps_per_energy_step >= 1, "sampler_steps_per_energy_step", c.sampler_steps_per_energy_step, "pass at least 1")
    for name in ("kl_weight", "energy_magnitude_penalty", "grad_penalty", "wgan_gp_weight", "forward_kl_weight", "clip_grad_norm"):
        need(getattr(c, name) >= 0, name, getattr(c, name), "pass a non-negative weight")
    need(
        c.kl_weight > 0 or c.forward_kl_weight > 0,
        "kl_weight",
        c.kl_weight,
        "with --forward-kl-weight 0 the sampler needs a positive KL weight",
    )
    for name in ("checkpoint_every", "log_every", "eval_samples", "eval_latents", "log_z_samples", "fd_samples"):
        need(getattr(c, name) >= 1, name, getattr(c, name), "pass a positive integer")
    need(c.keep_checkpoints >= 1, "keep_checkpoints", c.keep_checkpoints, "keep at least 1 checkpoint (resume needs it)")
    need(c.early_stop_patience >= 0, "early_stop_patience", c.early_stop_patience, "pass 0 (off) or a positive number of evaluations")
    need(0.0 <= c.min_ess_fraction <= 1.0, "min_ess_fraction", c.min_ess_fraction, "pass a fraction in [0, 1]")
    need(c.divergence_threshold > 0, "divergence_threshold", c.divergence_threshold, "pass a positive number of nats")
    need(c.num_workers >= 0, "num_workers", c.num_workers, "pass 0 or more")
    need(
        c.flow_base_components >= 0,
        "flow_base_components",
        c.flow_base_components,
        "pass 0 (chosen on held-out latents), 1 (N(0, I)) or more mixture components",
    )
    need(c.flow_base_covariance in ("auto", "full", "diag"), "flow_base_covariance", c.flow_base_covariance, "choose auto, full or diag")
    need(c.flow_base_init in ("em", "kmeans"), "flow_base_init", c.flow_base_init, "choose em or kmeans")
    need(
        not (c.flow_base_covariance == "full" and c.flow_base_init == "kmeans"),
        "flow_base_covariance",
        c.flow_base_covariance,
        "full covariances need --flow-base-init em",
    )
    need(c.select_by in SELECT_BY_RULES, "select_by", c.select_by, f"choose {', '.join(SELECT_BY_RULES[:-1])} or {SELECT_BY_RULES[-1]}")
    need(c.select_fd_tolerance >= 0, "select_fd_tolerance", c.select_fd_tolerance, "give a relative FD loss >= 0")
    need(c.flow_subspace_dims >= 2, "flow_subspace_dims", c.flow_subspace_dims, "pass at least 2 principal axes")
    need(c.cpu_threads >= 0, "cpu_threads", c.cpu_threads, "pass 0 (one thread) or a number of threads")
    tracker_names(c.log_with)
