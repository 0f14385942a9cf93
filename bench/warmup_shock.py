"""Which of the sampler flow's parameters wreck its GMM start in the warm-up's first steps? Short fits of one cell
(--steps; the trainer makes the first half the warm-up, the rest alternating steps), some with a group of the flow's
parameters frozen (their gradients zeroed, so Adam never moves them) or slowed (`lr_linear_power`), each scored by
the trainer's own held-out evaluation every 25 steps.

    python -m bench.warmup_shock --set default-vae --run /tmp/shock --cache-dir /tmp/bench/cache

Prints, per variant, the held-out / training gain over N(0, I) (nats per item), the held-out latent FD and the k-NN
precision of the EMA sampler at steps 0 (the GMM start), 25, 50, 100, 200 and the last.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

#: variant -> (flow parameters frozen: a regex on their names, FitConfig overrides)
VARIANTS: dict[str, tuple[str | None, dict[str, float]]] = {
    "default": (None, {}),
    "frozen base A_k": (r"base_tril$", {}),
    "frozen linear maps": (r"\.(lower|upper|log_s)$", {}),
    "frozen both": (r"(base_tril|\.lower|\.upper|\.log_s)$", {}),
    "lr_linear_power=0.5": (None, {"lr_linear_power": 0.5}),
    "lr_linear_power=1": (None, {"lr_linear_power": 1.0}),
}
SHOWN_STEPS = (0, 25, 50, 100, 200)


@contextlib.contextmanager
def frozen_flow_parameters(pattern: str | None) -> Iterator[list[int]]:
    """Within it, every fit's sampler flow gets zero gradients for the parameters whose names match `pattern`; yields
    [how many values that froze], filled in when the fit builds its networks. The trainer is restored on exit."""
    from latent_prior.trainer import Trainer

    build, frozen_values = Trainer._build, [0]

    def build_and_freeze(self: Trainer) -> None:
        build(self)
        for name, p in self.flow.named_parameters():
            if pattern and re.search(pattern, name):
                p.register_hook(torch.zeros_like)
                frozen_values[0] += p.numel()

    Trainer._build = build_and_freeze
    try:
        yield frozen_values
    finally:
        Trainer._build = build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warmup_shock", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="default-vae", help="a cell of the suite (python -m bench --sets)")
    parser.add_argument("--run", required=True, help="folder for the fits, one subfolder per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300, help="steps per fit (the trainer warms up for the first half)")
    parser.add_argument("--cache-dir", default="runs/bench_prior", help="where the suite trains its VAEs once")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    from bench.datasets import load_set
    from latent_prior.train import fit

    torch.set_num_threads(1)
    lset = load_set(args.set, cache_dir=args.cache_dir, verbose=False)
    root = Path(args.run)
    root.mkdir(parents=True, exist_ok=True)
    latents = str(lset.save_train(root / "train.safetensors"))
    steps = sorted({s for s in SHOWN_STEPS if s < args.steps} | {args.steps})
    print(f"{args.set}: held-out gain / training gain (nats), held-out FD, precision at steps {', '.join(map(str, steps))}")
    for name in args.variants.split(","):
        pattern, overrides = VARIANTS[name]
        out = root / re.sub(r"[^a-z0-9_.=]+", "-", name)
        start = time.perf_counter()
        with frozen_flow_parameters(pattern) as frozen_values:
            fit(latents, out=str(out), quiet=True, steps=args.steps, warmup_steps=args.steps, checkpoint_every=25, **overrides)
        with (out / "train" / "metrics.csv").open(newline="") as f:
            rows = {int(r["step"]): r for r in csv.DictReader(f) if r.get("val_fd")}
        shown = [rows[s] for s in steps if s in rows]
        print(
            f"| {name} ({frozen_values[0]:,} values frozen; {time.perf_counter() - start:.0f} s) | "
            + " | ".join(
                f"{float(r['val_gain_nats']):.2f} / {float(r['train_gain_nats']):.2f}, FD {float(r['val_fd']):.3g}, "
                f"p {float(r['val_precision']):.2f}"
                for r in shown
            )
            + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
