"""Fused Lookahead-SGD: one Triton launch per optimizer step (per device and parameter dtype).

Per element, in fp32, for step t = 1, 2, ... (c: clip value, wd: weight decay, mu: momentum)::

    g   = clamp(grad, -c, c)                      when clip_value is set (clip_grad_value_)
    g   = g + wd * p                              when wd != 0 (torch.optim.SGD's L2 term)
    buf = mu * buf + g                            buf starts at 0, so step 1 gives buf = g exactly
                                                  like SGD's "first step buf = grad"; dampening 0
    d   = g + mu * buf  (nesterov)  or  d = buf
    p   = p - lr * d
    if k > 0 and t % k == 0:                      Lookahead (Zhang et al. 2019)
        slow = lerp(slow, p, alpha)               slow += alpha * (p - slow), torch.lerp's rounding
        p    = slow

Parameters without a gradient skip the SGD part (like torch.optim.SGD) but still take part in the
Lookahead sync (like ``fasttrain.optim.Lookahead``). Slow weights start as the parameters at
construction.

Design:
  * Parameters are grouped into buckets by (device, dtype); each bucket owns one flat momentum buffer
    and one flat slow-weight buffer, and the per-parameter state entries ``momentum_buffer`` /
    ``slow_param`` are views into them (same sizes and strides as the parameter), so
    ``state_dict()`` has torch's standard per-parameter layout.
  * Parameters and gradients stay where autograd and the model put them. The kernel addresses them as
    ``anchor + element offset``, the anchor being the bucket's momentum buffer; the offsets live in a
    small device table that is rewritten (pinned host memory, async copy) only when an address changes.
    This avoids copying the gradients into a flat buffer, which would cost two extra passes over them.
  * One program per chunk of ``BLOCK`` elements of one tensor (a static chunk table), so tensors of any
    size and count share one launch.
  * Hyperparameters live in device tables read by the kernel: a schedule writing
    ``param_group["lr"]`` (a float) costs one ``fill_`` and no recompilation or host sync; a tensor lr
    is copied device-to-device, which also works inside a CUDA graph. The step counter is a device
    tensor: every program reads it and the last program to finish writes t (an atomic ticket), so the
    Lookahead condition needs no host sync either.
  * On CPU tensors without ``TRITON_INTERPRET=1`` the same math runs in PyTorch on the same state, so
    CPU runs can use ``optim.impl: fused``.

Dtypes: state buffers have the parameter's dtype (as torch.optim.SGD's momentum buffer); all
arithmetic is fp32 and results are rounded once when stored. Sizes: a parameter must be dense
(contiguous, channels_last, or any other permutation without gaps); gradients with another layout
are copied to the parameter's layout first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ._utils import is_dense, same_layout, use_triton

__all__ = ["FusedLookaheadSGD"]

BLOCK = 2048           # elements per program (one chunk of one tensor)
_NUM_WARPS = 8         # 8 elements per thread: 40 registers on sm_90 (4 warps: 168 and spills)
_STATE_ALIGN = 16      # flat state offsets are multiples of this many elements (16-byte loads)
_HP_FIELDS = ("momentum", "weight_decay", "clip_value", "nesterov", "lookahead_k", "lookahead_alpha")
_SETTINGS = ("lr", *_HP_FIELDS)  # what a param group of this optimizer holds besides its params


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (the reference Lookahead's ``_foreach_lerp_``), for a scalar weight."""
    if weight < 0.5:
        out = start + weight * (end - start)
    else:
        out = end - (end - start) * (1.0 - weight)
    return out


