"""`optim.name: muon`: Muon for the convolutions' filters, SGD (`optim.nesterov`) for every other parameter.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; the CIFAR-10
speedrun's optimizer since airbench94_muon) takes SGD's momentum update of a weight matrix and replaces it
by the nearest semi-orthogonal matrix, U V^T of its singular value decomposition U S V^T: every direction
the update moves in gets the same step, instead of the few dominant ones that a raw gradient favours. A
filter bank [out, in, kh, kw] is the matrix [out, in * kh * kw]. Per filter bank, step t::

    buf = mu * buf + g                      (g: the gradient; buf starts at 0)
    d   = g + mu * buf  (Nesterov)  or  buf
    O   = orthogonalize(d as [out, in*kh*kw])
    p   = p * (1 - lr * wd) - lr * sqrt(max(1, rows / cols)) * O      (decoupled weight decay)

or, with `optim.muon_normalize`, p = p * sqrt(out) / ||p||_F - lr * sqrt(max(1, rows / cols)) * O: the bank
held at a unit filter norm on average (airbench94_muon's), so a step of lr moves it by the same fraction all
run long, where weight decay alone lets Muon's steady steps grow the weights (best.yaml's trained banks: 5-10x
their initial norm) and so shrink that fraction.

`orthogonalize` runs `optim.muon_ns_steps` Newton-Schulz iterations (Muon's 5; the quintic with coefficients
3.4445, -4.7750, 2.0315 from the Muon write-up) on the matrix scaled to Frobenius norm 1: they push its
singular values towards 1 (into roughly 0.7..1.2, which is all Muon needs) with matrix products only, no
SVD. Each iteration multiplies a small singular value by ~3.4, so fewer leave the update's weakest
directions short of 1 (a trade measured on accuracy, not assumed). On a GPU they run in bf16 (the products
of a step take microseconds); elsewhere in fp32. How the banks are batched (`optim.muon_batching`):

* ``shape``: banks of one shape together, one batched Newton-Schulz per shape (10 on best.yaml: 150 matrix
  products a step at 5 iterations, each with a few output tiles: 64 x 64 to 256 x 256 results);
* ``padded``: every bank zero-padded into one [banks, R, C] batch (R x C the largest wide orientation): 15
  products a step, 4.8x the FLOPs on best.yaml (67 GFLOPs; 13.9 by shape). Zero padding changes nothing
  but rounding: with X = [[A, 0], [0, 0]], X X^T and every polynomial of it keep the block form, so the
  iteration on X is the iteration on A (and ||X||_F = ||A||_F). Which is faster on a GPU, where the step
  runs as a CUDA graph and costs GPU time alone, is measured by benchmarks/kernels/bench_optim.py.

Every other parameter (BN scales and shifts, biases, the head's linear layer; the SE blocks' 1x1 convolutions
too with `optim.muon_se` false) takes torch.optim.SGD's update with `optim.lr`, `optim.momentum`, `optim.nesterov` and
`optim.weight_decay` (L2, as SGD; not on 1-D parameters with optim.decay_norm_and_bias false). The filters'
learning rate is `optim.muon_lr`, their momentum `optim.muon_momentum`; the schedule scales both learning
rates alike (each group's ``lr_scale``).

For train.cuda_graph: the learning rates live in device tensors, written by `_sync_hyperparameters` (the
trainer calls it outside the graph before each replay; an eager step calls it itself), and the momentum
buffers exist from construction, so the graph's warmup and capture find every tensor a step changes. No
step reads a tensor back to the host. Lookahead is not combined with it (config.validate refuses it): its
every-k-steps decision would sit on the host.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from fasttrain.config import CHOICES

# the quintic Newton-Schulz iteration's coefficients (Muon's write-up): x <- A x + (B xx^T + C (xx^T)^2) x
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
BATCHINGS = CHOICES["optim.muon_batching"]  # shape | padded: see the module docstring


def is_filter_bank(p: torch.Tensor) -> bool:
    """The parameters Muon updates: convolution weights [out, in, kh, kw]."""
    return p.ndim == 4


@torch.no_grad()
def orthogonalize(m: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximately semi-orthogonal matrix near U V^T for each matrix of `m` ([..., rows, cols]), in
    `dtype`: `steps` Newton-Schulz iterations on m / ||m||_F (run on the wide orientation, so the
    products are the small rows x rows ones)."""
    a, b, c = NS_COEFFICIENTS
    x = m.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    lead, rows, cols = x.shape[:-2], x.size(-2), x.size(-1)
    x = x.reshape(-1, rows, cols)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # singular values now <= 1, where the iteration converges
    for _ in range(steps):
        # three batched products an iteration, the sums folded into them (beta x input + alpha x product):
        # 3 launches where the plain expression takes 8 (its scalings and additions each a pass of their
        # own), for a GPU step over small banks that is likely bound by its launches (not yet measured)
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b xx^T + c (xx^T)^2
        x = torch.baddbmm(x, poly, x, beta=a)                    # a x + poly x
    x = x.reshape(*lead, rows, cols)
    return x.mT if tall else x


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """A filter bank [out, in, kh, kw] as the matrix Muon orthogonalizes: (out, in * kh * kw)."""
    return p.shape[0], p[0].numel()


