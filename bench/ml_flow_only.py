"""Does a flow trained by maximum likelihood alone (no energy) match the GMM? Judged as the base-choice study judges a
candidate (`bench.base_choice.heldout_scores`).

    python bench/ml_flow_only.py digits-b0.1 rnvp3000 '{"steps": 3000}'
    python bench/ml_flow_only.py digits-b0.1 spline3000 '{"steps": 3000, "kind": "spline"}'

Prints one JSON line: excess FD (mean and sd over 3 sample sets of 3000), precision/recall, the held-out gain over
N(0, I) (nats), and the digit classifier's confidence on digits sets. This experiment is why the trainer starts with a
maximum-likelihood warm-up of the sampler (docs/prior-development.md, bench/results/prior_sweep4_flowbase.md).
Keys of the JSON argument: kind, steps, lr, batch, wd (weight decay), ema, seed, and any option of
`latent_prior.flows.build_flow`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.base_choice import heldout_scores  # noqa: E402
from bench.datasets import load_set  # noqa: E402
from latent_prior.flows import build_flow  # noqa: E402


def run(
    set_name: str,
    label: str,
    kind: str = "realnvp",
    steps: int = 3000,
    lr: float = 1e-3,
    batch: int = 256,
    wd: float = 0.0,
    ema: float = 0.995,
    seed: int = 0,
    **flow_options,
) -> dict:
    torch.manual_seed(seed)
    lset = load_set(set_name, cache_dir="runs/bench_prior", seed=0, verbose=False)
    classifier = None
    if lset.decode is not None:
        from bench.digits import load_digits_split, train_digit_classifier

        classifier = train_digit_classifier(load_digits_split(), seed=0)
    g = torch.Generator().manual_seed(seed)
    flow = build_flow(lset.latent_shape, kind=kind, **flow_options)
    flow.initialize(lset.draws("train", 2048, g))
    ema_flow = build_flow(lset.latent_shape, kind=kind, **flow_options)
    ema_flow.load_state_dict(flow.state_dict())
    opt = torch.optim.Adam(flow.parameters(), lr=lr, weight_decay=wd)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = time.time()
    for _ in range(steps):
        loss = -flow.log_prob(lset.draws("train", batch, g)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for p_ema, p in zip(ema_flow.parameters(), flow.parameters()):
                p_ema.lerp_(p, 1 - ema)
            for b_ema, b in zip(ema_flow.buffers(), flow.buffers()):
                b_ema.copy_(b)
    fit_seconds = time.time() - start
    with torch.no_grad():
        heldout_nll = -ema_flow.log_prob(lset.draws("heldout", 4000, g)).mean().item()
        scored = ema_flow.double()  # heldout_scores computes log-densities in float64
        sets = [heldout_scores(lset, scored, 100 + r, classifier) for r in range(3)]
    row = {k: sum(s[k] for s in sets) / len(sets) for k in sets[0]}
    row["fd_sd"] = torch.tensor([s["excess_fd"] for s in sets]).std().item()
    return {"set": set_name, "label": label, "fit_s": fit_seconds, "heldout_nll": heldout_nll, **row}


if __name__ == "__main__":
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    print(json.dumps(run(sys.argv[1], sys.argv[2], **options)), flush=True)
