"""Collectives of a fit on several processes, without DDP (why: `latent_prior.trainer`'s docstring): one all-reduce
of every gradient per update, and rank 0's weights broadcast to the others. With one process both do nothing."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def all_reduce_grads_and_stats(params: Sequence[nn.Parameter], stats: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """Average every parameter's gradient and the `stats` vector across ranks with ONE all-reduce.

    A parameter without a gradient contributes zeros. Returns the averaged stats. With one process
    it returns `stats` untouched.
    """
    if accelerator.num_processes == 1:
        return stats
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [stats.float().to(grads[0].device if grads else stats.device)])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return flat[offset:]


def broadcast_module(module: nn.Module, accelerator: Any) -> None:
    """Make every rank hold rank 0's parameters and buffers (after ActNorm's data-dependent init)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.copy_(broadcast(t.detach().clone(), from_process=0))