def wide_shape(p: torch.Tensor) -> tuple[int, int]:
    """A filter bank's matrix in the orientation Newton-Schulz runs on: rows <= cols."""
    rows, cols = matrix_shape(p)
    return (rows, cols) if rows <= cols else (cols, rows)


def padded_shape(banks) -> tuple[int, int]:
    """The [rows, cols] every bank of `banks` is zero-padded to under optim.muon_batching padded: the largest
    wide orientation's rows and the largest's cols."""
    shapes = [wide_shape(p) for p in banks]
    return max(r for r, _ in shapes), max(c for _, c in shapes)


def update_scale(p: torch.Tensor) -> float:
    """Muon's per-bank factor on the learning rate: sqrt(max(1, rows / cols))."""
    rows, cols = matrix_shape(p)
    return math.sqrt(max(1.0, rows / cols))


def orthogonalize_flops(params, steps: int = NS_STEPS, batching: str = "shape") -> int:
    """The matrix-product FLOPs of one step's orthogonalizations over the filter banks among `params`: per
    iteration 4 r^2 c + 2 r^3 (x x^T, its square, and the product with x; r x c the wide orientation, with
    `batching` padded the largest r and the largest c of all banks, zeros included)."""
    banks = [p for p in params if is_filter_bank(p)]
    shapes = [padded_shape(banks)] * len(banks) if batching == "padded" and banks else map(wide_shape, banks)
    return sum(steps * (4 * r * r * c + 2 * r ** 3) for r, c in shapes)


class Muon(torch.optim.Optimizer):
    """Muon on the groups marked ``muon: True`` (filter banks), Nesterov/momentum SGD on the others.

    Group keys: lr (set by the schedule), lr_scale (the schedule multiplies its rate by it), momentum,
    nesterov, weight_decay (decoupled on Muon's groups, L2 on the others), muon. State per parameter:
    ``momentum_buffer`` (torch.optim.SGD's name and layout), created at construction."""

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 0.0, batching: str = "shape", ns_steps: int = NS_STEPS,
                 normalize: bool = False):
        if batching not in BATCHINGS:
            raise ValueError(f"Muon's batching must be one of {BATCHINGS}, not {batching!r}")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"Muon's ns_steps (Newton-Schulz iterations a step) must be an int >= 1, not {ns_steps!r}")
        defaults = dict(lr=lr, lr_scale=1.0, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        muon=False)
        super().__init__(params, defaults)
        # how the step batches its banks (module docstring): the optimizer's, not a group's, so a checkpoint
        # written under one resumes under the other (the same update, rounded differently)
        self.batching = batching
        # like batching, the config's and not saved: a resume takes the config's count and normalization
        self.ns_steps = ns_steps
        self.normalize = normalize
        for group in self.param_groups:
            if group["muon"] and not all(is_filter_bank(p) for p in group["params"]):
                raise ValueError("Muon's groups hold convolution filters [out, in, kh, kw] only")
        self._lr_tensors: list[torch.Tensor | None] = []
        self._lr_keys: list[float | None] = []
        self._build()

    def _build(self) -> None:
        """Momentum buffers for every parameter (kept if loaded) and one device lr tensor per group.
        `build_count` counts the builds: a captured CUDA graph holds the old tensors' addresses."""
        self.build_count = getattr(self, "build_count", 0) + 1
        for group in self.param_groups:
            for p in group["params"]:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self._lr_tensors = [torch.zeros((), dtype=torch.float32, device=g["params"][0].device) if g["params"]
                            else None for g in self.param_groups]
        self._lr_keys = [None] * len(self.param_groups)
        self._sync_hyperparameters()

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_lr_tensors"):  # after __init__: a new group gets its buffers and lr tensor
            self._build()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._build()  # the base class replaced the state's tensors: new addresses

    def _sync_hyperparameters(self) -> None:
        """Each group's lr into its device tensor, where it changed: no host sync, and nothing to do inside a
        CUDA-graph capture (the trainer syncs just before it), where a write would be frozen into the graph."""
        for i, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            if self._lr_tensors[i] is None or self._lr_keys[i] == lr:
                continue
            t = self._lr_tensors[i]
            if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("Muon's learning rate changed during CUDA graph capture: call "
                                   "_sync_hyperparameters() before capturing")
            t.fill_(lr)
            self._lr_keys[i] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        for group, lr in zip(self.param_groups, self._lr_tensors):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            directions = self._momentum_directions(group, params)
            if group["muon"]:
                if self.normalize:
                    _normalize_banks(params)
                elif group["weight_decay"] != 0:
                    torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
                update = _padded_update if self.batching == "padded" else _update_by_shape
                update(params, directions, lr, self.ns_steps)
            else:
                torch._foreach_sub_(params, torch._foreach_mul(directions, lr))
        return loss

    def _momentum_directions(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """buf = mu buf + g, then g + mu buf (Nesterov) or buf; g takes the L2 term on SGD's groups."""
        grads = [p.grad for p in params]
        mu, wd = group["momentum"], group["weight_decay"]
        if wd != 0 and not group["muon"]:
            grads = torch._foreach_add(grads, params, alpha=wd)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if mu == 0:
            return grads
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        return torch._foreach_add(grads, bufs, alpha=mu) if group["nesterov"] else bufs


def _normalize_banks(params: list[torch.Tensor]) -> None:
    """Each bank [out, ...] rescaled to Frobenius norm sqrt(out), on the device (no host sync): a unit-norm
    filter on average, as airbench94_muon keeps them."""
    scales = torch._foreach_norm(params)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, [math.sqrt(p.shape[0]) for p in params])
    torch._foreach_mul_(params, scales)