@triton.jit
def _update_chunk(p_ptrs, g_ptrs, buf_ptrs, slow_ptrs, mask, has_grad, sync,
                  lr, momentum, weight_decay, clip, nesterov, alpha):
    """The per-element math of the module docstring on one chunk (mask None: a full chunk)."""
    p = tl.load(p_ptrs, mask=mask).to(tl.float32)
    if has_grad:
        g = tl.load(g_ptrs, mask=mask).to(tl.float32)
        g = tl.where(g > clip, clip, tl.where(g < -clip, -clip, g))  # keeps NaN, like clamp
        if weight_decay != 0.0:
            g = g + weight_decay * p
        buf = momentum * tl.load(buf_ptrs, mask=mask).to(tl.float32) + g
        tl.store(buf_ptrs, buf.to(buf_ptrs.dtype.element_ty), mask=mask)
        if nesterov != 0.0:
            d = g + momentum * buf
        else:
            d = buf
        p = p - lr * d
    if sync:
        slow = _lerp(tl.load(slow_ptrs, mask=mask).to(tl.float32), p, alpha)
        tl.store(slow_ptrs, slow.to(slow_ptrs.dtype.element_ty), mask=mask)
        p = slow
    if has_grad | sync:
        tl.store(p_ptrs, p.to(p_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _lookahead_sgd_kernel(
    anchor_ptr, slow_ptr, chunk_ptr, tensor_ptr, addr_ptr, lr_ptr, hp_ptr, step_ptr, ticket_ptr,
    BUMP_STEP: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of one parameter. Tables (int64, row-major):

    chunk_ptr  [Q, 2]: tensor index, first element of the chunk
    tensor_ptr [T, 3]: numel, offset in the flat state buffers, param-group index
    addr_ptr   [T, 3]: param and grad element offsets from anchor_ptr, has-grad flag
    lr_ptr [G] fp32; hp_ptr [G, 6] fp32 (the _HP_FIELDS; clip = inf when off)
    step_ptr: completed steps (int64); ticket_ptr: int32 counter of finished programs.
    """
    q = tl.program_id(0)
    t = tl.load(chunk_ptr + 2 * q)
    start = tl.load(chunk_ptr + 2 * q + 1)
    numel = tl.load(tensor_ptr + 3 * t)
    state_off = tl.load(tensor_ptr + 3 * t + 1)
    grp = tl.load(tensor_ptr + 3 * t + 2)
    p_off = tl.load(addr_ptr + 3 * t)
    g_off = tl.load(addr_ptr + 3 * t + 1)
    has_grad = tl.load(addr_ptr + 3 * t + 2)
    # The host only sets VEC when every address is 16-byte aligned: then say so, for vector loads.
    start = tl.multiple_of(start, BLOCK)
    p_off = tl.multiple_of(p_off, VEC)
    g_off = tl.multiple_of(g_off, VEC)
    state_off = tl.multiple_of(state_off, VEC)

    lr = tl.load(lr_ptr + grp)
    momentum = tl.load(hp_ptr + 6 * grp)
    weight_decay = tl.load(hp_ptr + 6 * grp + 1)
    clip = tl.load(hp_ptr + 6 * grp + 2)
    nesterov = tl.load(hp_ptr + 6 * grp + 3)
    k = tl.load(hp_ptr + 6 * grp + 4).to(tl.int64)
    alpha = tl.load(hp_ptr + 6 * grp + 5)
    step = tl.load(step_ptr) + 1

    sync = (k > 0) & (step % tl.maximum(k, 1) == 0)
    idx = start + tl.arange(0, BLOCK)
    p_ptrs = anchor_ptr + p_off + idx
    g_ptrs = anchor_ptr + g_off + idx
    buf_ptrs = anchor_ptr + state_off + idx
    slow_ptrs = slow_ptr + state_off + idx
    # Full chunks run unmasked: a mask against a tensor's size (rarely a multiple of the vector
    # width) would stop the compiler from using vector loads and stores.
    if start + BLOCK <= numel:
        _update_chunk(p_ptrs, g_ptrs, buf_ptrs, slow_ptrs, None, has_grad != 0, sync,
                      lr, momentum, weight_decay, clip, nesterov, alpha)
    else:
        _update_chunk(p_ptrs, g_ptrs, buf_ptrs, slow_ptrs, idx < numel, has_grad != 0, sync,
                      lr, momentum, weight_decay, clip, nesterov, alpha)

    if BUMP_STEP:
        # Every program has read `step` before taking its ticket, so the last one may advance it. The
        # barrier makes that true of all this program's warps, not only the one issuing the atomic.
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(0) - 1:
            tl.store(step_ptr, step)
            tl.store(ticket_ptr, 0)


# ----------------------------------------------------------------------------------------------------
# Buckets: the per-(device, dtype) flat state and kernel tables
# ----------------------------------------------------------------------------------------------------
@dataclass
class _Bucket:
    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    groups: list[int]                 # param-group index of each param
    momentum: torch.Tensor            # flat momentum buffers; also the kernel's address anchor
    slow: torch.Tensor                # flat slow weights
    tensor_table: torch.Tensor        # [T, 3] int64 on device
    chunk_table: torch.Tensor         # [Q, 2] int64 on device
    addr_table: torch.Tensor          # [T, 3] int64 on device, see _refresh_addresses
    step: torch.Tensor                # shared per device: completed steps, int64
    ticket: torch.Tensor              # int32 count of finished programs (used when bump_step)
    bump_step: bool = False           # the last bucket of its device advances `step`
    addr_key: list = field(default_factory=list)  # param and grad addresses behind addr_table
    vec: int = 1
    grads: list = field(default_factory=list)  # re-laid-out gradient copies of the current step

    @property
    def num_chunks(self) -> int:
        return self.chunk_table.shape[0]


def _flat_views(flat: torch.Tensor, params: list[torch.Tensor], offsets: list[int]) -> list[torch.Tensor]:
    """Views of ``flat`` with each parameter's sizes and strides (dense, so they tile the segment)."""
    return [flat.as_strided(p.shape, p.stride(), off) for p, off in zip(params, offsets)]


def _to_device(rows: list[tuple], device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """A small host table on ``device`` without a host sync (pinned staging for CUDA)."""
    host = torch.tensor(rows, dtype=dtype).reshape(len(rows), -1)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():  # pinned allocation + copy from host memory
            raise RuntimeError("FusedLookaheadSGD would rewrite a device table during CUDA graph capture "
                               "(a parameter or gradient moved, or its hyperparameters changed): take the "
                               "same step eagerly first, with the gradients the graph will use")
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


# ----------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------
class FusedLookaheadSGD(torch.optim.Optimizer):
    """SGD (momentum, Nesterov, L2 weight decay, clip-by-value) + Lookahead in one kernel per step.

    Matches ``clip_grad_value_`` + ``torch.optim.SGD(lr, momentum, weight_decay, nesterov)`` +
    Lookahead(k, alpha) to fp32 rounding (see the module docstring for the math). ``lookahead_k=0``
    turns Lookahead off. Hyperparameters are per param group; ``lr`` may be a float or a tensor.

    Per-parameter state: ``momentum_buffer`` and, when Lookahead is on, ``slow_param`` (both with
    the parameter's shape, strides and dtype) and ``step`` (an int64 tensor shared by all
    parameters of a device). ``state_dict()``/``load_state_dict()`` use torch's standard layout.

    For CUDA graphs: a float ``lr`` reaches the device table by a ``fill_`` that a captured graph would
    freeze, so call ``_sync_hyperparameters()`` outside the graph before each replay (the trainer passes
    it to ``GraphedStep`` as ``before_replay``), or pass ``lr`` as a device tensor updated outside the
    graph; and take one eager step before capturing so the kernel is compiled and the address table filled.
    """

    def __init__(self, params, lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, clip_value=None,
                 lookahead_k=5, lookahead_alpha=0.5):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        clip_value=clip_value, lookahead_k=lookahead_k, lookahead_alpha=lookahead_alpha)
        self._buckets: list[_Bucket] = []
        super().__init__(params, defaults)
        self._build()

    @property
    def clips_by_value(self) -> bool:
        """True when the kernel clamps every gradient (fasttrain.optim then does not clamp again)."""
        return all(g["clip_value"] is not None for g in self.param_groups)

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def _validate(group: dict) -> None:
        lr = group["lr"]
        if lr.numel() != 1 if isinstance(lr, torch.Tensor) else lr < 0:
            raise ValueError(f"invalid lr {lr!r}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"invalid momentum {group['momentum']}")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"invalid weight_decay {group['weight_decay']}")
        if group["nesterov"] and group["momentum"] <= 0:
            raise ValueError("Nesterov momentum requires momentum > 0")
        if group["clip_value"] is not None and not group["clip_value"] > 0:
            raise ValueError(f"invalid clip_value {group['clip_value']} (None turns clipping off)")
        if int(group["lookahead_k"]) != group["lookahead_k"] or group["lookahead_k"] < 0:
            raise ValueError(f"invalid lookahead_k {group['lookahead_k']} (0 turns Lookahead off)")
        if not 0.0 < group["lookahead_alpha"] <= 1.0:
            raise ValueError(f"invalid lookahead_alpha {group['lookahead_alpha']}")

    def add_param_group(self, param_group: dict) -> None:
        # checked before the base class keeps it: a refused group must leave the optimizer as it was
        self._validate({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)
        if self._buckets:  # a group added after construction: rebuild the flat state around it
            try:
                self._build()
            except Exception:  # its parameters refused (not dense): back to the groups before it
                self.param_groups.pop()
                self._build()
                raise

    @torch.no_grad()
    def _build(self) -> None:
        """(Re)create buckets, flat state (keeping any existing per-param state) and tables.
        `build_count` says how often: a captured CUDA graph holds the old tensors' addresses."""
        self.build_count = getattr(self, "build_count", 0) + 1
        by_key: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if not is_dense(p):
                    raise ValueError(f"FusedLookaheadSGD needs dense parameters, got strides {p.stride()}")
                by_key.setdefault((p.device, p.dtype), []).append((gi, p))
        steps: dict[torch.device, torch.Tensor] = {}
        self._slow_views: dict[torch.Tensor, torch.Tensor] = {}  # each param's slot in its bucket's slow weights
        self._buckets = [self._make_bucket(dev, dt, members, steps) for (dev, dt), members in by_key.items()]
        for b in self._buckets:  # the last launch on a device advances its step counter
            b.bump_step = b is [c for c in self._buckets if c.device == b.device][-1]
        self._hp_tables = {dev: self._new_hp_tables(dev) for dev in steps}

    def _make_bucket(self, device, dtype, members, steps) -> _Bucket:
        groups = [gi for gi, _ in members]
        params = [p for _, p in members]
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // _STATE_ALIGN) * _STATE_ALIGN
        momentum = torch.zeros(max(total, 1), device=device, dtype=dtype)
        slow = torch.zeros_like(momentum)
        mom_views = _flat_views(momentum, params, offsets)
        slow_views = _flat_views(slow, params, offsets)
        if device not in steps:
            steps[device] = self._saved_step(params, device)
        for gi, p, m, s in zip(groups, params, mom_views, slow_views):
            self._adopt_state(p, m, s, steps[device], lookahead=self.param_groups[gi]["lookahead_k"] > 0)
        tensor_rows = [(p.numel(), off, gi) for p, off, gi in zip(params, offsets, groups)]
        chunk_rows = [(i, c) for i, p in enumerate(params) for c in range(0, p.numel(), BLOCK)]
        return _Bucket(
            device, dtype, params, groups, momentum, slow,
            tensor_table=_to_device(tensor_rows, device),
            chunk_table=_to_device(chunk_rows or [(0, 0)], device)[: len(chunk_rows)],
            addr_table=torch.zeros(len(params), 3, dtype=torch.int64, device=device),
            step=steps[device],
            ticket=torch.zeros(1, dtype=torch.int32, device=device),
        )

    def _saved_step(self, params, device) -> torch.Tensor:
        """The device step counter, continued from loaded state when there is one."""
        step = torch.zeros((), dtype=torch.int64, device=device)
        for p in params:
            saved = self.state.get(p, {}).get("step")
            if saved is not None:
                step.copy_(saved if isinstance(saved, torch.Tensor) else torch.tensor(int(saved)))
                break
        return step

    def _adopt_state(self, p, mom_view, slow_view, step, lookahead: bool) -> None:
        """Point p's state at the flat views, copying values a loaded state dict already holds."""
        old = self.state.get(p, {})
        for key, view, default in (("momentum_buffer", mom_view, None), ("slow_param", slow_view, p)):
            value = old.get(key)
            if value is not None:
                view.copy_(value)
            elif default is not None:
                view.copy_(default)  # slow weights start as the parameters
        state = {"momentum_buffer": mom_view, "step": step}
        if lookahead:
            state["slow_param"] = slow_view
        self.state[p] = state
        self._slow_views[p] = slow_view

    @torch.no_grad()
    def _follow_lookahead_switches(self) -> None:
        """A group whose lookahead_k turned from 0 to > 0 starts its slow weights at the parameters as they
        are now (not as they were when the optimizer was built, which its slots still hold), in its state
        (so state_dict saves them); one turned to 0 drops them. Only on a change of hyperparameters."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if group["lookahead_k"] > 0 and "slow_param" not in state:
                    state["slow_param"] = self._slow_views[p].copy_(p)
                elif group["lookahead_k"] == 0:
                    state.pop("slow_param", None)

    def _new_hp_tables(self, device) -> dict:
        num_groups = len(self.param_groups)
        return {"lr": torch.zeros(num_groups, dtype=torch.float32, device=device),
                "hp": torch.zeros(num_groups, len(_HP_FIELDS), dtype=torch.float32, device=device),
                "lr_key": [None] * num_groups, "hp_key": None}

    def load_state_dict(self, state_dict: dict) -> None:
        if "lookahead" in state_dict:  # fasttrain.optim.Lookahead's layout: slow weights beside the inner state
            raise ValueError("this optimizer state keeps its Lookahead slow weights apart from the per-parameter "
                             "state: it was saved by optim.impl torch (set it to resume it)")
        # checked before the base class replaces anything: a refused state must leave the optimizer as it was
        for saved in state_dict.get("param_groups", []):
            missing = [key for key in _SETTINGS if key not in saved]
            if missing:
                raise ValueError(f"this optimizer state has no {', '.join(missing)}: it was not saved by "
                                 "FusedLookaheadSGD (a torch.optim.SGD state is resumed by optim.impl torch)")
            self._validate(saved)
        super().load_state_dict(state_dict)
        self._build()  # the base class replaced self.state with loaded copies: re-flatten them

    # -- the step --------------------------------------------------------------------------------
    def _hp_row(self, group: dict) -> tuple:
        clip = group["clip_value"]
        return (float(group["momentum"]), float(group["weight_decay"]),
                math.inf if clip is None else float(clip), float(bool(group["nesterov"])),
                float(group["lookahead_k"]), float(group["lookahead_alpha"]))

    def _sync_hyperparameters(self) -> None:
        """Mirror the param groups into the device tables: lr every step (no sync), the rest on change."""
        rows = [self._hp_row(g) for g in self.param_groups]
        if any(tables["hp_key"] != rows for tables in self._hp_tables.values()):
            self._follow_lookahead_switches()
        for device, tables in self._hp_tables.items():
            for gi, group in enumerate(self.param_groups):
                lr = group["lr"]
                if isinstance(lr, torch.Tensor):
                    tables["lr"][gi].copy_(lr.reshape(()), non_blocking=True)
                    tables["lr_key"][gi] = None
                elif tables["lr_key"][gi] != lr:
                    tables["lr"][gi].fill_(float(lr))
                    tables["lr_key"][gi] = lr
            if tables["hp_key"] != rows:
                tables["hp"].copy_(_to_device(rows, device, torch.float32))
                tables["hp_key"] = rows

    def _refresh_addresses(self, b: _Bucket) -> None:
        """Keep b.addr_table (param offset, grad offset, has grad; elements from the anchor
        b.momentum) in step with where the params and grads are.

        The fast path compares raw addresses only (~0.5 us per parameter): autograd hands out
        gradients with the parameter's layout, and the caching allocator tends to return the same
        blocks each step, so the table is rarely rewritten. New addresses get the full checks.
        """
        grads = [p.grad for p in b.params]
        key = [p.data_ptr() for p in b.params] + [0 if g is None else g.data_ptr() for g in grads]
        if key == b.addr_key and not b.grads:
            return
        anchor, size = b.momentum.data_ptr(), b.momentum.element_size()
        rows, addrs, b.grads = [], [anchor], []
        for p in b.params:
            if p.stride() != self.state[p]["momentum_buffer"].stride():
                raise RuntimeError("a parameter's memory layout changed after FusedLookaheadSGD was built "
                                   "(e.g. model.to(memory_format=...)): convert the model first")
            g = self._grad_like_param(p)
            if g is not None and g is not p.grad:
                b.grads.append(g)  # a re-laid-out copy: keep it alive until the launch
            g_addr = g.data_ptr() if g is not None else anchor
            addrs += [p.data_ptr(), g_addr]
            rows.append(((p.data_ptr() - anchor) // size, (g_addr - anchor) // size, int(g is not None)))
        b.addr_table.copy_(_to_device(rows, b.device))
        b.addr_key = key
        b.vec = 16 // size if all(a % 16 == 0 for a in addrs) else 1

    @staticmethod
    def _grad_like_param(p: torch.Tensor):
        """p.grad, checked, in p's memory layout (so element i of both spans is the same entry)."""
        g = p.grad
        if g is None:
            return None
        if g.is_sparse or g.dtype != p.dtype or g.device != p.device:
            raise RuntimeError("FusedLookaheadSGD needs dense gradients with the parameter's dtype and device")
        if not same_layout(g, p):
            g = torch.empty_like(p).copy_(g)  # p is dense: empty_like keeps its strides
        return g

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        for b in self._buckets:
            if use_triton(b.momentum):
                self._launch(b)
            else:
                self._step_reference(b)
        return loss

    def _launch(self, b: _Bucket) -> None:
        self._refresh_addresses(b)
        tables = self._hp_tables[b.device]
        if b.num_chunks == 0:  # only empty parameters: nothing to update, still count the step
            if b.bump_step:
                b.step.add_(1)
            return
        _lookahead_sgd_kernel[(b.num_chunks,)](
            b.momentum, b.slow, b.chunk_table, b.tensor_table, b.addr_table, tables["lr"], tables["hp"],
            b.step, b.ticket, BUMP_STEP=b.bump_step, VEC=b.vec, BLOCK=BLOCK, num_warps=_NUM_WARPS,
        )

    def _step_reference(self, b: _Bucket) -> None:
        """The kernel's math in PyTorch, on the same state (the CPU path without the interpreter)."""
        t = int(b.step) + 1  # a CPU tensor: reading it costs no device sync
        for p, gi in zip(b.params, b.groups):
            group, state = self.param_groups[gi], self.state[p]
            momentum, wd, clip, nesterov, k, alpha = self._hp_row(group)
            lr = float(group["lr"])
            new_p = p.float()
            grad = self._grad_like_param(p)
            if grad is not None:
                g = grad.float().clamp(-clip, clip)
                if wd != 0.0:
                    g = g + wd * new_p
                buf = momentum * state["momentum_buffer"].float() + g
                state["momentum_buffer"].copy_(buf)
                new_p = new_p - lr * (g + momentum * buf if nesterov else buf)
            if k > 0 and t % int(k) == 0:
                new_p = torch.lerp(state["slow_param"].float(), new_p, alpha)
                state["slow_param"].copy_(new_p)
            p.copy_(new_p)
        if b.bump_step:
            b.step.fill_(t)
