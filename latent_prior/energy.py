"""Energy networks E_θ(z) of the EVaLP prior.

The prior is p_θ(z) ∝ N(z; 0, I) · exp(−E_θ(z)) in *normalized* latent space, so an energy network
maps a batch of latents (N, *latent_shape) to one scalar per sample (N,), in nats. A constant offset
in E is absorbed by the normalizer Z_θ and has no effect on the density.

Design choices, all because the trainer differentiates E with respect to z (Langevin steps, the
data-side gradient penalty):
* smooth activations (SiLU), so ∇_z E is continuous;
* no batch-dependent normalization (no BatchNorm / GroupNorm over the batch): E(z) of one sample
  must not depend on the others in the batch;
* the head starts near zero, so E ≈ 0 and p_θ ≈ N(0, I) at initialization;
* optional spectral normalization of the hidden layers (as in LEBM). The head is left
  un-normalized: normalizing it would undo its near-zero init; the trainer's energy-magnitude
  penalty keeps its scale in check.

Each module keeps its constructor arguments in `self.config` (JSON-able), and
`build_energy(**module.config)` rebuilds it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from latent_prior.errors import LatentPriorError, checked_kind
from latent_prior.sampling import log_standard_normal

__all__ = ["MLPEnergy", "ConvEnergy", "FlowBasedEnergy", "build_energy", "ENERGY_KINDS"]

ENERGY_KINDS = ("auto", "mlp", "conv")

# Standard deviation of the head's initial weights: small enough that |E| is ~1e-3 nats at init,
# large enough that ∇_z E is not exactly zero (Langevin and gradient penalties see a signal).
_HEAD_INIT_STD = 1e-3


def _check_shape(latent_shape: Sequence[int], arg: str = "latent_shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in latent_shape)
    except (TypeError, ValueError):
        raise LatentPriorError(f"{arg}={latent_shape!r} is not a sequence of integers; pass e.g. (8,) or (4, 32, 32).") from None
    if not shape or any(s < 1 for s in shape) or any(int(s) != s for s in latent_shape):
        raise LatentPriorError(f"{arg}={latent_shape!r} must be a non-empty sequence of positive integers, e.g. (8,) or (4, 32, 32).")
    return shape


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LatentPriorError(f"{name}={value!r} must be a positive integer.")
    return value


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


def _small_head(in_features: int) -> nn.Linear:
    head = nn.Linear(in_features, 1)
    nn.init.normal_(head.weight, std=_HEAD_INIT_STD)
    nn.init.zeros_(head.bias)
    return head


class MLPEnergy(nn.Module):
    """E_θ(z) by a SiLU multilayer perceptron on the flattened latent.

    Args:
        latent_shape: shape of one latent, e.g. (8,); any shape is flattened to D = prod(shape).
        hidden: width of the hidden layers.
        depth: number of hidden layers.
        spectral_norm: spectral-normalize the hidden layers.

    forward(z): (N, *latent_shape) -> (N,) energies in nats.
    """

    def __init__(self, latent_shape: Sequence[int], hidden: int = 256, depth: int = 3, spectral_norm: bool = False) -> None:
        super().__init__()
        self.latent_shape = _check_shape(latent_shape)
        _check_positive("hidden", hidden)
        _check_positive("depth", depth)
        self.config = {
            "latent_shape": list(self.latent_shape),
            "kind": "mlp",
            "hidden": hidden,
            "depth": depth,
            "spectral_norm": bool(spectral_norm),
        }
        dim = math.prod(self.latent_shape)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [_maybe_sn(nn.Linear(dim if i == 0 else hidden, hidden), spectral_norm), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = _small_head(hidden)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if tuple(z.shape[1:]) != self.latent_shape:
            raise LatentPriorError(
                f"MLPEnergy got latents of shape {tuple(z.shape)}, expected (N, {', '.join(map(str, self.latent_shape))}); "
                "check that the cache and the prior use the same VAE."
            )
        return self.head(self.body(z.flatten(1))).squeeze(-1)


class _ResBlock(nn.Module):
    """x + conv(SiLU(conv(SiLU(x)))), 3×3 convs, no normalization (no batch dependence)."""

    def __init__(self, channels: int, spectral_norm: bool) -> None:
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(channels, channels, 3, padding=1), spectral_norm)
        self.conv2 = _maybe_sn(nn.Conv2d(channels, channels, 3, padding=1), spectral_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class ConvEnergy(nn.Module):
    """E_θ(z) by a residual CNN with global average pooling, for spatial latents (C, H, W).

    Layout: 3×3 stem conv (C -> channels), then `depth` stages of [residual block, stride-2 3×3
    conv], then SiLU, global average pooling over H×W and a linear head. Strided convs with padding
    accept any H, W (a 1×1 map stays 1×1), so one network runs on 4×8×8, 4×32×32 and 4×64×64 alike.
    No normalization layers: the energy of a sample never depends on the rest of the batch.

    Args:
        latent_shape: (C, H, W) of one latent; H and W only set the default, any H, W run.
        channels: width of every stage.
        depth: number of residual + downsampling stages.
        spectral_norm: spectral-normalize every conv (as in SN-GAN, on the reshaped kernel).

    forward(z): (N, C, H, W) -> (N,) energies in nats.
    """

    def __init__(self, latent_shape: Sequence[int], channels: int = 64, depth: int = 3, spectral_norm: bool = False) -> None:
        super().__init__()
        shape = _check_shape(latent_shape)
        if len(shape) != 3:
            raise LatentPriorError(f"ConvEnergy needs latent_shape=(C, H, W), got {shape}; use kind='mlp' for flat latents.")
        self.latent_shape = shape
        _check_positive("channels", channels)
        _check_positive("depth", depth)
        self.config = {
            "latent_shape": list(shape),
            "kind": "conv",
            "channels": channels,
            "depth": depth,
            "spectral_norm": bool(spectral_norm),
        }
        self.stem = _maybe_sn(nn.Conv2d(shape[0], channels, 3, padding=1), spectral_norm)
        stages: list[nn.Module] = []
        for _ in range(depth):
            stages += [_ResBlock(channels, spectral_norm), _maybe_sn(nn.Conv2d(channels, channels, 3, stride=2, padding=1), spectral_norm)]
        self.stages = nn.Sequential(*stages)
        self.head = _small_head(channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.latent_shape[0]:
            raise LatentPriorError(
                f"ConvEnergy got latents of shape {tuple(z.shape)}, expected (N, {self.latent_shape[0]}, H, W); "
                "check that the cache and the prior use the same VAE."
            )
        h = F.silu(self.stages(self.stem(z)))
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)


class FlowBasedEnergy(nn.Module):
    """E(z) = log p0(z) − log q_base(z) + E_res(z), so that p ∝ p0·exp(−E) = q_base·exp(−E_res).

    q_base is a normalizing flow fitted by maximum likelihood to the latents and then frozen: it
    carries the bulk of the density (where the aggregate posterior is far from N(0, I), e.g. a weak-KL
    VAE, an energy on top of N(0, I) alone must learn hundreds of nats), and the trainable residual
    energy E_res only corrects what the flow gets wrong. With E_res ≈ 0 at initialization, p starts
    equal to q_base and log Z starts at 0. The trainer's energy loss and penalties act on `residual`.
    (N, *latent_shape) -> (N,) nats.
    """

    def __init__(self, residual: nn.Module, base: nn.Module) -> None:
        super().__init__()
        self.residual, self.base = residual, base
        self.base.requires_grad_(False)
        self.latent_shape = tuple(residual.latent_shape)
        self.config = {
            "kind": "flow_based",
            "latent_shape": list(self.latent_shape),
            "residual": dict(residual.config),
            "base": dict(base.config),
        }

    def base_energy(self, z: torch.Tensor, whitened: torch.Tensor | None = None) -> torch.Tensor:
        """log p0(z) − log q_base(z): the energy of q_base relative to N(0, I), in nats. `whitened`: z's
        coordinates in the base's principal basis (N, D), when the caller holds them (see `forward`)."""
        log_q = self.base.log_prob(z) if whitened is None else self.base.whitened_log_prob(whitened)
        return log_standard_normal(z) - log_q

    def forward(self, z: torch.Tensor, whitened: torch.Tensor | None = None) -> torch.Tensor:
        """E(z) (N,) nats. `whitened` (N, D): z's whitened coordinates in the base's principal basis, from a sampler
        that shares it (`SubspaceFlow.shares_basis`); the base then skips its D × D rotation of z."""
        # The base term is a difference of two large log-densities: keep it out of bf16 autocast, and run it
        # in the base's own dtype (float32 unless the whole prior was cast, e.g. from_pretrained(dtype=bf16)).
        dtype = next(self.base.parameters()).dtype
        with torch.autocast(device_type=z.device.type, enabled=False):
            base = self.base_energy(z.to(dtype), None if whitened is None else whitened.to(dtype))
        return base.float() + self.residual(z).float()

    def shares_basis(self, flow: nn.Module) -> bool:
        """Whether `flow`'s whitened coordinates are the base's own (`forward`'s `whitened` may come from it)."""
        return hasattr(self.base, "shares_basis") and self.base.shares_basis(flow)