def _ns_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.bfloat16 if p.device.type == "cuda" else torch.float32


def _update_by_shape(params: list[torch.Tensor], directions: list[torch.Tensor], lr: torch.Tensor,
                     steps: int = NS_STEPS) -> None:
    """p -= lr sqrt(max(1, rows/cols)) NS(d), one batched Newton-Schulz per bank shape."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        by_shape[matrix_shape(p)].append(i)
    for (rows, cols), members in by_shape.items():
        # stack the 4-D directions first, then view them as matrices: one copy for the group (a channels_last
        # bank reshaped alone is a copy of its own)
        stacked = torch.stack([directions[i] for i in members]).reshape(len(members), rows, cols)
        ortho = orthogonalize(stacked, steps, dtype=_ns_dtype(params[0]))
        # one copy casts to the parameters' dtype and lays out [bank, rows, cols] (a tall bank's result
        # is a transposed view), one multiply scales the group: per bank, only the subtraction's views
        update = torch.empty((len(members), rows, cols), dtype=params[0].dtype, device=params[0].device)
        update.copy_(ortho).mul_(lr * update_scale(params[members[0]]))
        torch._foreach_sub_([params[i] for i in members],
                            [u.view(params[i].shape) for u, i in zip(update.unbind(0), members)])


def _bank_slot(padded: torch.Tensor, i: int, p: torch.Tensor) -> torch.Tensor:
    """Bank i's place in the padded batch, as a view shaped like `p` ([out, in, kh, kw]): the top-left
    rows x cols block of matrix i, or for a tall bank the transpose of its top-left cols x rows block.
    (Splitting the matrix's column dimension into in, kh, kw is a view whatever its stride.)"""
    rows, cols = matrix_shape(p)
    if rows <= cols:
        return padded[i, :rows, :cols].view(p.shape)
    return padded[i, :cols, :rows].mT.view(p.shape)


def _padded_update(params: list[torch.Tensor], directions: list[torch.Tensor], lr: torch.Tensor,
                   steps: int = NS_STEPS) -> None:
    """The same update as _update_by_shape, every bank in one zero-padded Newton-Schulz batch: a copy in and
    one fused multiply-add out per bank, 15 matrix products for all of them."""
    padded = torch.zeros((len(params), *padded_shape(params)), dtype=_ns_dtype(params[0]), device=params[0].device)
    for i, (p, d) in enumerate(zip(params, directions)):
        _bank_slot(padded, i, p).copy_(d)  # any layout of d (channels_last too): one strided copy
    ortho = orthogonalize(padded, steps, dtype=padded.dtype)
    steps: dict[float, torch.Tensor] = {}  # -lr sqrt(max(1, rows/cols)) per distinct ratio: a few kernels
    for i, p in enumerate(params):
        scale = update_scale(p)
        if scale not in steps:
            steps[scale] = lr * -scale
        # p += -lr scale NS(d), computed in p's dtype from NS's (bf16 on a GPU): one kernel a bank
        p.addcmul_(_bank_slot(ortho, i, p), steps[scale])


def muon_param_groups(filters: list[nn.Parameter], groups_for_others: list[dict], *, lr: float, muon_lr: float,
                      muon_momentum: float, weight_decay: float) -> list[dict]:
    """Muon's group (`filters`, filter banks) first, then `groups_for_others` (the rest, grouped by the
    weight-decay rule) as SGD's groups. The order is fixed, so checkpoints pair up."""
    muon = [{"params": filters, "muon": True, "lr": muon_lr, "lr_scale": muon_lr / lr, "momentum": muon_momentum,
             "nesterov": True, "weight_decay": weight_decay}] if filters else []
    return muon + groups_for_others
