"""Exponential moving average of a model's weights (`train.ema_decay`, `train.ema_bn`)."""
from __future__ import annotations

import contextlib
import copy
import itertools
from typing import Callable, ContextManager, Iterable

import torch
from torch import nn


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (SyncBatchNorm included) that keep running statistics."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


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

    The averaged BN statistics are not the statistics of the averaged weights' own activations: an
    average of weights that kept rotating (high learning rate with weight decay under BatchNorm, a
    long horizon) has smaller, differently aimed filters, whose activations the averaged running
    mean/var no longer normalise. `recompute_bn` re-estimates them from training batches, as SWA
    does (torch.optim.swa_utils.update_bn); `train.ema_bn: recompute` has the trainer call it before
    the EMA weights are evaluated or saved.
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

    @torch.no_grad()
    def recompute_bn(self, batches: Iterable[torch.Tensor],
                     autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> int:
        """Replace the EMA module's BN running statistics by those of its own activations on `batches`
        (image tensors; the count taken is the caller's), what torch.optim.swa_utils.update_bn computes:
        statistics reset, then the equal-weight average over the batches of each batch's mean and
        unbiased variance, num_batches_tracked = the number of batches. Only the BN
        layers run in training mode (anything else, dropout included, stays in eval mode: no random
        numbers are drawn, so the training run's RNG streams are untouched). In place: the lists that
        `update` lerps stay valid. The result depends on the EMA parameters and the batches only, not
        on the statistics before. `autocast()`: the evaluation's precision context. Returns the number
        of batches used; none is an error (raised before anything is changed)."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:  # checked before anything is reset
            raise ValueError("recompute_bn needs at least one batch")
        norms = batch_norms(self.module)
        momenta = [bn.momentum for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.train()
        count = 0
        try:
            for images in itertools.chain([first], batches):
                # the cumulative average (every batch weighs the same) as momentum 1/(i+1) before batch i:
                # momentum None computes the same factor from num_batches_tracked with a host read (a
                # device sync per BN layer and batch, and the final recompute is on the training clock)
                for bn in norms:
                    bn.momentum = 1.0 / (count + 1)
                with autocast():
                    self.module(images)
                count += 1
        finally:
            for bn, momentum in zip(norms, momenta):
                bn.momentum = momentum
            self.module.eval()
        return count

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)  # copies in place: the tensor lists above stay valid
