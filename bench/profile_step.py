"""Where an alternating fit step spends its time: `torch.profiler` over steps of a default fit on random latents.

    python -m bench.profile_step --shape 4x32x32            # the flagship shape at 256 px
    python -m bench.profile_step --shape 4x64x64 --rows 25

Fits FitConfig defaults (batch 64, as the flagship table) on --latents random latents of --shape for
--warmup + --skip + --steps steps, times the --steps alternating steps after the first --skip (one-off costs),
and prints their mean wall seconds and the profiler's table of operators by self CPU time. The profiler itself
adds some overhead: read the seconds beside the flagship table's, not instead of them.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="4x32x32", help="latent shape, e.g. 4x32x32")
    parser.add_argument("--latents", type=int, default=512, help="random latents to fit on")
    parser.add_argument("--batch-size", type=int, default=64, help="latents per step")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps (not profiled)")
    parser.add_argument("--skip", type=int, default=2, help="alternating steps run before profiling starts")
    parser.add_argument("--steps", type=int, default=10, help="alternating steps profiled")
    parser.add_argument("--rows", type=int, default=18, help="operators shown")
    args = parser.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    import latent_prior.trainer as trainer_module
    from latent_prior.train import fit

    shape = tuple(int(s) for s in args.shape.lower().split("x"))
    generator = torch.Generator().manual_seed(0)
    mean = 0.5 * torch.randn(args.latents, *shape, generator=generator) + torch.randn(1, *shape, generator=generator)
    plain_step = trainer_module.Trainer._step
    seen, seconds, profiler = [0], [0.0], profile(activities=[ProfilerActivity.CPU])

    def step(self, stream):
        if self._in_warmup():
            return plain_step(self, stream)
        seen[0] += 1
        if seen[0] == args.skip + 1:
            profiler.__enter__()
        start = time.perf_counter()
        out = plain_step(self, stream)
        if seen[0] > args.skip:
            seconds[0] += time.perf_counter() - start
        if seen[0] == args.skip + args.steps:
            profiler.__exit__(None, None, None)
        return out

    trainer_module.Trainer._step = step
    try:
        with tempfile.TemporaryDirectory() as work:
            path = Path(work) / "latents.safetensors"
            save_file({"mean": mean, "logvar": torch.full_like(mean, -4.0)}, str(path))
            fit(
                str(path),
                out=str(Path(work) / "fit"),
                steps=args.warmup + args.skip + args.steps,
                warmup_steps=args.warmup,
                batch_size=args.batch_size,
                checkpoint_every=10**9,
                eval_samples=512,
                fd_samples=512,
                log_z_samples=512,
                quiet=True,
            )
    finally:
        trainer_module.Trainer._step = plain_step
    print(
        f"{args.shape} ({math.prod(shape)} dims), batch {args.batch_size}: {seconds[0] / args.steps:.3f} s per alternating "
        f"step (mean of {args.steps}, under the profiler)"
    )
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
