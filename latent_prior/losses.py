"""The two losses of EVaLP training, per step (`latent_prior.trainer` alternates them).

* `sampler_loss`, on the flow q_φ:
      E_{z~q}[E(z) + λ·(log q(z) − log p0(z))]  +  w_fwd · E_data[−log q(z_pos)]
  With λ = 1 the first term is L_q = KL(q‖p_θ) − log Z, so −L_q is a lower bound on log Z (`log_z_bound`).
  The forward-KL term (maximum likelihood of the flow on posterior draws) keeps the flow mass-covering.
* `energy_loss`, on E_θ:
      E_pos[E] − E_neg[E] + α·(E_pos² + E_neg²) + γ·½‖∇E(z_pos)‖² + w_gp·(‖∇E(ẑ)‖ − 1)²
  positives are fresh posterior draws, negatives the sampler's samples, ẑ random interpolates (WGAN-GP).
All in nats, per sample.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn


def sampler_loss(
    energy: nn.Module,
    flow: nn.Module,
    n: int,
    *,
    kl_weight: float,
    forward_kl_weight: float,
    z_pos: torch.Tensor | None,
    generator: torch.Generator | None,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    shared_basis: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The sampler's loss, its parts (per-sample means, nats) and its n samples.

    loss = E_q[E(z) + λ·(log q(z) − log p0(z))] + w_fwd·E_data[−log q(z_pos)],  z ~ q reparameterised.
    `shared_basis`: the energy's flow base and the sampler are subspace flows on one principal basis, decided once by
    the caller (`latent_prior.sampling.propose`: the base then skips its rotation of the samples).
    Returns (loss, {"sampler_loss", "log_z_bound" = E_q[−E − log q + log p0] (≤ log Z), "forward_kl"}, z detached
    (n, *latent_shape)): the trainer reuses z as the energy's negatives.
    """
    from latent_prior.sampling import log_standard_normal, propose

    z, log_q, e = propose(energy, flow, n, generator=generator, shared_basis=shared_basis, autocast=autocast)
    e = e.float()
    log_ratio = log_q - log_standard_normal(z)
    loss = (e + kl_weight * log_ratio).mean()
    parts = {"log_z_bound": -(e + log_ratio).mean().detach()}
    if forward_kl_weight > 0 and z_pos is not None:
        nll = -flow.log_prob(z_pos).mean()
        loss = loss + forward_kl_weight * nll
        parts["forward_kl"] = nll.detach()
    else:
        parts["forward_kl"] = torch.zeros((), device=z.device)
    parts["sampler_loss"] = loss.detach()
    return loss, parts, z.detach()


def energy_loss(
    energy: nn.Module,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
    *,
    magnitude_penalty: float,
    grad_penalty: float,
    wgan_gp_weight: float,
    generator: torch.Generator | None,
    autocast: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The energy's loss and its parts (nats).

    loss = E_pos[E] − E_neg[E] + α·(E_pos² + E_neg²) + γ·½‖∇E(z_pos)‖² + w_gp·(‖∇E(ẑ)‖ − 1)²
    z_pos, z_neg: (B, *shape) detached; ẑ = a·z_pos + (1 − a)·z_neg, a ~ U(0, 1) per sample.
    Returns (loss, {"e_pos", "e_neg", "energy_loss", "max_abs_energy"}).
    """
    z_pos = z_pos.detach().requires_grad_(grad_penalty > 0)
    with autocast():
        e = energy(torch.cat([z_pos, z_neg.detach()])).float()
    e_pos, e_neg = e[: len(z_pos)], e[len(z_pos) :]
    loss = e_pos.mean() - e_neg.mean()
    if magnitude_penalty > 0:
        loss = loss + magnitude_penalty * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    if grad_penalty > 0:
        (grad,) = torch.autograd.grad(e_pos.sum(), z_pos, create_graph=True)
        loss = loss + grad_penalty * 0.5 * grad.float().flatten(1).pow(2).sum(1).mean()
    if wgan_gp_weight > 0:
        a = torch.rand((len(z_pos),) + (1,) * (z_pos.dim() - 1), generator=generator, device=z_pos.device)
        z_hat = (a * z_pos.detach() + (1 - a) * z_neg.detach()).requires_grad_(True)
        with autocast():
            e_hat = energy(z_hat).float()
        (grad,) = torch.autograd.grad(e_hat.sum(), z_hat, create_graph=True)
        loss = loss + wgan_gp_weight * (grad.float().flatten(1).norm(dim=1) - 1).pow(2).mean()
    parts = {
        "e_pos": e_pos.mean().detach(),
        "e_neg": e_neg.mean().detach(),
        "energy_loss": loss.detach(),
        "max_abs_energy": e.detach().abs().max(),
    }
    return loss, parts