def build_energy(
    latent_shape: Sequence[int],
    *,
    kind: str = "auto",
    residual: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    hidden: int = 256,
    depth: int = 3,
    channels: int = 64,
    spectral_norm: bool = False,
) -> nn.Module:
    """Build an energy network for latents of `latent_shape`; `build_energy(**net.config)` rebuilds `net`.

    kind: "auto" (MLP for flat (D,) latents, conv for (C, H, W)), "mlp" (any shape, flattened), "conv",
    or "flow_based" (a `FlowBasedEnergy`; `residual` and `base` are the configs of its residual energy
    and of its base flow). `hidden` applies to the MLP, `channels` to the CNN, `depth` to both.
    """
    shape = _check_shape(latent_shape)
    if kind == "flow_based":
        from latent_prior.flows import build_flow

        if residual is None or base is None:
            raise LatentPriorError("energy kind='flow_based' needs the `residual` and `base` configs.")
        residual_net = build_energy(**{"latent_shape": shape, **residual})
        base_flow = build_flow(**{"latent_shape": shape, **base})
        return FlowBasedEnergy(residual_net, base_flow)
    kind = checked_kind(kind, ENERGY_KINDS, shape, what="energy", flat="mlp", spatial="conv", supported_by="the energy supports")
    if kind == "mlp":
        return MLPEnergy(shape, hidden=hidden, depth=depth, spectral_norm=spectral_norm)
    return ConvEnergy(shape, channels=channels, depth=depth, spectral_norm=spectral_norm)
