"""The EVaLP fits a benchmark runs: FitConfig defaults with a seed, overrides and variants from the command line,
and the short fits of --quick.

    prior, seconds, summary = fit_evalp(lset, workdir, "evalp-seed0", {"seed": 0})
    parse_variants(("fkl1:forward_kl_weight=1.0",))   # {"fkl1": {"forward_kl_weight": 1.0}}
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from bench.datasets import LatentSet
from latent_prior.errors import LatentPriorError

#: --quick: FitConfig fields for a smoke run (a few seconds per fit).
QUICK_FIT = dict(steps=120, batch_size=128, checkpoint_every=60, eval_samples=512, eval_latents=512, log_z_samples=2048)
QUICK_SPATIAL_STEPS = 40  # --quick on C×H×W sets


def fit_evalp(lset: LatentSet, workdir: Path, key: str, overrides: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
    """Fit an EVaLP prior on the set's training moments (fresh posterior draws each step) with FitConfig defaults
    and `overrides`, into workdir/fit-<key>; returns (prior, wall seconds, the fit summary)."""
    from latent_prior.train import fit

    path = workdir / f"{lset.name}-train.safetensors"
    if not path.exists():
        lset.save_train(path)
    start = time.perf_counter()
    prior = fit(str(path), out=str(workdir / f"fit-{key}"), quiet=True, **overrides)
    seconds = time.perf_counter() - start
    summary = dict(prior.training_info.get("summary", {}))
    return prior, seconds, summary


def parse_overrides(items: Any, what: str) -> dict[str, Any]:
    """["k=v", "k2=v2"] or "k=v,k2=v2" -> {k: typed v}, checked against FitConfig's fields (`what` names the flag)."""
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
        if key in ("latents", "out", "seed"):
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


def parse_variants(variants: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """("LABEL:key=value,key=value", ...) -> {LABEL: FitConfig overrides}."""
    out: dict[str, dict[str, Any]] = {}
    for spec in variants:
        label, sep, rest = spec.partition(":")
        label = label.strip()
        if not sep or not label or not all(c.isalnum() or c in "-_." for c in label):
            raise LatentPriorError(
                f"--variants {spec}: write LABEL:key=value,key=value with a label of letters, digits, "
                "'-', '_' or '.', e.g. fkl1:forward_kl_weight=1.0."
            )
        if label in out:
            raise LatentPriorError(f"--variants {spec}: the label {label!r} is given twice.")
        out[label] = parse_overrides(rest, f"--variants {spec}:")
    return out
