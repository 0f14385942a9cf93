"""The trainer of one fit: alternating energy / sampler training on Accelerate (`train.fit` runs it).

The model, in the VAE's normalized latent space:

    p_θ(z) = p0(z)·exp(−E_θ(z)) / Z_θ,    p0 = N(0, I)

is fitted to the aggregate posterior by alternating two updates per training step: first
`sampler_steps_per_energy_step` updates of the flow q_φ (`losses.sampler_loss`), then one of the energy E_θ
(`losses.energy_loss`), whose positives are FRESH reparameterised posterior draws z = μ + σ·ε of the current
batch and whose negatives are the last sampler step's samples, detached. The settings are a
`fit_config.FitConfig`; the checkpoints and metrics.csv are written by `latent_prior.checkpoints`.

Distributed training (one code path for 1 CPU, 1 GPU, N GPUs / nodes). Accelerate sets up the
processes, devices, mixed precision, trackers and collectives. The models are NOT wrapped in DDP: the
energy appears in both losses, the flow is called through `sample_and_log_prob` / `log_prob` rather
than `forward`, and the energy step takes double-backward gradient penalties, none of which DDP's
reducer handles. Instead every rank computes its gradients on its own data shard and the gradients
are averaged with one explicit all-reduce per update (as StyleGAN2-ADA does for the same reasons),
so every rank applies the same update and the weights stay identical (rank 0's initial weights are
broadcast once). `batch_size` is per process, as usual with Accelerate.

Checkpoints (`out/train/checkpoints/step-XXXXXXX/`, written to a temporary folder then renamed) hold the
energy, the flow, the flow's EMA, both optimizers (safetensors + JSON), every rank's RNG states,
the data position and the model-selection state, so `--resume` after a kill -9 reproduces the
uninterrupted run. At each checkpoint the run is evaluated on held-out latents:

    held-out gain = mean_{val}[−E(z)] − log Ẑ      (nats; the ELBO gain over the N(0, I) prior)

with log Ẑ from importance sampling with the EMA flow (`latent_prior.sampling.estimate_log_z`), and the
latent FD of the EMA flow's samples to posterior draws of the held-out latents. The initialized model is
the first candidate (step 0): with the default EM-initialized mixture base it is the GMM baseline. Model
selection (`select_by="gain_and_fd"`) keeps the checkpoint with the lowest held-out FD among those at
least as good as step 0 on held-out gain, FD and k-NN precision (within its noise), whose importance sampling is healthy (ESS fraction
≥ `min_ess_fraction`), so the prior falls back to the GMM when training does not improve on it;
`select_by="gain_within_fd"` keeps the highest held-out gain among the checkpoints that pass the same guards with an FD
up to `select_fd_tolerance` worse; `select_by="gain"` keeps the highest held-out gain; the default, "auto", is
gain_within_fd for the subspace flow and gain_and_fd otherwise (`latent_prior.selection`); without a validation
split, the last checkpoint.
The chosen energy and EMA flow, with a final log Ẑ over `log_z_samples` proposals, are exported as a
`latent_prior.prior.LatentPrior` into `out/prior/` (`LatentPrior.from_pretrained(out / "prior")`), a folder that holds
only the prior, to copy or upload as it is; the training records (checkpoints/, metrics.csv, fit_config.json,
fit_summary.json, training.png) go to `out/train/`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from latent_prior import selection
from latent_prior.baselines import gmm_covariance, gmm_fit_draws, gmm_fit_items
from latent_prior.batches import BatchStream, subset, validation_split
from latent_prior.cache import data_dims as latent_data_dims
from latent_prior.checkpoints import (
    EVAL_KEYS,
    STAT_KEYS,
    STEP_PREFIX,
    MetricsCSV,
    RunState,
    checkpoint_dirs,
    load_tensors,
    optimizer_from_files,
    optimizer_to_files,
    rng_from_files,
    rng_to_files,
    save_tensors,
    tensors_of,
)
from latent_prior.config import to_dict
from latent_prior.distributed import all_reduce_grads_and_stats, broadcast_module
from latent_prior.ema import EMA
from latent_prior.errors import LatentPriorError, RunFailed
from latent_prior.files import atomic_write_json
from latent_prior.fit_config import (
    BASE_COMPONENT_CHOICES,
    BASE_EM_SEEDS,
    FD_TOLERANCE,
    PRECISION_NEIGHBOURS,
    SEEDS,
    SUBSPACE_MIN_DIMS,
    FitConfig,
    base_em_starts,
)
from latent_prior.log import logger
from latent_prior.losses import energy_loss, sampler_loss
from latent_prior.prior import PRIOR_DIR, TRAIN_DIR
from latent_prior.vae import LatentNormalization, posterior_draw

#: decoded sampler draws in the trackers' sample grid (`Trainer._log_sample_grid`)
TRACKER_GRID = 16


def _add_gain_gaps(scores: list[dict[str, Any]], gains: list[torch.Tensor | None]) -> None:
    """Adds to each candidate's scores how far its held-out gain is below the best candidate's (nats per item) and
    the standard error of that gap, paired over the same held-out draws; NaN where a gain is unknown."""
    known = [i for i, g in enumerate(gains) if g is not None]
    best = max(known, key=lambda i: scores[i]["val_gain_nats"], default=None)
    for i, row in enumerate(scores):
        if best is None or gains[i] is None:
            row["val_gain_gap"] = row["val_gain_gap_se"] = float("nan")
            continue
        diff = gains[best] - gains[i]
        row["val_gain_gap"] = diff.mean().item()
        row["val_gain_gap_se"] = (diff.std() / math.sqrt(len(diff))).item() if len(diff) > 1 else float("nan")


class Trainer:
    """One fit: builds the networks, optimizers and data stream from a resolved FitConfig, trains them
    (`train`), selects a checkpoint and exports it (`export`). `fit` is the entry point that prepares --out
    and the Accelerator and drives it; use it, unless you need the steps one by one."""

    def __init__(self, config: FitConfig, source: Any, out: Path, accelerator: Any) -> None:
        self.config, self.source, self.out, self.acc = config, source, out, accelerator
        self.device = accelerator.device
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.tracking = False  # set by `fit` when Accelerate trackers were initialized
        self.decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # raw latents -> images in [-1, 1], from `fit`
        self.train_dir = out / TRAIN_DIR
        self.ckpt_root = self.train_dir / "checkpoints"
        self.shape = tuple(source.latent_shape)
        self.norm: LatentNormalization = source.normalization
        self.train_idx, self.val_idx = validation_split(len(source), config.validation_fraction, config.seed)
        # Fixed random subsets for evaluation (sorted caches are ordered by source path, e.g. by class).
        self.eval_train_idx = subset(self.train_idx, config.eval_latents, config.seed + SEEDS.eval_train_items)
        self.eval_val_idx = subset(self.val_idx, config.eval_latents, config.seed + SEEDS.eval_val_items)
        need = config.batch_size * self.world_size
        if len(self.train_idx) < need:
            procs = f" × {self.world_size} processes" if self.world_size > 1 else ""
            held = f" after holding out {len(self.val_idx)} for validation" if len(self.val_idx) else ""
            raise LatentPriorError(
                f"{config.latents}: {len(self.train_idx)} training latents (of {len(source)}{held}) are fewer than one batch "
                f"of {config.batch_size}{procs}; pass --batch-size {max(2, len(self.train_idx) // self.world_size)} or smaller"
                + (", or a smaller --validation-fraction." if len(self.val_idx) else ".")
            )
        self._fd_reference: torch.Tensor | None = None  # held-out draws for the FD and precision, fixed for the run
        self.basis = self._fit_basis()
        self._moments: tuple[torch.Tensor, torch.Tensor | None] | None = None  # `_base_moments`, read on first use
        self.base_components, self.base_choice, self.base_gmm = self._choose_base()
        self.selection_config = selection.resolve(config, self._flow_kind())  # select_by="auto" made concrete
        self._build()

    # -- construction ---------------------------------------------------------------------------
    def _flow_kind(self) -> str:
        """flow_kind, with auto resolved by size: realnvp up to SUBSPACE_MIN_DIMS, subspace above."""
        kind = self.config.flow_kind
        if kind != "auto":
            return kind
        return "realnvp" if math.prod(self.shape) <= SUBSPACE_MIN_DIMS else "subspace"

    def _base_dims(self) -> int:
        """Dimensions of the space the mixture base lives in: the subspace flow's leading axes, else all."""
        dims = math.prod(self.shape)
        return min(dims, self.config.flow_subspace_dims) if self._flow_kind() == "subspace" else dims

    def _fit_basis(self) -> Any:
        """The principal axes of the subspace flow (`PrincipalBasis`), fitted on posterior draws of the training latents
        before the base is chosen (the candidate GMMs live on the leading axes), the same on every rank; None for
        other flows."""
        from latent_prior.flows import PrincipalBasis

        if self._flow_kind() != "subspace":
            return None
        return PrincipalBasis.fit(self._base_fit_draws(self.config.seed + SEEDS.init_draws, components=1, dims=math.prod(self.shape)))

    def _flow_kwargs(self) -> dict[str, Any]:
        c = self.config
        kind = self._flow_kind()
        kw: dict[str, Any] = {"kind": kind}
        kw["base_components"] = self.base_components
        if self.base_components > 1:
            kw["base_covariance"] = self._base_covariance()
            kw["base_init"] = c.flow_base_init
        if kind == "multiscale":
            kw["hidden_channels"] = c.flow_channels
            if c.flow_blocks is not None:
                kw["blocks_per_scale"] = c.flow_blocks
        else:
            if kind == "subspace":
                kw["subspace_dims"] = c.flow_subspace_dims
            kw["hidden"] = c.flow_hidden
            if c.flow_blocks is not None:
                kw["num_blocks"] = c.flow_blocks
            if c.flow_layers is not None:
                kw["num_layers"] = c.flow_layers
        return kw

    def _base_covariance(self) -> str:
        c = self.config
        return gmm_covariance(self._base_dims()) if c.flow_base_covariance == "auto" else c.flow_base_covariance

    def _choose_base(self) -> tuple[int, list[dict[str, Any]], Any]:
        """(K, the scores of every candidate, the chosen GMM or None) for a full-covariance EM base.

        The candidates are EM GMMs fitted on the training items (`_base_gmm`): one per K and k-means seed of
        `base_em_starts`, or per seed of BASE_EM_SEEDS for a K given, and the GMM baseline's own estimator
        (GMM_COMPONENTS components, the best of GMM_KMEANS_STARTS
        k-means starts seeded by the fit's seed) where that K is among them. The choice is the candidate whose
        samples have the highest held-out k-NN precision + recall among those whose held-out FD is within
        FD_TOLERANCE of the best; the flow then starts as exactly that GMM (Flow.initialize's `mixture`), so step 0
        is the model that was scored. Why not held-out likelihood, and why several EM starts:
        docs/prior-development.md ("how the GMM start is chosen"). Each candidate's held-out gain is still
        recorded (fit_summary.json's `base_choice`: `val_gain_nats`, and `val_gain_gap` ± `val_gain_gap_se` below
        the best). Chosen on the main process; the others refit the chosen candidate from the broadcast (K, seed,
        starts). A diagonal or k-means base, or too few held-out latents to score, keeps the flow's own
        initialization (GMM None)."""
        from accelerate.utils import broadcast

        from latent_prior.baselines import GMM_COMPONENTS, GMM_KMEANS_STARTS

        c = self.config
        dims = self._base_dims()
        if self._base_covariance() != "full" or c.flow_base_init != "em":
            return c.flow_base_components or BASE_COMPONENT_CHOICES[0], [], None
        starts = {c.flow_base_components: BASE_EM_SEEDS} if c.flow_base_components else base_em_starts(dims)
        first = next(iter(starts))
        if first <= 1 or len(self.eval_val_idx) <= PRECISION_NEIGHBOURS:
            return first, [], None
        keys = [(k, em_seed, 1) for k, seeds in starts.items() for em_seed in seeds]
        if GMM_COMPONENTS in starts:
            keys.append((GMM_COMPONENTS, c.seed, GMM_KMEANS_STARTS))
        scores: list[dict[str, Any]] = []
        fitted: dict[tuple[int, int, int], Any] = {}
        gains: list[torch.Tensor | None] = []
        chosen = torch.tensor(keys[0], device=self.device)
        if self.is_main:
            heldout = None if self.basis is not None else torch.cat(list(self._fixed_draws(self.eval_val_idx))).double().cpu()
            for key in keys:
                gmm = fitted[key] = self._base_gmm(*key)
                gen = torch.Generator().manual_seed(c.seed + SEEDS.eval_sampler_draws)
                samples = gmm.sample(c.fd_samples, generator=gen).flatten(1).float()
                if self.basis is not None:
                    samples = self.basis.lift(samples, gen)
                fd, precision, recall = self._sample_scores(samples)
                gains.append(self._heldout_gmm_gains(gmm, heldout))
                scores.append(
                    {
                        "components": key[0],
                        "em_seed": key[1],
                        "em_starts": key[2],
                        "val_fd": fd,
                        "val_precision": precision,
                        "val_recall": recall,
                        "val_gain_nats": float("nan") if gains[-1] is None else gains[-1].mean().item(),
                    }
                )
            _add_gain_gaps(scores, gains)
            fd_limit = (1 + FD_TOLERANCE) * min(r["val_fd"] for r in scores)
            admissible = [r for r in scores if r["val_fd"] <= fd_limit and math.isfinite(r["val_precision"] + r["val_recall"])]
            best = max(admissible or scores[:1], key=lambda r: r["val_precision"] + r["val_recall"])
            chosen = torch.tensor([best["components"], best["em_seed"], best["em_starts"]], device=self.device)
        if self.world_size > 1:
            chosen = broadcast(chosen, from_process=0)
        key = tuple(int(v) for v in chosen.tolist())
        return key[0], scores, fitted[key] if self.is_main else self._base_gmm(*key)

    def _base_em_seed(self) -> int | None:
        """The k-means seed of the GMM the base started as; None where the flow initialized its own base."""
        return None if self.base_gmm is None else self.base_gmm.seed

    def _base_gmm(self, components: int, em_seed: int, em_starts: int = 1) -> Any:
        """The GMM baseline's estimator (float64 EM, full covariances) from the best of `em_starts` k-means starts
        seeded by `em_seed`: on the posterior moments of the training items, as the GMM baseline (`GMMPrior.fit`'s
        `variances`), or for the subspace flow on its leading whitened axes (`PrincipalBasis.fit_mixture`), where the
        posteriors are not diagonal, on training draws (`_base_fit_draws`, which also initialize the flow's ActNorms)."""
        from latent_prior.baselines import GMMPrior

        gmm = GMMPrior(n_components=components, covariance="full", seed=em_seed, n_init=em_starts)
        with warnings.catch_warnings():
            # Its warnings (collapsed dims, few points per component) concern a GMM used as a prior on its own;
            # here the held-out scores above and training's model selection judge the result.
            warnings.simplefilter("ignore", RuntimeWarning)
            if self.basis is None:
                return gmm.fit(*self._base_moments())
            draws = self._base_fit_draws(self.config.seed + SEEDS.init_draws, components)
            return self.basis.fit_mixture(gmm, draws, self._base_dims())

    def _base_moments(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalized posterior means and variances (None for a deterministic cache) of up to `gmm_fit_items` training
        items, (N, *latent_shape) float64 on the CPU, read once for all of `_choose_base`'s candidates."""
        from latent_prior.evaluate import moments_of_items

        if self._moments is None:
            items = subset(self.train_idx, gmm_fit_items(math.prod(self.shape)), self.config.seed + SEEDS.init_items)
            mean, variance = moments_of_items(self.source, items, self.norm)
            self._moments = (mean.double(), None if variance is None else variance.double())
        return self._moments

    def _build(self) -> None:
        from latent_prior.energy import FlowBasedEnergy, build_energy
        from latent_prior.flows import build_flow, optimizer_groups

        c = self.config
        torch.manual_seed(c.seed)  # same initial weights on every rank (and rank 0's are broadcast anyway)
        energy_kind = c.energy_kind
        if energy_kind == "auto":
            # The conv energy goes with the multi-scale flow: beside the subspace flow at 4×32×32 its double backward
            # (the gradient penalty) took over 10 s of an alternating step on one core, the MLP's a small part of it.
            energy_kind = "conv" if self._flow_kind() == "multiscale" else "mlp"
        residual = build_energy(
            self.shape,
            kind=energy_kind,
            hidden=c.energy_hidden,
            depth=c.energy_depth,
            channels=c.energy_channels,
            spectral_norm=c.spectral_norm,
        )
        self.flow = build_flow(self.shape, **self._flow_kwargs()).to(self.device)
        if c.energy_base == "flow":
            # The base is a copy of the sampler, overwritten by its warmed-up weights (see _end_warmup).
            self.energy = FlowBasedEnergy(residual, build_flow(self.shape, **self._flow_kwargs())).to(self.device)
        else:
            self.energy = residual.to(self.device)
        # The network that the energy loss trains (a flow base is frozen and takes no part in it).
        self.trainable_energy = getattr(self.energy, "residual", self.energy)
        # foreach: one kernel per step for all tensors instead of a Python loop over them (the loop was 10 % of a
        # CPU fit on the digits latents); the arithmetic is Adam's either way.
        self.opt_energy = torch.optim.Adam(self.trainable_energy.parameters(), lr=c.lr_energy, betas=tuple(c.betas), foreach=True)
        self.opt_sampler = torch.optim.Adam(
            optimizer_groups(self.flow, c.lr_linear_power), lr=c.lr_sampler, betas=tuple(c.betas), foreach=True
        )
        # One generator per rank drives every random draw of training (posterior noise, flow noise,
        # interpolates), so its state in the checkpoint is all a resume needs.
        self.generator = torch.Generator(device=self.device).manual_seed((c.seed + SEEDS.training_draws) * 1_000_003 + self.rank)
        self.state = RunState(world_size=self.world_size)
        self.ema: EMA | None = None
        self.shared_basis = False  # set by _note_shared_basis
        # Our own autocast rather than Accelerator(mixed_precision=...): Accelerate fixes the precision once per
        # process, so a second fit in a notebook could not choose another one.
        self.autocast = (
            functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
            if c.mixed_precision == "bf16"
            else contextlib.nullcontext
        )

    def _initialization_draws(self, seed: int) -> torch.Tensor:
        """Posterior draws of up to 2048 training latents (bounded memory), the same on every rank and on a
        resume: the subset and the noise come from the seed, not from the training generator."""
        limit = max(2, min(2048, (64 * 2**20) // max(1, 8 * math.prod(self.shape))))
        mean, logvar = self.source.read(subset(self.train_idx, limit, self.config.seed + SEEDS.init_items))
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return posterior_draw(mean, logvar, gen, normalization=self.norm, device=self.device)

    def _base_fit_draws(self, seed: int, components: int | None = None, dims: int | None = None) -> torch.Tensor:
        """Posterior draws of training latents for an EM-initialized base: as many as the GMM baseline fits on in
        `dims` dimensions (the base's by default; several per item where the items are few for the dimension), the
        same on every rank and on a resume."""
        dims = dims or self._base_dims()
        per_item, count = gmm_fit_draws(
            len(self.train_idx), dims, bool(getattr(self.source, "deterministic", False)), components or self.flow.base_components
        )
        mean, logvar = self.source.read(subset(self.train_idx, -(-count // per_item), self.config.seed + SEEDS.init_items))
        if per_item > 1:
            mean = mean.repeat(per_item, *([1] * (mean.dim() - 1)))[:count]
            logvar = None if logvar is None else logvar.repeat(per_item, *([1] * (logvar.dim() - 1)))[:count]
        gen = torch.Generator(device=self.device).manual_seed(seed)
        return posterior_draw(mean, logvar, gen, normalization=self.norm, device=self.device)

    def _initialize_flow(self) -> None:
        """ActNorm data init on posterior draws of training latents, then the chosen GMM as the mixture base
        (`_choose_base`), or else the flow's own k-means or EM on the same draws."""
        em = self.flow.base_components > 1 and self.flow.base_init == "em"
        seed = self.config.seed + SEEDS.init_draws
        draws = self._base_fit_draws(seed) if em else self._initialization_draws(seed)
        if self.basis is not None:
            self.flow.initialize(draws, mixture=self.base_gmm, basis=self.basis)
        else:
            self.flow.initialize(draws, mixture=self.base_gmm)
        broadcast_module(self.flow, self.acc)
        broadcast_module(self.energy, self.acc)

    # -- checkpoints ----------------------------------------------------------------------------
    def _assert_ranks_agree(self) -> None:
        """Every rank must hold the same weights (identical averaged updates); a cheap check at each checkpoint."""
        if self.world_size == 1:
            return
        sums = torch.stack([sum(p.detach().double().sum() for p in m.parameters()) for m in (self.energy, self.flow, self.ema.module)]).to(
            self.device
        )
        every = self.acc.gather(sums[None])
        if not torch.allclose(every, every[:1].expand_as(every), rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"internal error: the ranks' weights differ at step {self.state.step} ({every.tolist()}); please report it.")

    def save_checkpoint(self) -> Path:
        self._assert_ranks_agree()
        step = self.state.step
        final = self.ckpt_root / f"{STEP_PREFIX}{step:07d}"
        tmp = self.ckpt_root / f".tmp-{STEP_PREFIX}{step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.acc.wait_for_everyone()
        rng_tensors, rng_meta = rng_to_files(self.generator)
        save_tensors(rng_tensors, tmp / f"rng-rank{self.rank}.safetensors")
        (tmp / f"rng-rank{self.rank}.json").write_text(json.dumps(rng_meta))
        self.acc.wait_for_everyone()
        if self.is_main:
            save_tensors(tensors_of(self.energy), tmp / "energy.safetensors")
            save_tensors(tensors_of(self.flow), tmp / "flow.safetensors")
            save_tensors(tensors_of(self.ema.module), tmp / "flow_ema.safetensors")
            optim_meta = {}
            for name, opt in (("energy", self.opt_energy), ("sampler", self.opt_sampler)):
                tensors, meta = optimizer_to_files(opt)
                save_tensors(tensors, tmp / f"optim_{name}.safetensors")
                optim_meta[name] = meta
            (tmp / "optim.json").write_text(json.dumps(optim_meta))
            state = dataclasses.asdict(self.state) | {"ema_updates": self.ema.updates}
            (tmp / "state.json").write_text(json.dumps(state, indent=1))  # written last: marks completeness
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        self.acc.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        ckpts = checkpoint_dirs(self.ckpt_root)
        keep = {s for s, _ in ckpts[-self.config.keep_checkpoints :]}
        if self.state.best_step is not None:
            keep.add(self.state.best_step)
        for s, path in ckpts:
            if s not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state.get("world_size", 1) != self.world_size:
            raise LatentPriorError(
                f"{path} was written by a run with {state.get('world_size')} processes, this one has {self.world_size}; "
                "resume with the same number of processes, or start a new --out."
            )
        try:
            self.energy.load_state_dict(load_tensors(path / "energy.safetensors", self.device))
            self.flow.load_state_dict(load_tensors(path / "flow.safetensors", self.device))
            self.ema.module.load_state_dict(load_tensors(path / "flow_ema.safetensors", self.device))
            self._note_shared_basis()
        except RuntimeError as exc:
            raise LatentPriorError(
                f"{path} does not fit the networks of this config ({str(exc).splitlines()[0]}); resume with the architecture "
                "flags of the original run (see fit_config.json) or start a new --out."
            ) from None
        try:  # `fit` read every file first (_check_checkpoint); what remains is their content
            optim_meta = json.loads((path / "optim.json").read_text())
            for name, opt in (("energy", self.opt_energy), ("sampler", self.opt_sampler)):
                optimizer_from_files(opt, load_tensors(path / f"optim_{name}.safetensors"), optim_meta[name])
            rng_file = path / f"rng-rank{self.rank}.safetensors"
            rng_from_files(self.generator, load_tensors(rng_file), json.loads((path / f"rng-rank{self.rank}.json").read_text()))
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise LatentPriorError(
                f"{path}: the checkpoint's optimizer or random state is damaged ({type(exc).__name__}: {exc}); delete {path} "
                "to resume from the checkpoint before it, or start a new --out."
            ) from None
        self.ema.updates = int(state.pop("ema_updates", 0))
        known = {f.name for f in dataclasses.fields(RunState)}
        self.state = RunState(**{k: v for k, v in state.items() if k in known})
        # by this run's --early-stop-patience, which a resume may change (0 continues a run that stopped early)
        self.state.stopped_early = selection.patience_spent(self.state, self.config)

    # -- evaluation -----------------------------------------------------------------------------
    def _fixed_draws(self, indices: np.ndarray) -> Iterator[torch.Tensor]:
        """One normalized posterior draw per item of `indices`, in chunks: the same draws at every call."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + SEEDS.eval_energy_draws)
        for mean, logvar in self.source.iter_moments(1024, indices=indices, shuffle=False):
            yield posterior_draw(mean, logvar, gen, normalization=self.norm, device=self.device)

    @torch.no_grad()
    def _mean_neg_energy(self, indices: np.ndarray) -> float:
        """mean over items of −E(z), on `_fixed_draws` (nats)."""
        total, count = 0.0, 0
        for z in self._fixed_draws(indices):
            total += float(-self.energy(z).double().sum())
            count += len(z)
        return total / max(1, count)

    @torch.no_grad()
    def _heldout_gmm_gains(self, gmm: Any, z: torch.Tensor | None) -> torch.Tensor | None:
        """A candidate GMM's held-out gain over N(0, I) per item: log q(z) − log N(z; 0, I) on `z`, the held-out
        `_fixed_draws` in float64 on the CPU (nats; their mean is what evaluation reports for step 0). None without
        them: on the subspace flow's leading axes the GMM is not the whole density."""
        from latent_prior.sampling import log_standard_normal

        return None if z is None else gmm.log_prob(z) - log_standard_normal(z)

    @torch.no_grad()
    def _heldout_sample_scores(self) -> tuple[float, float]:
        """(FD, precision) of `fd_samples` draws of the EMA sampler (see `_sample_scores`)."""
        from latent_prior.sampling import sample_flow

        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + SEEDS.eval_sampler_draws)
        return self._sample_scores(sample_flow(None, self.ema.module, self.config.fd_samples, generator=gen).flatten(1).float().cpu())[:2]

    def _sample_scores(self, samples: torch.Tensor) -> tuple[float, float, float]:
        """(FD, precision, recall) of normalized samples (n, D) against fixed posterior draws of the held-out latents
        (about as many, several per item when they are few). Precision is the k-NN (k = 3) manifold precision, one
        draw per held-out item against as many samples, averaged over the draws: FD rewards covering the latents,
        precision rewards not leaving them (what decoded samples show)."""
        from latent_prior.metrics import frechet_distance, precision_recall_knn

        c = self.config
        if self._fd_reference is None:
            gen = torch.Generator(device=self.device).manual_seed(c.seed + SEEDS.eval_heldout_draws)
            repeats = max(1, round(c.fd_samples / max(1, len(self.eval_val_idx))))
            parts = [
                posterior_draw(mean, logvar, gen, normalization=self.norm, device=self.device).flatten(1).cpu()
                for _ in range(repeats)
                for mean, logvar in self.source.iter_moments(1024, indices=self.eval_val_idx, shuffle=False)
            ]
            self._fd_reference = torch.cat(parts)
        if not torch.isfinite(samples).all():
            return float("inf"), 0.0, 0.0
        m = len(self.eval_val_idx)
        repeats = min(len(self._fd_reference), len(samples)) // m if m > PRECISION_NEIGHBOURS else 0
        pr = [
            precision_recall_knn(self._fd_reference[r * m : (r + 1) * m], samples[r * m : (r + 1) * m], k=PRECISION_NEIGHBOURS)
            for r in range(repeats)
        ]
        precision = sum(p.precision for p in pr) / repeats if repeats else float("nan")
        recall = sum(p.recall for p in pr) / repeats if repeats else float("nan")
        return frechet_distance(samples, self._fd_reference), precision, recall

    @torch.no_grad()
    def _log_sample_grid(self) -> None:
        """TRACKER_GRID draws of the EMA sampler, decoded, to every tracker that takes images (a fixed seed, so the
        grids of successive checkpoints show how one set of draws changes)."""
        if not (self.tracking and self.decode is not None and self.is_main):
            return
        from latent_prior.sampling import sample_flow

        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + SEEDS.tracker_grid)
        z = sample_flow(None, self.ema.module, TRACKER_GRID, generator=gen)
        images = ((self.decode(self.norm.denormalize(z)).float().clamp(-1, 1) + 1) / 2).cpu()
        for tracker in self.acc.trackers:
            with contextlib.suppress(NotImplementedError, AttributeError):  # a tracker without images (mlflow)
                tracker.log_images({"samples": images}, step=self.state.step)

    def _in_warmup(self) -> bool:
        return self.state.warmup_steps is not None and self.state.step < self.state.warmup_steps

    def evaluate(self, num_samples: int) -> dict[str, Any]:
        """Held-out and training gain (nats), log Ẑ and its ESS with the EMA flow as proposal, and the held-out
        latent FD of the EMA flow's samples.

        During the warm-up of a flow-based energy the candidate prior is the EMA flow itself (E_res at its
        start, ≈ 0), so it is copied into the energy's base first, on every rank. Computed on the main process
        and broadcast, so every rank takes the same decisions.
        """
        from accelerate.utils import broadcast

        from latent_prior.sampling import estimate_log_z

        if self._in_warmup() and hasattr(self.energy, "base"):
            self.energy.base.load_state_dict(self.ema.module.state_dict())
        values = torch.full((8,), float("nan"), dtype=torch.float64, device=self.device)
        if self.is_main:
            self.energy.eval()
            gen = torch.Generator(device=self.device).manual_seed(self.config.seed + SEEDS.eval_log_z)
            est = estimate_log_z(self.energy, self.ema.module, num_samples, batch_size=min(num_samples, 4096), generator=gen)
            train_gain = self._mean_neg_energy(self.eval_train_idx) - est.log_z
            has_val = len(self.val_idx) > 0
            val_gain = self._mean_neg_energy(self.eval_val_idx) - est.log_z if has_val else float("nan")
            val_fd, val_precision = self._heldout_sample_scores() if has_val else (float("nan"), float("nan"))
            self.energy.train()
            values = torch.tensor(
                [est.log_z, est.ess, est.ess_fraction, val_gain, train_gain, num_samples, val_fd, val_precision],
                dtype=torch.float64,
                device=self.device,
            )
        if self.world_size > 1:
            values = broadcast(values, from_process=0)
        log_z, ess, ess_fraction, val_gain, train_gain, k, val_fd, val_precision = values.tolist()
        return {
            "step": self.state.step,
            "log_z_is": log_z,
            "ess": ess,
            "ess_fraction": ess_fraction,
            "val_gain_nats": val_gain,
            "train_gain_nats": train_gain,
            "num_samples": int(k),
            "val_fd": val_fd,
            "val_precision": val_precision,
        }

    def _what_the_phases_add(self) -> dict[str, Any]:
        """Held-out gain and FD of the initialized model (the GMM start), of the warmed-up flow (the energy's base)
        and of the best alternating-phase checkpoint by gain: what the warm-up and then the energy add."""
        history = {h["step"]: h for h in self.state.history}
        warmup = self.state.warmup_steps or 0
        alternating = [h for step, h in history.items() if step > warmup and math.isfinite(h["val_gain_nats"])]
        picks = {
            "start": history.get(0),
            "base": history.get(warmup),
            "energy": max(alternating, key=lambda h: h["val_gain_nats"]) if alternating else None,
        }
        return {
            "phases": {
                name: None if h is None else {k: h.get(k) for k in ("step", "val_gain_nats", "val_fd", "val_precision", "ess_fraction")}
                for name, h in picks.items()
            },
            "phases_note": (
                "held-out gain (nats) and latent FD of the sampler at step 0 (start), at the end of the warm-up "
                "(base: the flow that the energy corrects) and at the alternating-phase checkpoint with the "
                "highest held-out gain (energy); energy minus base is what the energy adds"
            ),
        }

    def _evaluate_candidate(self) -> dict[str, Any]:
        result = self.evaluate(self.config.eval_samples)
        self.state.history.append(result)
        selection.offer(self.state, result, self.selection_config, has_validation=len(self.val_idx) > 0)
        return result

    # -- training -------------------------------------------------------------------------------
    def _warmup_step(self, z_pos: torch.Tensor) -> dict[str, float]:
        """One maximum-likelihood step of the sampler alone: minimize −E_data[log q(z_pos)] (nats)."""
        self.opt_sampler.zero_grad(set_to_none=True)
        nll = -self.flow.log_prob(z_pos).mean()
        nll.backward()
        stats = all_reduce_grads_and_stats(list(self.flow.parameters()), nll.detach().reshape(1).float(), self.acc)
        grad_norm = _clip(self.flow.parameters(), self.config.clip_grad_norm)
        measured = {"sampler_loss": float(stats[0]), "forward_kl": float(stats[0]), "sampler_grad_norm": float(grad_norm)}
        self._check_divergence(measured)
        # The energy and the log Z bound are not part of the warm-up: NaN (a gap in metrics.csv and its plots).
        out = {k: float("nan") for k in STAT_KEYS} | measured
        self.opt_sampler.step()
        self.ema.update(self.flow)
        return out

    def _end_warmup(self) -> None:
        """Freeze the warmed-up (EMA) sampler as the energy's base and restart the sampler from it, so
        that at the first alternating step q = q_base = p (E_res ≈ 0) and the game starts at equilibrium.
        A mixture base first gets its maximum-likelihood weights (`Flow.refit_mixture_weights`), so that no
        component that the latents have left keeps drawing samples."""
        if self.state.warmup_steps > 0 and self.ema.module.base_components > 1:
            self.ema.module.refit_mixture_weights(self._initialization_draws(self.config.seed + SEEDS.mixture_refit))
            broadcast_module(self.ema.module, self.acc)
        if hasattr(self.energy, "base"):
            self.energy.base.load_state_dict(self.ema.module.state_dict())
        self.flow.load_state_dict(self.ema.module.state_dict())
        self._note_shared_basis()
        if self.is_main and self.state.warmup_steps > 0:
            self._warn_if_not_invertible()

    def _note_shared_basis(self) -> None:
        """Whether the energy's flow base and the sampler share their principal basis (subspace flows: the base is
        the warmed-up sampler), so that the sampler loss may hand the base its whitened coordinates; after every
        change of either network's buffers (the end of the warm-up, a resume)."""
        from latent_prior.sampling import shares_basis

        self.shared_basis = shares_basis(self.energy, self.flow)

    @torch.no_grad()
    def _warn_if_not_invertible(self, n: int = 512) -> None:
        """A flow whose sampling direction overflows (seen on nearly low-rank latents) gives samples and
        log-densities that disagree with its inverse; say so once, at the end of the warm-up."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed + SEEDS.invertibility_check)
        z, log_q = self.ema.module.sample_and_log_prob(n, generator=gen)
        gap = (log_q - self.ema.module.log_prob(z)).abs()
        if bool(torch.isfinite(gap).all()) and float(gap.median()) < 0.1:
            return
        logger.warning(
            f"latent-prior fit: warning: after the warm-up the sampler flow is numerically unstable (its samples and its "
            f"inverse disagree by a median {float(gap.nan_to_num(float('inf')).median()):.3g} nats; largest |z| "
            f"{float(z.abs().nan_to_num(float('inf')).max()):.3g}), so its samples and log Z are unreliable; try a lower "
            "--lr-sampler, fewer --flow-blocks, or --flow-kind spline."
        )

    def _set_learning_rates(self) -> None:
        """Cosine decay by step (a function of the step alone, so a resumed run gets the same rates)."""
        c = self.config
        progress = min(1.0, self.state.step / max(1, c.steps - 1))
        factor = c.lr_final_fraction + (1 - c.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        for opt, lr in ((self.opt_energy, c.lr_energy), (self.opt_sampler, c.lr_sampler)):
            for group in opt.param_groups:
                group["lr"] = lr * factor * group.get("lr_scale", 1.0)

    def _step(self, stream: BatchStream) -> dict[str, float]:
        c = self.config
        self._set_learning_rates()
        mean, logvar = stream.next()
        z_pos = posterior_draw(mean, logvar, self.generator, normalization=self.norm, device=self.device)
        n = len(z_pos)
        if self.state.step < self.state.warmup_steps:
            return self._warmup_step(z_pos)

        # sampler updates; the energy's parameters take no gradient here
        self.energy.requires_grad_(False)
        sampler_parts: dict[str, torch.Tensor] = {}
        sampler_grad_norm = torch.zeros((), device=self.device)
        for _ in range(c.sampler_steps_per_energy_step):
            self.opt_sampler.zero_grad(set_to_none=True)
            loss, sampler_parts, z_neg = sampler_loss(
                self.energy,
                self.flow,
                n,
                kl_weight=c.kl_weight,
                forward_kl_weight=c.forward_kl_weight,
                z_pos=z_pos,
                generator=self.generator,
                autocast=self.autocast,
                shared_basis=self.shared_basis,
            )
            loss.backward()
            stats = torch.stack([sampler_parts[k] for k in ("sampler_loss", "log_z_bound", "forward_kl")]).float()
            stats = all_reduce_grads_and_stats(list(self.flow.parameters()), stats, self.acc)
            sampler_parts = dict(zip(("sampler_loss", "log_z_bound", "forward_kl"), stats))
            sampler_grad_norm = _clip(self.flow.parameters(), c.clip_grad_norm)
            self._check_divergence({**{k: float(v) for k, v in sampler_parts.items()}, "sampler_grad_norm": float(sampler_grad_norm)})
            self.opt_sampler.step()
            self.ema.update(self.flow)
        self.trainable_energy.requires_grad_(True)

        # energy update on fresh posterior draws vs the last sampler update's own samples, detached: drawing new
        # ones from the updated flow cost 10 % of an alternating step, for samples one Adam step apart.
        self.opt_energy.zero_grad(set_to_none=True)
        loss, parts = energy_loss(
            self.trainable_energy,
            z_pos,
            z_neg,
            magnitude_penalty=c.energy_magnitude_penalty,
            grad_penalty=c.grad_penalty,
            wgan_gp_weight=c.wgan_gp_weight,
            generator=self.generator,
            autocast=self.autocast,
        )
        loss.backward()
        keys = ("e_pos", "e_neg", "energy_loss", "max_abs_energy")
        stats = all_reduce_grads_and_stats(
            list(self.trainable_energy.parameters()), torch.stack([parts[k] for k in keys]).float(), self.acc
        )
        parts = dict(zip(keys, stats))
        energy_grad_norm = _clip(self.trainable_energy.parameters(), c.clip_grad_norm)
        out = {k: float(v) for k, v in {**sampler_parts, **parts}.items()}
        out["energy_grad_norm"], out["sampler_grad_norm"] = float(energy_grad_norm), float(sampler_grad_norm)
        self._check_divergence(out)  # before the update: a NaN step never reaches the weights
        self.opt_energy.step()
        return out

    def _check_divergence(self, stats: dict[str, float]) -> None:
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        what = None
        if bad:
            what = f"non-finite {', '.join(bad)}"
        elif stats.get("max_abs_energy", 0.0) > self.config.divergence_threshold:
            what = f"|E| reached {stats['max_abs_energy']:.3g} nats (> --divergence-threshold {self.config.divergence_threshold:g})"
        if what is None:
            return
        ckpts = checkpoint_dirs(self.ckpt_root)
        last = f"the last good checkpoint is {ckpts[-1][1]}" if ckpts else "no checkpoint was written yet"
        raise RunFailed(
            f"training diverged at step {self.state.step + 1} ({what}); {last}. Try a lower --lr-energy / --lr-sampler "
            f"(now {self.config.lr_energy:g} / {self.config.lr_sampler:g}) or a larger --energy-magnitude-penalty / --grad-penalty "
            f"(now {self.config.energy_magnitude_penalty:g} / {self.config.grad_penalty:g}), then rerun with --resume."
        )

    def train(self, resume_from: Path | None) -> None:
        c = self.config
        self.ema = EMA(self.flow, c.ema_decay)  # replaced by the checkpoint's EMA on resume
        if resume_from is None:
            self._initialize_flow()
            self.ema = EMA(self.flow, c.ema_decay)
        else:
            self.load_checkpoint(resume_from)
        if self.state.warmup_steps is None:
            self.state.warmup_steps = min(c.warmup_steps, c.steps // 2)
            if self.state.warmup_steps == 0:
                self._end_warmup()
        metrics = MetricsCSV(self.train_dir / "metrics.csv", self.state.step if resume_from else None) if self.is_main else None
        if self.state.step == 0 and not self.state.history:
            # The initialized model is the first candidate: with an EM-initialized base, the GMM itself.
            result = self._evaluate_candidate()
            if metrics is not None:
                metrics.append({**{k: result[k] for k in EVAL_KEYS}, "step": 0, "epoch": 0, "seconds": 0.0})
            self._log_sample_grid()
            self.save_checkpoint()
        if self.state.step >= c.steps or self.state.stopped_early:
            return
        stream = BatchStream(
            self.source,
            self.train_idx,
            c.batch_size,
            seed=c.seed,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=c.num_workers,
            epoch=self.state.epoch,
            batch_in_epoch=self.state.batch_in_epoch,
        )
        bar = None
        if self.is_main and not c.quiet:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.state.step, desc="fit", dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        window_n = 0
        start = time.perf_counter() - self.state.seconds
        try:
            while self.state.step < c.steps:
                stats = self._step(stream)
                self.state.step += 1
                self.state.epoch, self.state.batch_in_epoch = stream.epoch, stream.batch_in_epoch
                self.state.seconds = time.perf_counter() - start
                for k in STAT_KEYS:
                    window[k] = window.get(k, 0.0) + stats[k]
                window_n += 1
                row: dict[str, Any] | None = None
                evaluate = self.state.step % c.checkpoint_every == 0 or self.state.step == c.steps
                if self.state.step == self.state.warmup_steps:
                    # The warmed-up flow with E_res ≈ 0 is itself a candidate prior: evaluate and keep it, so
                    # selection can fall back to it if the alternating phase does not improve on it.
                    self._end_warmup()
                    evaluate = True
                if self.state.step % c.log_every == 0 or evaluate:
                    # flushed at checkpoints too, so a resumed run logs the same averages
                    row = {k: v / window_n for k, v in window.items()}
                    window, window_n = {}, 0
                if evaluate:
                    result = self._evaluate_candidate()
                    row = {**(row or {}), **{k: result[k] for k in EVAL_KEYS}}
                    self._log_sample_grid()
                if row is not None:
                    row.update(
                        step=self.state.step,
                        epoch=self.state.epoch,
                        seconds=round(self.state.seconds, 3),
                        lr_sampler=float(self.opt_sampler.param_groups[0]["lr"]),
                    )
                    if metrics is not None:
                        metrics.append(row)
                    if self.tracking:
                        self.acc.log({k: v for k, v in row.items() if isinstance(v, float) and math.isfinite(v)}, step=self.state.step)
                    if bar is not None:
                        bar.set_postfix(
                            {k: f"{row[k]:.3g}" for k in ("e_pos", "e_neg", "log_z_bound", "val_gain_nats") if k in row}, refresh=False
                        )
                if evaluate:
                    self.save_checkpoint()
                    if self.state.stopped_early:
                        if self.is_main:
                            logger.info(
                                f"latent-prior fit: early stop at step {self.state.step}: no better candidate (--select-by "
                                f"{self.selection_config.select_by}) in {c.early_stop_patience} evaluations."
                            )
                        break
                if bar is not None:
                    bar.update(1)
        finally:
            stream.close()
            if bar is not None:
                bar.close()

    # -- export ---------------------------------------------------------------------------------
    def export(self, source_description: str) -> dict[str, Any]:
        """Load the selected checkpoint, estimate log Ẑ, write the LatentPrior to `out/prior`; returns the summary."""
        from latent_prior import __version__
        from latent_prior.prior import LatentPrior

        s = self.state
        chosen_step = s.best_step if s.best_step is not None else s.step
        chosen = self.ckpt_root / f"{STEP_PREFIX}{chosen_step:07d}"
        if chosen_step != s.step:
            self.energy.load_state_dict(load_tensors(chosen / "energy.safetensors", self.device))
            self.ema.module.load_state_dict(load_tensors(chosen / "flow_ema.safetensors", self.device))
        result = self.evaluate(self.config.log_z_samples)
        summary = {
            "steps": s.step,
            "seconds": round(s.seconds, 2),
            "selected_step": chosen_step,
            "base_components": self.base_components,
            "base_em_seed": self._base_em_seed(),
            "base_em_starts": None if self.base_gmm is None else self.base_gmm.n_init,
            "base_choice": self.base_choice,
            "select_by": self.selection_config.select_by,
            "selection": selection.describe(self.selection_config, has_validation=len(self.val_idx) > 0),
            "reference": s.reference,
            "stopped_early": s.stopped_early,
            "log_z": result["log_z_is"],
            "log_z_ess": result["ess"],
            "log_z_ess_fraction": result["ess_fraction"],
            "log_z_samples": result["num_samples"],
            "heldout_gain_nats": result["val_gain_nats"],
            "heldout_fd": result["val_fd"],
            "heldout_precision": result["val_precision"],
            "train_gain_nats": result["train_gain_nats"],
            **self._what_the_phases_add(),
            "latent_dims": math.prod(self.shape),
            "num_train": int(len(self.train_idx)),
            "num_validation": int(len(self.val_idx)),
            "world_size": self.world_size,
            "note": "gains are estimates: log Z is replaced by an importance-sampling estimate, biased low, so they are optimistic",
        }
        summary["heldout_gain_bits_per_latent_dim"] = summary["heldout_gain_nats"] / (summary["latent_dims"] * math.log(2))
        # The usual ELBO bits/dim divides by the image's dimensions, known when the cache records them.
        data_dims = latent_data_dims(self.source)
        if data_dims is not None:
            summary["data_dims"] = data_dims
            summary["heldout_gain_bits_per_data_dim"] = summary["heldout_gain_nats"] / (data_dims * math.log(2))
        if self.is_main and result["ess_fraction"] < self.config.min_ess_fraction:
            logger.warning(
                f"latent-prior fit: warning: the final log Z estimate has ESS {result['ess']:.0f} of {result['num_samples']} "
                f"({100 * result['ess_fraction']:.2f}%), so log Z, log_prob and the gains are unreliable; the sampler does not "
                "cover the energy model yet: train longer, raise --flow-blocks / --flow-hidden / --flow-channels, or "
                "--energy-magnitude-penalty."
            )
        if s.best_step is None and len(self.val_idx) and self.is_main:
            logger.warning(
                f"latent-prior fit: warning: no checkpoint reached --min-ess-fraction {self.config.min_ess_fraction:g}, so the "
                "last one is exported and its log Z estimate is unreliable; train longer or give the sampler more capacity."
            )
        if self.is_main:
            training = {
                "config": to_dict(self.config),
                "latents": source_description,
                "world_size": self.world_size,
                "mixed_precision": self.config.mixed_precision,
                "device": str(self.device),
                "torch_version": torch.__version__,
                "latent_prior_version": __version__,
                "summary": summary,
                "history": s.history,
                "validation_items": [int(i) for i in self.val_idx],  # the held-out split, for eval and the report
            }
            prior = LatentPrior(
                copy.deepcopy(self.energy).eval(),
                copy.deepcopy(self.ema.module).eval(),
                latent_shape=self.shape,
                normalization=self.norm,
                log_z=result["log_z_is"],
                log_z_info={
                    "ess": result["ess"],
                    "ess_fraction": result["ess_fraction"],
                    "num_samples": result["num_samples"],
                    "proposal": "EMA sampler flow",
                    "estimate": "importance sampling, biased low",
                },
                provenance=self.source.provenance,
                training=training,
            )
            prior.save_pretrained(self.out / PRIOR_DIR)
            atomic_write_json(self.train_dir / "fit_summary.json", summary)
        self.acc.wait_for_everyone()
        return summary


def _clip(params: Any, max_norm: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
