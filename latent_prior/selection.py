"""Model selection: which evaluated checkpoint a fit exports.

The trainer resolves the rule once (`resolve`: select_by="auto" by the flow kind) and offers every evaluation (a
dict with val_gain_nats, val_fd, val_precision, ess_fraction, step) to `offer`, which updates the run's selection
state (best_step, best_value, reference, evals_since_best, stopped_early of `checkpoints.RunState`). `replay` runs the
same rule over a finished fit's recorded history, so another rule's choice can be read off one fit
(bench.selection_rules), and `describe` words the rule for the fit summary. The rules (`FitConfig.select_by`):

* gain_and_fd: the lowest held-out FD among the checkpoints at least as good as the first candidate (step 0, the
  GMM start) on held-out gain and FD, with k-NN precision at most PRECISION_TOLERANCE below it;
* gain_within_fd: the highest held-out gain among the checkpoints passing the same guards, with an FD up to
  `select_fd_tolerance` worse than the first candidate's;
* gain: the highest held-out gain;
* auto (default): gain_within_fd for the subspace flow (latents of more than SUBSPACE_MIN_DIMS dims), gain_and_fd
  for the others (AUTO_RULES). Above SUBSPACE_MIN_DIMS the validation split usually holds fewer items than the
  latents have dims, and its FD is mostly the floor of an estimate from so few items (two samples of the training
  latents themselves are 90 % of the start's figure apart on the photo cells), so a relative tolerance on it is a
  loose guard and the held-out likelihood chooses; on photos-16 and photos-c32 that exported checkpoints with a
  better decoded FID at an equal or better test FD, while on the flat cells gain_and_fd is the better rule
  (docs/prior-development.md, eighth session).

All of them require an ESS fraction of the log Z estimate of at least `min_ess_fraction`; without a validation
split the last checkpoint wins.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from latent_prior.checkpoints import RunState, checkpoint_dirs
from latent_prior.config import from_dict
from latent_prior.fit_config import PRECISION_TOLERANCE, FitConfig
from latent_prior.prior import CONFIG_FILE, PRIOR_DIR, TRAIN_DIR

#: select_by="auto": the rule for a flow kind (`Trainer._flow_kind`); every other kind gets AUTO_DEFAULT
AUTO_RULES = {"subspace": "gain_within_fd"}
AUTO_DEFAULT = "gain_and_fd"


def resolve(config: FitConfig, flow_kind: str) -> FitConfig:
    """`config` with select_by="auto" replaced by the rule for a fit whose flow is `flow_kind` (AUTO_RULES);
    any other select_by is returned as it is."""
    if config.select_by != "auto":
        return config
    return dataclasses.replace(config, select_by=AUTO_RULES.get(flow_kind, AUTO_DEFAULT))


def _resolved(config: FitConfig) -> FitConfig:
    if config.select_by == "auto":
        raise ValueError('select_by="auto" depends on the flow kind: pass selection.resolve(config, flow_kind)')
    return config


def offer(state: RunState, result: dict[str, Any], config: FitConfig, has_validation: bool) -> None:
    """Judge the evaluation `result` of the checkpoint at `state.step` and update `state`'s selection fields
    (`config` resolved: `resolve`)."""
    s, c = state, _resolved(config)
    gain, fd = result["val_gain_nats"], result.get("val_fd", float("nan"))
    precision = result.get("val_precision", float("nan"))
    # A flow-based energy's warm-up candidates are priors too (the EMA flow alone); the paper's form is not
    # a prior before its energy has trained.
    eligible = c.energy_base == "flow" or s.step >= (s.warmup_steps or 0)
    if not has_validation:
        value = float(s.step)
    elif c.select_by == "gain":
        value = gain
        eligible = eligible and math.isfinite(gain) and result["ess_fraction"] >= c.min_ess_fraction
    else:
        # gain_and_fd: the lowest FD among the checkpoints that match the start; gain_within_fd: the highest gain
        # among those whose FD is at most select_fd_tolerance worse (a validation FD is noisy, and may disagree
        # with other held-out latents where training gains much likelihood and precision).
        value = gain if c.select_by == "gain_within_fd" else -fd
        fd_allowance = 1 + c.select_fd_tolerance if c.select_by == "gain_within_fd" else 1.0
        eligible = eligible and math.isfinite(gain) and math.isfinite(fd) and result["ess_fraction"] >= c.min_ess_fraction
        if eligible and s.reference is None:
            s.reference = {"step": s.step, "val_gain_nats": gain, "val_fd": fd, "val_precision": precision}
        # Never worse than the first candidate, the GMM that the base started as: on likelihood and on samples,
        # both their spread (FD) and their sharpness (precision; a NaN, from too few held-out items, never blocks).
        ref_precision = s.reference.get("val_precision", float("nan")) if s.reference else float("nan")
        eligible = (
            eligible
            and gain >= s.reference["val_gain_nats"]
            and fd <= s.reference["val_fd"] * fd_allowance
            and not precision < ref_precision - PRECISION_TOLERANCE
        )
    if eligible and (s.best_value is None or value > s.best_value):
        s.best_step, s.best_value, s.evals_since_best = s.step, value, 0
    elif s.step > (s.warmup_steps or 0):
        # Only the alternating phase's evaluations count towards early stopping: the warm-up is the energy's base,
        # and a fit stopped inside it would never train the energy.
        s.evals_since_best += 1
    if has_validation and patience_spent(s, c):
        s.stopped_early = True


def patience_spent(state: RunState, config: FitConfig) -> bool:
    """Whether `config.early_stop_patience` (0: never) evaluations of the alternating phase have passed without a
    better candidate: where `offer` stops a fit, and what a resume under another patience re-decides."""
    return bool(config.early_stop_patience) and state.evals_since_best >= config.early_stop_patience


def replay(history: list[dict[str, Any]], config: FitConfig, warmup_steps: int) -> int | None:
    """The step that `config`'s rule (resolved: `resolve`) selects from a fit's evaluations
    (`LatentPrior.training_info["history"]`, in order; the fit's own warm-up length), or None when no checkpoint is
    eligible (the fit then exports its last). `replay_state` gives the whole selection state."""
    return replay_state(history, config, warmup_steps).best_step


def replay_state(history: list[dict[str, Any]], config: FitConfig, warmup_steps: int) -> RunState:
    """The selection fields of a RunState after `offer` judged `history` in order (its `step`: the last evaluation
    judged). Where the rule would have stopped early, later evaluations are ignored; a history that the fit's own rule
    cut short by early stopping holds nothing after that point."""
    state = RunState(warmup_steps=warmup_steps)
    for result in history:
        state.step = int(result["step"])
        offer(state, result, config, has_validation=True)
        if state.stopped_early:
            break
    return state


def replay_run(out: str | Path, **rule: Any) -> int:
    """The step that the finished fit in `out` (its prior/ and train/checkpoints/) exports under its own config with
    the selection fields `rule` (select_by=..., select_fd_tolerance=...) instead; the last kept step where no
    checkpoint is eligible. That checkpoint is kept only where the fit kept them all (keep_checkpoints)."""
    out = Path(out)
    saved = out / PRIOR_DIR / CONFIG_FILE
    prior_config = json.loads(saved.read_text())
    training = prior_config["training"]
    config = dataclasses.replace(from_dict(FitConfig, training["config"], f"{saved}: training config"), **rule)
    config = resolve(config, prior_config["flow"]["kind"])
    last_step, last = checkpoint_dirs(out / TRAIN_DIR / "checkpoints")[-1]
    warmup = json.loads((last / "state.json").read_text())["warmup_steps"] or 0
    history = [h for h in training["history"] if math.isfinite(h.get("val_gain_nats", float("nan")))]
    chosen = replay(history, config, warmup)
    return last_step if chosen is None else chosen


def describe(config: FitConfig, has_validation: bool) -> str:
    """The rule in words, for the fit summary (`config` resolved: `resolve`)."""
    c = _resolved(config)
    if not has_validation:
        return "last checkpoint (no validation split)"
    if c.select_by == "gain":
        return f"highest held-out ELBO gain estimate among checkpoints with ESS fraction >= {c.min_ess_fraction:g}"
    if c.select_by == "gain_within_fd":
        return (
            f"highest held-out ELBO gain among checkpoints with ESS fraction >= {c.min_ess_fraction:g} whose held-out gain "
            f"is at least the first candidate's, FD at most {1 + c.select_fd_tolerance:g} times its FD, and precision at "
            f"most {PRECISION_TOLERANCE:g} below it (step 0, the initialized model)"
        )
    return (
        "lowest held-out latent FD of the sampler among checkpoints with ESS fraction >= "
        f"{c.min_ess_fraction:g} whose held-out gain and FD are at least as good as the first candidate's, and precision "
        f"at most {PRECISION_TOLERANCE:g} below it "
        "(step 0, the initialized model: with an EM-initialized base, the GMM fitted to the training latents)"
    )
