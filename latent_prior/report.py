"""The report of a `latent-prior fit` run: training curves, held-out metrics, report.md and report.json.

* `plot_training(metrics_csv, png)`: the trainer's metrics.csv as curves (energies, sampler loss, the
  log Z bound, gradient norms, held-out gain and ESS at the evaluations), matplotlib's Agg backend.
* `heldout_metrics(prior, source, heldout, train)`: the Gaussian, GMM and EVaLP priors side by side
  (`latent_prior.evaluate.latent_report`), plus its markdown table.
* `write_report(run_dir, facts)`: report.json (every fact) and report.md (for people).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from latent_prior.files import atomic_write_text

__all__ = ["plot_training", "heldout_metrics", "write_report", "read_metrics_csv"]

#: Panels of training.png: (title, y label, [(column, legend label)], log scale?).
_PANELS: tuple[tuple[str, str, tuple[tuple[str, str], ...], bool], ...] = (
    ("energies", "E (nats)", (("e_pos", "E_pos (data)"), ("e_neg", "E_neg (sampler)")), False),
    ("sampler", "nats", (("sampler_loss", "sampler loss"), ("forward_kl", "forward KL term −E_data[log q]")), False),
    ("log Z", "nats", (("log_z_bound", "log Z lower bound (sampler)"), ("log_z_is", "log Ẑ (importance sampling)")), False),
    ("gradient norms", "‖∇‖ before clipping", (("energy_grad_norm", "energy"), ("sampler_grad_norm", "sampler")), True),
    ("ELBO gain over N(0, I)", "nats (estimate)", (("val_gain_nats", "held-out"), ("train_gain_nats", "train")), False),
    ("importance sampling", "ESS / samples", (("ess_fraction", "ESS fraction"),), True),
)


def read_metrics_csv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """metrics.csv -> {column: float array} (empty cells are NaN); "step" is always present."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    columns: dict[str, np.ndarray] = {}
    names = rows[0].keys() if rows else ["step"]
    for name in names:
        values = []
        for row in rows:
            try:
                values.append(float(row.get(name) or "nan"))
            except ValueError:
                values.append(float("nan"))
        columns[name] = np.asarray(values, dtype=np.float64)
    return columns


