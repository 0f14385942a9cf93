"""What decoded FID rewards on a spatial cell: the Gaussian-family models the subspace flow starts as, side by side.

On photos-16 the EVaLP sampler (its start, step 0, exported) has by far the best latent FD and a worse FID than the
diagonal 10-GMM. This study asks whether any start of that family would do better: on one cell's posterior draws it
fits, without training anything,

* one full-covariance Gaussian, the diagonal and the full-covariance 10-GMM on all D dims (`GMMPrior`);
* the subspace flow's start at r = 256 and 512 leading axes: a full-covariance 10-GMM there, each component with its
  own diagonal Gaussian on the trailing axes (`SubspaceFlow.initialize`), and the same GMM with one N(0, I) shared on
  the trailing whitened axes (`PrincipalBasis.lift`);
* training posterior draws (the floor of any prior of these latents);

and scores 2,000 samples of each by excess latent FD against 2,000 held-out draws, and the first --images of them,
decoded, by FID against as many held-out crops (the suite's Inception-v3 and crop order).

    python -m bench.gaussian_fid --set photos-16 --images 500 --cache-dir /tmp/bench/cache --json /tmp/gaussian_fid.json

Prints one row per model and writes them to --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

DRAWS = 2000


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latent_models(lset, train: torch.Tensor) -> dict[str, torch.Tensor]:
    """{model: DRAWS samples (DRAWS, D) float64, normalized space} of every model of the study."""
    from latent_prior.baselines import GMMPrior
    from latent_prior.flows import PrincipalBasis, build_flow

    torch.manual_seed(0)  # the flows' invertible linear maps start random: their samples depend on it
    x = train.flatten(1).double()
    samples = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GMMPrior's warnings about few items per component, judged by the scores here
        for name, k, covariance, starts in (("gaussian-full", 1, "full", 1), ("gmm10-diag", 10, "diag", 5), ("gmm10-full", 10, "full", 1)):
            samples[name] = GMMPrior(k, covariance, seed=0, n_init=starts).fit(x).sample(DRAWS, generator=_seeded(5))
        basis = PrincipalBasis.fit(train)
        for r in (256, 512):
            gmm = basis.fit_mixture(GMMPrior(10, "full", seed=0, n_init=1), train, r)
            flow = build_flow(
                lset.latent_shape, kind="subspace", subspace_dims=r, base_components=10, base_covariance="full", base_init="em"
            )
            flow.initialize(train, mixture=gmm, basis=basis)
            with torch.no_grad():
                samples[f"subspace-r{r}"] = flow.sample(DRAWS, generator=_seeded(5)).double()
            leading = gmm.sample(DRAWS, generator=_seeded(5)).float()
            samples[f"lift-r{r}"] = basis.lift(leading, _seeded(6)).double()
    samples["train-draws"] = lset.draws("train", DRAWS, _seeded(7)).flatten(1).double()
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gaussian_fid", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="photos-16", help="a spatial cell of the suite (photos, photos-16, ...)")
    parser.add_argument("--images", type=int, default=500, help="decoded samples per model, against as many held-out images")
    parser.add_argument(
        "--cache-dir", default="runs/bench_prior", help="where the suite trains its VAEs once (python -m bench --cache-dir)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench.datasets import load_set
    from bench.run import CellImages, heldout_image_features
    from latent_prior.image_metrics import (
        features_of,
        find_offline_inception,
        frechet_inception_distance,
        load_inception,
    )
    from latent_prior.metrics import frechet_distance

    start = time.perf_counter()
    lset = load_set(args.set, cache_dir=args.cache_dir)
    train = lset.draws("train", 3000, _seeded(0))
    held = lset.draws("heldout", DRAWS, _seeded(1)).flatten(1).double()
    reference = frechet_distance(lset.draws("train", DRAWS, _seeded(2)).flatten(1).double(), held)
    samples = latent_models(lset, train)
    images = CellImages(lset)
    extractor = load_inception(find_offline_inception())
    real = heldout_image_features(extractor, images, args.images)
    rows = {}
    for name, z in samples.items():
        decoded = images.decode(lset.normalization.denormalize(z[: args.images].float().reshape(-1, *lset.latent_shape)))
        fake = features_of(extractor, decoded, batch_size=50)
        rows[name] = {
            "excess_fd": frechet_distance(z.flatten(1), held) - reference,
            "fid": frechet_inception_distance(fake, real)["fid"],
            "images": len(fake),
        }
        print(
            f"{name:14s} latent excess FD {rows[name]['excess_fd']:+8.2f}   FID {rows[name]['fid']:6.1f} "
            f"({len(fake)} / {len(real)} images)",
            flush=True,
        )
    print(f"{args.set}: {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"set": args.set, "images": args.images, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
