"""Does training improve on the start where model selection keeps the start? Every kept checkpoint of a default fit,
scored on held-out latents and decoded images.

A fit (`latent_prior.fit`, FitConfig defaults but the --fit overrides) of one cell's training latents is written to
--run (or read from it, when it holds one already); then the EMA sampler of every
checkpoint it kept is scored like the suite scores a prior: excess latent FD against held-out posterior draws
(--samples, 3,000 by default; the mean of 3 evaluations), and FID of --images decoded samples against as many held-out images (the
suite's Inception-v3 and image order). Beside them, the held-out figures that model selection saw (train/metrics.csv):
validation gain, FD, k-NN precision and the ESS of log Z.

    python -m bench.checkpoint_fid --set photos-16 --run /tmp/p16fit --fit checkpoint_every=125 --images 500
    python -m bench.checkpoint_fid --set default-vae --run /tmp/dvfit --fit keep_checkpoints=20 --images 297
    python -m bench.checkpoint_fid --set photos-16 --run /tmp/p16noise --noise 0.2 --steps 0,1000,2000
    python -m bench.checkpoint_fid --set photos-c32 --run /tmp/pc32s1 --seed 1 --steps 0,2000

--noise σ trains on noise-augmented latents, as TarFlow / STARFlow do: every training step's posterior draws (both
phases; not the held-out evaluations) get N(0, σ²I) added in the normalized latent space, so the prior models the
latents convolved with that noise. Each checkpoint is then also scored after one score step of the sampler's own
density, x ← x + σ²∇log q(x) (Tweedie's estimate of the clean latent), in a second row.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

EVALUATIONS = 3


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _number(row: dict[str, str], key: str) -> float:
    return float(row.get(key) or "nan")


@contextlib.contextmanager
def noise_augmented_training(sigma: float) -> Iterator[None]:
    """Within it, the posterior draws of every training step (`Trainer._step`, both phases) get N(0, σ²I) added (in
    the normalized space, drawn from the trainer's own generator, so a run is reproducible); the held-out
    evaluations still see clean draws. The trainer is restored on exit."""
    import latent_prior.trainer as trainer

    step, draw = trainer.Trainer._step, trainer.posterior_draw

    def noisy_draw(mean, logvar, generator=None, **kwargs):
        z = draw(mean, logvar, generator, **kwargs)
        return z + sigma * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)

    def noisy_step(self, stream):
        trainer.posterior_draw = noisy_draw
        try:
            return step(self, stream)
        finally:
            trainer.posterior_draw = draw

    trainer.Trainer._step = noisy_step
    try:
        yield
    finally:
        trainer.Trainer._step = step


def score_step(flow: torch.nn.Module, z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Tweedie's estimate of the clean latents of noisy samples z (N, *shape): z + σ²∇log q(z), in chunks."""
    parts = []
    for chunk in z.split(500):
        x = chunk.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
        parts.append((chunk + sigma**2 * grad).detach())
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_fid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="photos-16", help="a cell of the suite with a decoder (default-vae, photos, photos-16, ...)")
    parser.add_argument("--run", required=True, help="the fit's output folder: fitted here unless it holds prior/ already")
    parser.add_argument(
        "--fit", default="", help="FitConfig overrides of the fit, key=value,key=value (e.g. keep_checkpoints=20,lr_sampler=2e-4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the fit's seed (the evaluation's draws do not depend on it)")
    parser.add_argument("--noise", type=float, default=0.0, help="σ of noise on the training draws; also scores after a score step")
    parser.add_argument("--steps", default="", help="comma-separated checkpoint steps to score (default: every kept one)")
    parser.add_argument(
        "--samples", type=int, default=3000, help="sampler draws per latent FD, against as many held-out draws (3 evaluations)"
    )
    parser.add_argument("--images", type=int, default=500, help="decoded samples per checkpoint, against as many held-out images")
    parser.add_argument(
        "--cache-dir", default="runs/bench_prior", help="where the suite trains its VAEs once (python -m bench --cache-dir)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from bench.datasets import load_set
    from bench.fits import parse_overrides
    from bench.run import CellImages, heldout_image_features
    from latent_prior.checkpoints import load_tensors
    from latent_prior.image_metrics import (
        features_of,
        find_offline_inception,
        frechet_inception_distance,
        load_inception,
    )
    from latent_prior.metrics import frechet_distance
    from latent_prior.prior import LatentPrior
    from latent_prior.train import fit

    if args.samples < 2 or args.images < 2:
        parser.error(f"--samples {args.samples} --images {args.images}: give at least 2 of each")
    if args.noise < 0:
        parser.error(f"--noise {args.noise:g}: give σ >= 0 (0: no noise)")
    try:
        wanted = {int(v) for v in args.steps.split(",")} if args.steps else None
    except ValueError:
        parser.error(f"--steps {args.steps}: give comma-separated checkpoint steps, e.g. 0,1000,2000")
    overrides = parse_overrides(args.fit, "--fit")
    run = Path(args.run)
    fitted = (run / "prior").is_dir()
    if fitted:
        saved = run / "prior" / "config.json"
        try:
            fitted_seed = json.loads(saved.read_text())["training"]["config"]["seed"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--run {run}: {saved} is not a latent-prior fit's ({exc!r}); pass a new --run")
        if fitted_seed != args.seed:
            parser.error(f"--seed {args.seed}: {run} holds a fit with seed {fitted_seed}; pass --seed {fitted_seed} or a new --run")
    start = time.perf_counter()
    lset = load_set(args.set, cache_dir=args.cache_dir, verbose=False)
    if not fitted:
        run.mkdir(parents=True, exist_ok=True)
        if wanted:  # keep the checkpoints to score
            overrides.setdefault("keep_checkpoints", 100)
        with noise_augmented_training(args.noise) if args.noise > 0 else contextlib.nullcontext():
            fit(str(lset.save_train(run / "train.safetensors")), out=str(run), seed=args.seed, **{"quiet": True, **overrides})
        print(f"fitted in {time.perf_counter() - start:.0f} s", flush=True)
    references = []
    for e in range(EVALUATIONS):
        held = lset.draws("heldout", args.samples, _seeded(100 + e)).flatten(1).double()
        references.append((held, frechet_distance(lset.draws("train", args.samples, _seeded(200 + e)).flatten(1).double(), held)))
    prior = LatentPrior.from_pretrained(str(run / "prior")).eval()
    images = CellImages(lset)
    extractor = load_inception(find_offline_inception())
    real = heldout_image_features(extractor, images, args.images)
    with (run / "train" / "metrics.csv").open(newline="") as f:
        seen = {int(r["step"]): r for r in csv.DictReader(f) if r.get("val_fd")}
    kept = sorted(int(p.name.split("-")[1]) for p in (run / "train" / "checkpoints").iterdir())
    if wanted:
        if wanted - set(kept):
            print(f"not kept by the fit, so not scored: steps {', '.join(map(str, sorted(wanted - set(kept))))}", flush=True)
        kept = [s for s in kept if s in wanted]
    print("step | test excess FD (3 evaluations) | FID | validation gain | validation FD | validation precision | ESS")
    for step in kept:
        prior.flow.load_state_dict(load_tensors(run / "train" / "checkpoints" / f"step-{step:07d}" / "flow_ema.safetensors"))
        row = seen.get(step, {})
        for label, denoise in [("", None)] + ([(f" + score step (σ = {args.noise:g})", args.noise)] if args.noise > 0 else []):

            def draw(n: int, seed: int) -> torch.Tensor:
                with torch.no_grad():
                    z = prior.flow.sample(n, generator=_seeded(seed))
                return z if denoise is None else score_step(prior.flow, z, denoise)

            fds = [
                frechet_distance(draw(args.samples, 300 + e).flatten(1).double(), held) - ref for e, (held, ref) in enumerate(references)
            ]
            z = draw(args.images, 5)
            with torch.no_grad():
                fake = features_of(extractor, images.decode(lset.normalization.denormalize(z.float())), batch_size=50)
            print(
                f"{step}{label} | {sum(fds) / len(fds):+.4f} ({', '.join(f'{v:+.4f}' for v in fds)}) | "
                f"{frechet_inception_distance(fake, real)['fid']:.1f} | {_number(row, 'val_gain_nats'):.2f} | "
                f"{_number(row, 'val_fd'):.4f} | {_number(row, 'val_precision'):.3f} | {_number(row, 'ess_fraction'):.3f}",
                flush=True,
            )
    print(f"{args.set}: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