def plot_training(metrics_csv: str | os.PathLike, png: str | os.PathLike, selected_step: int | None = None) -> Path:
    """Draw the curves of a fit's metrics.csv into `png` (one panel per figure of _PANELS); returns the path.

    Columns the CSV lacks are skipped; evaluation-only columns (held-out gain, log Ẑ, ESS) are drawn as
    points at the evaluation steps. `selected_step` (the exported checkpoint) is marked with a dotted line.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; a no-op when a backend is already chosen
    import matplotlib.pyplot as plt

    data = read_metrics_csv(metrics_csv)
    steps = data["step"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (title, ylabel, series, log_scale) in zip(axes.flat, _PANELS):
        drawn = 0
        for column, label in series:
            if column not in data:
                continue
            y = data[column]
            ok = np.isfinite(y) & np.isfinite(steps) & ((y > 0) if log_scale else True)
            if not ok.any():
                continue
            sparse = ok.sum() < 0.5 * np.isfinite(steps).sum()  # only at evaluations
            ax.plot(steps[ok], y[ok], marker="o" if sparse else None, markersize=4, label=label)
            drawn += 1
        if selected_step is not None and drawn:
            ax.axvline(
                selected_step, color="grey", linestyle=":", linewidth=1, label="exported checkpoint" if title.startswith("ELBO") else None
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if drawn:
            if log_scale:
                ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle("latent-prior fit: training curves (metrics.csv)")
    png = Path(png)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def heldout_metrics(prior: Any, source: Any, heldout: np.ndarray, train: np.ndarray, **options: Any) -> tuple[dict[str, Any], str]:
    """Gaussian / GMM / EVaLP against posterior draws of the held-out items (normalized latent space).

    options: `latent_prior.evaluate.latent_report`'s (samples=2000, seed=0, methods: gaussian, gmm and evalp,
    progress=False, ...). Returns (`latent_report`'s dict, its markdown table).
    """
    from latent_prior.evaluate import latent_report, latent_table_markdown

    result = latent_report(prior, source, np.asarray(heldout), np.asarray(train), **options)
    return result, latent_table_markdown(result)


# ----------------------------------------------------------------------------------------------
# report.md / report.json


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN); numpy scalars -> Python numbers; tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec) if math.isfinite(value) else "n/a"
    return "n/a" if value is None else str(value)


def _fit_section(s: dict[str, Any]) -> list[str]:
    lines = [
        f"- steps: {s.get('steps')} in {_fmt(s.get('seconds'), '.0f')} s "
        f"({_fmt(s['steps'] / s['seconds'] if s.get('seconds') else float('nan'), '.2f')} steps/s), "
        f"{s.get('world_size', 1)} process(es); exported checkpoint: step {s.get('selected_step')} ({s.get('selection', '')})",
        f"- log Ẑ ≈ {_fmt(s.get('log_z'))} nats, an importance-sampling estimate with the sampler as proposal "
        f"(K = {s.get('log_z_samples')}, ESS {_fmt(s.get('log_z_ess'), '.0f')} = "
        f"{_fmt(100 * (s.get('log_z_ess_fraction') or float('nan')), '.2f')}%)",
    ]
    gain = s.get("heldout_gain_nats")
    bits = s.get("heldout_gain_bits_per_data_dim")
    per = "bits/dim (image)"
    if bits is None:
        bits, per = s.get("heldout_gain_bits_per_latent_dim"), "bits/latent-dim"
    lines.append(
        f"- held-out ELBO gain over the N(0, I) prior ≈ {_fmt(gain, '+.3f')} nats per image = {_fmt(bits, '+.5f')} {per} "
        f"(train: {_fmt(s.get('train_gain_nats'), '+.3f')} nats)"
    )
    lines.append(
        "- These are estimates: log Z is replaced by an importance-sampling estimate, which is biased low, so the gains "
        "are optimistic; a low ESS makes them unreliable."
    )
    if s.get("stopped_early"):
        lines.append(
            "- The fit stopped early (no better candidate by --select-by's rule in --early-stop-patience evaluations of the alternating phase)."
        )
    return lines


def _markdown(facts: dict[str, Any]) -> str:
    c = facts["config"]
    vae = facts.get("vae") or {}
    provenance = vae.get("provenance") or {}
    cache = facts.get("cache") or {}
    lat = facts.get("latents") or {}
    out = [
        "# latent-prior fit report",
        "",
        f"Run folder `{facts['run_dir']}`: VAE `{c.get('vae') or 'default (embedded digits VAE)'}`, data "
        f"`{c.get('data') or 'bundled digits'}`, {cache.get('count')} images at {cache.get('resolution')} px, "
        f"latents {tuple(cache.get('latent_shape') or ())}.",
        "",
        "## Samples",
        "",
        f"Left: {facts['samples']['n_per_half']} decodes of N(0, I) latents (the VAE's own prior); right: as many decodes of "
        f"EVaLP latents (method `{facts['samples']['method']}`), seed {facts['samples']['seed']}.",
        "",
        "![samples: N(0, I) prior | EVaLP prior](samples.png)",
        "",
        "## Held-out metrics",
        "",
    ]
    if lat.get("metrics_on_training_latents"):
        out += [
            "**Warning: no held-out split (--validation-fraction 0), so these are measured on the TRAINING latents "
            "(optimistic, for every prior).**",
            "",
        ]
    else:
        out += [
            f"Measured on the {lat.get('heldout')} latents of the fit's validation split (images the prior never saw; "
            f"the GMM is fitted to the {lat.get('train')} training latents).",
            "",
        ]
    out += [
        facts.get("metrics_table", "").rstrip(),
        "",
    ]
    if lat.get("include_flips"):
        out += ["Note: with --flip the flipped copy of a held-out image may be among the training latents.", ""]
    out += ["## Fit", "", *_fit_section(facts["fit_summary"]), "", "![training curves](train/training.png)", ""]
    out += [
        "## VAE provenance",
        "",
        f"- source: `{provenance.get('source')}` ({provenance.get('class_name')}), subfolder {provenance.get('subfolder')!r}, "
        f"revision {provenance.get('revision')!r}",
        f"- config hash `{provenance.get('config_hash')}`, weights fingerprint `{provenance.get('fingerprint')}`",
        f"- encoder dtype {cache.get('dtype')} (computed in {cache.get('compute_dtype')}), deterministic encoder: "
        f"{vae.get('deterministic')}",
        f"- normalization: `{json.dumps(vae.get('normalization'))}`",
        f"- data: `{cache.get('data')}`",
        "",
        "## Seeds",
        "",
        *[f"- {k.replace('_', ' ')}: {v}" for k, v in facts["seeds"].items()],
        "",
        "## Timings",
        "",
        "| stage | seconds | |",
        "|---|---:|---|",
        *[
            f"| {name} | {_fmt(t['seconds'], '.1f')} | {'reused from an earlier invocation' if t.get('reused') else ''} |"
            for name, t in facts["timings"].items()
        ],
        "",
        f"{facts.get('world_size', 1)} process(es) on {facts.get('device')}.",
        "",
        "## Versions",
        "",
        *[f"- {k} {v}" for k, v in facts["versions"].items()],
        "",
        "## Files",
        "",
        "- [samples.png](samples.png), [prior/](prior/) (`LatentPrior.from_pretrained`), [train/](train/) (checkpoints, metrics.csv, "
        "[training.png](train/training.png)), "
        "[cache/](cache/), [log.txt](log.txt), [config.json](config.json), [report.json](report.json)",
        "",
        "## Effective config",
        "",
        "```json",
        json.dumps(c, indent=2),
        "```",
        "",
    ]
    return "\n".join(out)


def write_report(run_dir: str | os.PathLike, facts: dict[str, Any]) -> tuple[Path, Path]:
    """Write run_dir/report.json (every fact, NaN as null) and run_dir/report.md; returns both paths."""
    run_dir = Path(run_dir)
    data = {k: v for k, v in facts.items() if k != "metrics_table"}
    json_path, md_path = run_dir / "report.json", run_dir / "report.md"
    for path, text in ((json_path, json.dumps(_json_safe(data), indent=2) + "\n"), (md_path, _markdown(facts))):
        atomic_write_text(path, text)
    return md_path, json_path
