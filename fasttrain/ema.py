"""Exponential moving average of a model's weights (`train.ema_decay`)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """An exponential moving average of a model's weights (`train.ema_decay`), evaluated instead of them.

    After every optimizer step: ``ema = decay_t * ema + (1 - decay_t) * live`` over the parameters
    AND the floating-point buffers (BatchNorm running mean/var), as timm's ModelEmaV2/V3 (default) and
    hlb-cifar10/airbench's NetworkEMA do; integer buffers (num_batches_tracked) are copied. That is one
    ``torch._foreach_lerp_`` with a Python-float weight (plus one ``_foreach_copy_``): no host sync.
    ``decay_t = decay * min(1, t / ema_warmup_steps)`` at the run's t-th step (1-based; no ramp when
    ema_warmup_steps is 0), so early on the average follows the fast-moving weights.
    Under DDP every rank applies the same update to the same all-reduced weights: no collective per
    step (the trainer syncs the EMA's BN buffers with the model's at epoch ends).
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0):
        self.decay, self.warmup_steps = decay, warmup_steps
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        live_p, ema_p = list(model.parameters()), list(self.module.parameters())
        live_b, ema_b = list(model.buffers()), list(self.module.buffers())
        self._ema_f = ema_p + [b for b in ema_b if b.is_floating_point()]
        self._live_f = live_p + [b for b in live_b if b.is_floating_point()]
        self._ema_i = [b for b in ema_b if not b.is_floating_point()]
        self._live_i = [b for b in live_b if not b.is_floating_point()]

    def decay_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.decay * step / self.warmup_steps
        return self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        torch._foreach_lerp_(self._ema_f, self._live_f, 1.0 - self.decay_at(step))
        if self._ema_i:
            torch._foreach_copy_(self._ema_i, self._live_i)

    @torch.no_grad()
    def reset(self) -> None:
        """EMA = the live weights (a resume from a checkpoint saved without EMA)."""
        torch._foreach_copy_(self._ema_f + self._ema_i, self._live_f + self._live_i)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)  # copies in place: the tensor lists above stay valid
