"""An exponential moving average of a module's weights: the sampler a fit exports, and flow matching's."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of a module's floating-point state (other buffers are copied).

    decay_t = min(decay, (1 + t) / (10 + t)) after t updates, so early averages are not dominated
    by the random initialization. With decay 0 the EMA is a plain copy.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.decay = decay
        self.updates = 0
        self._source: nn.Module | None = None  # the module whose tensors `_pairs` lists

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats, others = self._pairs(module)
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1.0 - d)  # one call for all tensors, the arithmetic of lerp_ on each
        for ema_t, t in zip(*others):
            ema_t.copy_(t)
        self.updates += 1

    def _pairs(
        self, module: nn.Module
    ) -> tuple[tuple[list[torch.Tensor], list[torch.Tensor]], tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """((EMA floats, source floats), (EMA others, source others)), built once per source module: state_dict
        tensors keep their identity (load_state_dict copies into them), and rebuilding these lists at every step
        cost more than the averaging itself on small flows."""
        if self._source is not module:
            pairs = list(zip(self.module.state_dict().values(), (t.detach() for t in module.state_dict().values())))
            self._floats = ([e for e, _ in pairs if e.is_floating_point()], [t for e, t in pairs if e.is_floating_point()])
            self._others = ([e for e, _ in pairs if not e.is_floating_point()], [t for e, t in pairs if not e.is_floating_point()])
            self._source = module
        return self._floats, self._others
