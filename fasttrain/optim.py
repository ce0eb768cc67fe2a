"""Optimizers, Lookahead, gradient clipping and learning-rate schedules.

Nothing here reads a tensor back to the host: the step count and learning rate are Python numbers
the loop already knows, so a training step never waits on the GPU.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from fasttrain.config import OptimConfig


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around any optimizer: every k inner steps,
    slow += alpha * (fast - slow); fast = slow.

    Slow weights start as a copy of the parameters at construction, as in the paper's code. They
    live in this optimizer's state and travel in ``state_dict()`` under the key ``lookahead``
    (one tensor per parameter, in parameter order, plus the step count), so a checkpoint resumes
    the same trajectory and loads with ``torch.load(weights_only=True)``. They are kept apart from
    the inner optimizer's per-parameter state because some optimizers (Adam) initialise their
    state only when it is empty.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in (0, 1], got {alpha}")
        self.optimizer = optimizer
        self.k, self.alpha = k, alpha
        self.lookahead_step = 0
        self.slow = [p.detach().clone() for p in self._params()]

    # Share the inner optimizer's groups and state: schedules and clipping see one optimizer.
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, {self.optimizer!r})"

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.lookahead_step += 1
        if self.lookahead_step % self.k == 0:
            fast = self._params()
            torch._foreach_lerp_(self.slow, fast, self.alpha)  # slow += alpha * (fast - slow)
            torch._foreach_copy_(fast, self.slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        state["lookahead"] = {"step": self.lookahead_step, "k": self.k, "alpha": self.alpha,
                              "slow": [s.clone() for s in self.slow]}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        la = state_dict.pop("lookahead", None)
        if la is None:
            if any("slow_param" in s for s in state_dict.get("state", {}).values()):  # the fused step's layout
                raise ValueError("this optimizer state keeps its Lookahead slow weights per parameter: it was "
                                 "saved by optim.impl fused (set it to resume it)")
            # saved without Lookahead: it starts here, its slow weights the (already loaded) parameters,
            # as at construction; the fused step does the same with such a state
            self.optimizer.load_state_dict(state_dict)
            self.lookahead_step = 0
            with torch.no_grad():
                torch._foreach_copy_(self.slow, self._params())
            return
        params = self._params()
        if len(la["slow"]) != len(params):
            raise ValueError(f"Lookahead state holds {len(la['slow'])} slow tensors, the model has {len(params)}")
        self.optimizer.load_state_dict(state_dict)
        self.lookahead_step = int(la["step"])
        with torch.no_grad():
            for s, saved in zip(self.slow, la["slow"]):
                s.copy_(saved)


def param_groups(params: list[nn.Parameter], cfg: OptimConfig) -> list[dict]:
    """One group, or (optim.decay_norm_and_bias false) two: the weights of convolutions and linear
    layers with weight decay, and the 1-D parameters (BN scales and shifts, biases) without it,
    the usual rule (timm's param_groups_weight_decay). Group order is fixed, so checkpoints match."""
    if cfg.decay_norm_and_bias:
        return [{"params": params}]
    groups = [{"params": [p for p in params if p.ndim > 1]},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig,
                    fully_connected: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW, with Lookahead when k > 0, the fused one-launch Lookahead-SGD, or Muon (fasttrain/muon.py).
    `fully_connected`: 4-D parameters among `params` that are fully connected layers in role (the SE blocks',
    model.squeeze_excite_weights): Muon leaves them to SGD unless optim.muon_se."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "muon":  # config.validate: impl torch, no Lookahead
        from fasttrain.muon import Muon, is_filter_bank, muon_param_groups

        not_muon = set() if cfg.muon_se else {id(p) for p in fully_connected}
        filters = [p for p in params if is_filter_bank(p) and id(p) not in not_muon]
        muon_ids = {id(p) for p in filters}
        others = param_groups([p for p in params if id(p) not in muon_ids], cfg)
        groups = muon_param_groups(filters, others, lr=cfg.lr, muon_lr=cfg.muon_lr,
                                   muon_momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
        return Muon(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                    batching=cfg.muon_batching, ns_steps=cfg.muon_ns_steps, normalize=cfg.muon_normalize)
    params = param_groups(params, cfg)
    if cfg.impl == "fused":
        from fasttrain.kernels.lookahead_sgd import FusedLookaheadSGD

        return FusedLookaheadSGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov, clip_value=cfg.clip_value if cfg.clip == "value" else None,
            lookahead_k=cfg.lookahead_k, lookahead_alpha=cfg.lookahead_alpha,
        )
    if cfg.name == "sgd":
        inner = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay, foreach=True)
    else:
        inner = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, foreach=True)
    return Lookahead(inner, cfg.lookahead_k, cfg.lookahead_alpha) if cfg.lookahead_k > 0 else inner


def with_hyperparameters_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`state` (a saved optimizer state) with `optimizer`'s own settings in its param groups.

    torch's load_state_dict brings back every saved group setting (momentum, weight decay, Nesterov,
    AdamW's betas, the fused step's clipping and Lookahead k), so a resume under a changed config would
    go on with the old values while saying it uses the new ones. The learning rate is the schedule's
    to set. Groups that do not pair up are left for load_state_dict to refuse."""
    saved = state.get("param_groups")
    if (not isinstance(saved, list) or len(saved) != len(optimizer.param_groups)
            or not all(isinstance(old, dict) for old in saved)):
        return state
    groups = [{**old, **{k: v for k, v in new.items() if k != "params"}}
              for old, new in zip(saved, optimizer.param_groups)]
    return {**state, "param_groups": groups}


def clips_inside_step(optimizer: torch.optim.Optimizer) -> bool:
    """The fused optimizer clamps gradients by value inside its kernel (it says so itself)."""
    return getattr(optimizer, "clips_by_value", False)


def clip_gradients(params: list[nn.Parameter], cfg: OptimConfig, optimizer: torch.optim.Optimizer) -> None:
    """Clip in place without a host sync (foreach kernels; the norm stays on the device)."""
    if cfg.clip == "value" and not clips_inside_step(optimizer):
        torch.nn.utils.clip_grad_value_(params, cfg.clip_value)
    elif cfg.clip == "norm":
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_value, foreach=True)


class LRSchedule:
    """Per-step learning rate: linear warmup (step i of W at peak x (i+1)/W), then cosine / linear decay, or constant.

    Sized from the real step count (epochs x batches per epoch), so changing the batch size or
    the data subset keeps the shape of the schedule. ``state_dict`` holds the step for resume.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int):
        self.optimizer = optimizer
        self.peak = cfg.lr
        self.final = cfg.lr * cfg.final_lr_frac
        self.kind = cfg.schedule
        self.total_steps = max(1, steps_per_epoch * epochs)
        # capped before rounding: a finite warmup_epochs of 1e308 times the steps per epoch is infinity, which
        # round() refuses; any warmup past the run's end is the same schedule
        self.warmup_steps = round(min(self.total_steps - 1, cfg.warmup_epochs * steps_per_epoch))
        self.step_count = 0
        self.apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak
        t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        t = min(max(t, 0.0), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.kind == "cosine" else 1.0 - t
        return self.final + (self.peak - self.final) * shape

    def apply(self) -> float:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's filters: optim.muon_lr / optim.lr
        return lr

    def step(self) -> float:
        """Advance one optimizer step and set the next step's learning rate."""
        self.step_count += 1
        return self.apply()

    @property
    def lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict:
        # the position is all a resume needs: the shape comes from the resumed config (a longer train.epochs
        # re-plans the rest); total_steps and warmup_steps only record what the checkpoint was trained under
        return {"step_count": self.step_count, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.apply()
