"""The paper's ResNet family ("Efficient ResNets", Thakur et al. 2023), every knob a config key.

    stem:   conv 3x3 (3 -> C_1), BN, ReLU, [SE when se_placement = stem]; 3x3 whatever F_1 is, as in the paper
    stage i (i = 1..N): B_i BasicBlocks with C_1 * 2^(i-1) channels, stride 2 in the first block of i > 1
    block:  conv F_i - BN - ReLU - conv F_i - BN [- SE when se_placement = blocks] + shortcut, ReLU
            shortcut: identity, or a K_i x K_i conv (stride s) + BN when the shape changes
    head:   [dropout], average pool P, flatten, linear -> num_classes

Convolutions have no bias (BN follows); SE's two 1x1 convolutions do. `stem_frozen` keeps the stem
convolution's weights out of training (and of the trainable-parameter count); `stem_init: whiten` is
applied by the trainer, which has the training images (fasttrain/whiten.py). The paper's best model
(N=3, B=[4,4,3], F=[3,3,3], K=[1,1,1], C_1=64, P=8, SE after the stem, r=16) has 4,697,742
trainable parameters; its ResNet18 comparison (N=4, B=[2,2,2,2], P=4, no SE) has 11,173,962.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain.config import ConfigError, ModelConfig

STEM_KERNEL = 3  # the reference's stem is a 3x3 conv for every F_1 (F_i sizes the stages' convs only)


class SqueezeExcite(nn.Module):
    """y = x * sigmoid(fc2(relu(fc1(mean_hw(x))))), optionally relu(y + residual) (fused in Triton).

    `impl="triton"` routes through the `fasttrain::se_gate` op: the Triton kernels on CUDA, the
    PyTorch reference on CPU, so a model built with it works everywhere.
    """

    def __init__(self, channels: int, reduction: int = 16, impl: str = "torch"):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.impl = impl

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.impl == "triton":
            from fasttrain.kernels.se import se_gate

            return se_gate(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual)
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        out = x * scale
        return out if residual is None else F.relu(out + residual)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, kernel: int, shortcut_kernel: int,
                 se: SqueezeExcite | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel, 1, kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = se
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride, shortcut_kernel // 2, bias=False),
                nn.BatchNorm2d(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.se is not None:  # SE-ResNet: gate the residual branch; the op fuses add + ReLU
            return self.se(out, residual=self.shortcut(x))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c1 = cfg.base_channels
        se_stem = cfg.se and cfg.se_placement == "stem"
        se_blocks = cfg.se and cfg.se_placement == "blocks"
        self.stem = nn.Sequential(
            nn.Conv2d(3, c1, STEM_KERNEL, 1, STEM_KERNEL // 2, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
        )
        self.stem[0].weight.requires_grad_(not cfg.stem_frozen)
        self.stem_se = SqueezeExcite(c1, cfg.se_reduction, cfg.se_impl) if se_stem else None

        stages, cin = [], c1
        for i in range(cfg.layers):
            cout = c1 * 2 ** i
            blocks = []
            for b in range(cfg.blocks[i]):
                stride = 2 if (i > 0 and b == 0) else 1
                se = SqueezeExcite(cout, cfg.se_reduction, cfg.se_impl) if se_blocks else None
                blocks.append(BasicBlock(cin, cout, stride, cfg.conv_kernel[i], cfg.shortcut_kernel[i], se))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.pool = nn.AvgPool2d(cfg.pool_kernel)
        final_size = 32 // 2 ** (cfg.layers - 1)
        pooled = (final_size - cfg.pool_kernel) // cfg.pool_kernel + 1
        self.fc = nn.Linear(cin * pooled * pooled, cfg.num_classes)
        self._init_weights(cfg.zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        if self.fc.weight.is_meta:  # build_model's weightless copy for the budget: nothing to fill, and
            return                  # normal_ on meta imports torch._dynamo (3 s on a CPU)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # Goyal et al. 2017, torchvision's zero_init_residual, timm's zero_init_last
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.stem_se is not None:
            x = self.stem_se(x)
        x = self.stages(x)
        x = self.pool(self.dropout(x))
        return self.fc(torch.flatten(x, 1))


def squeeze_excite_weights(model: nn.Module) -> list[nn.Parameter]:
    """The SE blocks' fc1 and fc2 weights: fully connected layers in role, written as 1x1 convolutions (so
    filter banks by shape; optim.muon_se says which optimizer they take)."""
    return [p for m in model.modules() if isinstance(m, SqueezeExcite) for p in (m.fc1.weight, m.fc2.weight)]


def count_params(model: nn.Module) -> int:
    """Trainable parameters, the quantity the 5M budget is about."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_budget(model: nn.Module, cfg: ModelConfig) -> int:
    n = count_params(model)
    if n > cfg.max_params:
        raise ConfigError(
            f"the model has {n:,} trainable parameters, over the budget model.max_params = "
            f"{cfg.max_params:,}: shrink model.base_channels or model.blocks, or raise model.max_params"
        )
    return n


def build_model(cfg: ModelConfig, check: bool = True, device: torch.device | str | None = None) -> ResNet:
    """Build the network (on `device`, if given); refuse (before any training) a model over the
    parameter budget, and say so plainly when one within a raised budget does not fit in memory.

    The budget is checked on a weightless copy (the meta device) first: a model of 10^16 bytes must be
    refused, not allocated, and one of a few GB refused in a fraction of a second."""
    if check:
        check_budget(_meta_model(cfg), cfg)
    try:
        model = ResNet(cfg)
        return model if device is None else model.to(device)
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and not _is_allocation_failure(e):
            raise
        where = "the GPU" if isinstance(e, torch.OutOfMemoryError) else "host memory"
        meta = _meta_model(cfg)  # only here: eval and export build without the check, and need no copy
        size = sum(t.numel() * t.element_size() for t in [*meta.parameters(), *meta.buffers()])
        raise ConfigError(
            f"the model ({count_params(meta):,} trainable parameters, {size / 2**30:,.1f} GiB of fp32 "
            f"weights before any activation or optimizer state) does not fit in {where}: shrink "
            "model.base_channels or model.blocks (model.max_params = "
            f"{cfg.max_params:,} admits it, but this machine cannot hold it)"
        ) from None


def _is_allocation_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _meta_model(cfg: ModelConfig) -> ResNet:
    # fork_rng: the meta build must leave the CPU generator as it was, so the real build draws the same
    # weights for a seed as without the check (meta initializers draw nothing today; this keeps it so)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            return ResNet(cfg)
        except (RuntimeError, TypeError) as e:
            if "overflow" not in str(e).lower():
                raise
            # a tensor of 2**63 bytes or more: even its size cannot be computed, let alone counted
            raise ConfigError(
                "the model is too large to build (a tensor of it would exceed 2**63 bytes), over the budget "
                f"model.max_params = {cfg.max_params:,}: shrink model.base_channels, "
                "model.num_classes or model.blocks"
            ) from None


def forward_flops(model: nn.Module, image_size: int = 32) -> int:
    """Multiply-adds x 2 of one forward pass of one image, counted from the model's own layers.

    Convolutions and the linear head dominate; BN/ReLU/pooling/SE elementwise work is ignored, as in
    the usual FLOP counts (the paper's 798,690,304 multiply-adds for the best model).
    """
    macs = 0

    def conv_hook(mod: nn.Conv2d, inp, out):
        nonlocal macs
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        macs += out.shape[1] * out.shape[2] * out.shape[3] * k

    def linear_hook(mod: nn.Linear, inp, out):
        nonlocal macs
        macs += mod.in_features * mod.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return 2 * macs
