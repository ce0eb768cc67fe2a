"""The paper's architecture family: exact parameter counts, every knob, the budget, FLOPs."""
import pytest
import torch

from fasttrain.config import ConfigError, ModelConfig, load_config
from fasttrain.model import ResNet, SqueezeExcite, build_model, count_params, forward_flops


def test_seed_config_is_the_papers_best_model_exactly():
    model = build_model(load_config("configs/seed.yaml").model)
    assert count_params(model) == 4_697_742
    assert forward_flops(model) == 2 * 798_690_304  # the paper's multiply-adds per image


def test_resnet18_comparison_exactly():
    assert count_params(build_model(load_config("configs/resnet18.yaml").model)) == 11_173_962


def test_budget_refuses_a_bigger_model_with_count_and_budget():
    cfg = load_config("configs/resnet18.yaml").model
    cfg.max_params = 5_000_000
    with pytest.raises(ConfigError, match=r"11,173,962.*5,000,000"):
        build_model(cfg)


def test_budget_refuses_a_huge_model_without_building_it():
    """10^8 base channels: 10^19 parameters, refused with the budget message (it was an allocation
    of 10^16 bytes, a RuntimeError, before the count was ever taken)."""
    with pytest.raises(ConfigError, match=r"the model has 11,441,250,017,806,250,010 trainable parameters, over the "
                                          r"budget model\.max_params = 5,000,000: shrink model\.base_channels"):
        build_model(ModelConfig(base_channels=10**8))


@pytest.mark.parametrize("kw", [dict(base_channels=10**9), dict(base_channels=10**30), dict(num_classes=10**24)])
def test_a_model_too_large_to_count_is_refused_too(kw):
    with pytest.raises(ConfigError, match=r"too large to build .*model\.max_params = 5,000,000: shrink"):
        build_model(ModelConfig(**kw))


def test_a_refused_model_is_never_built_with_weights(monkeypatch):
    """The budget is checked on the meta device: a model over it never allocates (gigabytes, for a
    base_channels of a few thousand)."""
    devices = []
    init = ResNet._init_weights

    def spy(self, zero_init_residual):
        devices.append(self.fc.weight.device.type)
        init(self, zero_init_residual)

    monkeypatch.setattr(ResNet, "_init_weights", spy)
    cfg = load_config("configs/resnet18.yaml").model
    cfg.max_params = 5_000_000
    with pytest.raises(ConfigError, match="over the budget"):
        build_model(cfg)
    assert devices == ["meta"]
    devices.clear()
    assert next(build_model(load_config("configs/smoke.yaml").model).parameters()).device.type == "cpu"
    assert devices == ["meta", "cpu"]


@pytest.mark.parametrize("failure, where", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 129600000000 bytes. Error code 12"), "host memory"),
    (MemoryError(), "host memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 120.00 GiB"), "the GPU"),
])
def test_a_model_within_a_raised_budget_that_does_not_fit_is_a_config_error(monkeypatch, failure, where):
    """model.max_params raised by hand past what the machine holds: the allocation's failure (a
    RuntimeError from the CPU allocator, a MemoryError, or CUDA's OutOfMemoryError in .to(device)) is
    one message with the model's size and the fix, not a traceback from inside nn.Conv2d."""
    cfg = load_config("configs/smoke.yaml").model
    if isinstance(failure, torch.OutOfMemoryError):
        def fail_to(self, *args, **kwargs):
            raise failure
        monkeypatch.setattr(ResNet, "to", fail_to)
    else:
        init = ResNet._init_weights

        def fail_init(self, zero_init_residual):
            if not self.fc.weight.is_meta:
                raise failure
            init(self, zero_init_residual)
        monkeypatch.setattr(ResNet, "_init_weights", fail_init)
    with pytest.raises(ConfigError, match=rf"the model \(19,996 trainable parameters, 0\.0 GiB of fp32 weights .*\) "
                                          rf"does not fit in {where}: shrink model\.base_channels or model\.blocks"):
        build_model(cfg, device="cpu")


def test_other_errors_of_a_build_are_not_called_a_lack_of_memory(monkeypatch):
    def broken(self, zero_init_residual):
        if not self.fc.weight.is_meta:
            raise RuntimeError("some other failure")
    monkeypatch.setattr(ResNet, "_init_weights", broken)
    with pytest.raises(RuntimeError, match="^some other failure$"):
        build_model(load_config("configs/smoke.yaml").model)


@pytest.mark.parametrize("extra", [[], ["--model.se_placement", "blocks", "--model.zero_init_residual", "true"]])
def test_build_model_draws_the_weights_of_a_plain_resnet_for_a_seed(extra):
    """The budget check builds a meta copy first; it must not draw from the generator, or a seed
    would give other weights (and another data stream after them) than before the check existed."""
    cfg = load_config("configs/smoke.yaml", extra).model
    torch.manual_seed(11)
    built = build_model(cfg).state_dict()
    after_build = torch.rand(4)
    torch.manual_seed(11)
    plain = ResNet(cfg).state_dict()
    after_plain = torch.rand(4)
    assert built.keys() == plain.keys() and all(torch.equal(built[k], plain[k]) for k in built)
    assert torch.equal(after_build, after_plain)
    assert not any(v.is_meta for v in built.values())
    assert built["stem.0.weight"].std() > 0  # initialized, not left empty


@pytest.mark.parametrize("kw", [
    dict(layers=2, blocks=[1, 1], conv_kernel=[3, 5], shortcut_kernel=[1, 3], pool_kernel=16, base_channels=8),
    dict(layers=4, blocks=[1, 2, 1, 1], conv_kernel=[3] * 4, shortcut_kernel=[1] * 4, pool_kernel=2, base_channels=4),
    dict(layers=3, blocks=[1, 1, 1], conv_kernel=[3] * 3, shortcut_kernel=[1] * 3, pool_kernel=4, base_channels=8,
         se_placement="blocks", dropout=0.2),
    dict(layers=3, blocks=[2, 1, 1], conv_kernel=[5, 3, 3], shortcut_kernel=[3, 1, 1], pool_kernel=8, base_channels=8,
         se=False),
])
def test_knobs_build_and_run(kw):
    cfg = ModelConfig(**kw)
    model = build_model(cfg)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    # the stage widths double from C_1
    widths = [stage[0].conv1.out_channels for stage in model.stages]
    assert widths == [cfg.base_channels * 2 ** i for i in range(cfg.layers)]
    # the blocks per stage and the conv kernels per stage follow B_i and F_i
    assert [len(s) for s in model.stages] == cfg.blocks
    assert [s[0].conv1.kernel_size[0] for s in model.stages] == cfg.conv_kernel
    # both convs of every block: F_i is the block's kernel, not its first conv's only
    assert [{b.conv2.kernel_size[0] for b in s} for s in model.stages] == [{k} for k in cfg.conv_kernel]
    assert all(b.conv2.padding == (b.conv2.kernel_size[0] // 2,) * 2 for s in model.stages for b in s)
    assert model.stem[0].kernel_size == (3, 3)  # the paper's stem is 3x3 whatever F_1 is
    # K_i: every projection shortcut of stage i has a K_i x K_i kernel (the first stage keeps its width:
    # an identity shortcut, unless C_1 differs from the stem's)
    for i, stage in enumerate(model.stages):
        for block in stage:
            if not isinstance(block.shortcut, torch.nn.Identity):
                assert block.shortcut[0].kernel_size == (cfg.shortcut_kernel[i],) * 2
    assert any(not isinstance(s[0].shortcut, torch.nn.Identity) for s in model.stages[1:])
    # P: the average pool's kernel, and the classifier's input of C_N x (final size / P)^2 features
    final_size = 32 // 2 ** (cfg.layers - 1)
    assert model.pool.kernel_size == cfg.pool_kernel
    assert model.fc.in_features == widths[-1] * (final_size // cfg.pool_kernel) ** 2
    # dropout: its rate, before the pool (on the feature map, not on the pooled features)
    assert (model.dropout.p if cfg.dropout > 0 else 0.0) == cfg.dropout
    calls = []
    hooks = [getattr(model, name).register_forward_hook(lambda *a, name=name: calls.append(name))
             for name in ("dropout", "pool")]
    model(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert calls == ["dropout", "pool"]


def test_se_placement():
    base = dict(layers=3, blocks=[1, 1, 1], conv_kernel=[3] * 3, shortcut_kernel=[1] * 3, base_channels=8)
    stem = build_model(ModelConfig(**base, se_placement="stem"))
    blocks = build_model(ModelConfig(**base, se_placement="blocks"))
    none = build_model(ModelConfig(**base, se=False))
    assert isinstance(stem.stem_se, SqueezeExcite) and all(b.se is None for s in stem.stages for b in s)
    assert blocks.stem_se is None and all(isinstance(b.se, SqueezeExcite) for s in blocks.stages for b in s)
    assert none.stem_se is None and sum(isinstance(m, SqueezeExcite) for m in none.modules()) == 0
    off = build_model(ModelConfig(**base, se=False, se_placement="blocks"))  # se false wins over placement
    assert sum(isinstance(m, SqueezeExcite) for m in off.modules()) == 0


@pytest.mark.parametrize("residual", [False, True])
def test_the_torch_se_is_the_kernels_reference(residual):
    """model.se_impl torch (the default) computes what the Triton op and its reference compute: the
    spatial mean, the gate, and with a residual (SE in blocks) the add and the block's ReLU."""
    from fasttrain.kernels.se import se_gate_reference

    torch.manual_seed(0)
    se = SqueezeExcite(24, 16)
    x = torch.randn(2, 24, 5, 3)
    r = torch.randn(2, 24, 5, 3) if residual else None
    expected = se_gate_reference(x, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, r)
    torch.testing.assert_close(se(x, residual=r), expected)
    assert se.fc1.out_channels == 1  # 24 // 16: the hidden width rounds down (never below 1)


def test_convolutions_start_with_kaiming_normal_fan_out():
    """He et al.'s init for ReLU networks, by each conv's fan-out (torchvision's ResNet): std
    sqrt(2 / (out_channels * k * k)); SE's biased 1x1 convs keep PyTorch's default."""
    torch.manual_seed(0)
    model = build_model(load_config("configs/seed.yaml").model)
    conv = model.stages[1][0].conv1  # 64 -> 128 channels, 3x3
    expected = (2 / (128 * 9)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)): |w| <= 1/sqrt(fan_in)
    assert model.stem_se.fc1.weight.abs().max() <= bound


def test_a_model_of_exactly_the_budget_is_allowed():
    cfg = load_config("configs/seed.yaml").model
    cfg.max_params = 4_697_742
    assert count_params(build_model(cfg)) == cfg.max_params
    cfg.max_params -= 1
    with pytest.raises(ConfigError, match="over the budget"):
        build_model(cfg)


def test_counting_flops_leaves_the_model_in_its_mode():
    model = build_model(load_config("configs/smoke.yaml").model)
    forward_flops(model.train())
    assert model.training
    forward_flops(model.eval())
    assert not model.training


def test_se_gates_channels_in_unit_interval():
    se = SqueezeExcite(16, 4)
    x = torch.rand(2, 16, 5, 5) + 0.1
    y = se(x)
    ratio = y / x  # the gate: one value per (image, channel), in (0, 1)
    assert torch.allclose(ratio, ratio[:, :, :1, :1].expand_as(ratio), atol=1e-6)
    assert (ratio > 0).all() and (ratio < 1).all()


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = build_model(ModelConfig(layers=3, blocks=[1, 1, 1], conv_kernel=[3] * 3, shortcut_kernel=[1] * 3,
                                    base_channels=8)).eval()
    x = torch.randn(3, 3, 32, 32)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_resnet_is_deterministic_given_seed():
    cfg = ModelConfig(layers=2, blocks=[1, 1], conv_kernel=[3, 3], shortcut_kernel=[1, 1], base_channels=4,
                      pool_kernel=16)
    torch.manual_seed(3)
    a = ResNet(cfg).state_dict()
    torch.manual_seed(3)
    b = ResNet(cfg).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_init_residual_starts_every_block_as_its_shortcut():
    """model.zero_init_residual: each block's last BN scale is 0, so at init a block computes
    relu(shortcut(x)); the parameter count (and the paper's exact count) is unchanged."""
    from fasttrain.model import BasicBlock

    plain = build_model(load_config("configs/seed.yaml").model)
    cfg = load_config("configs/seed.yaml", ["--model.zero_init_residual", "true"]).model
    model = build_model(cfg).eval()
    assert count_params(model) == count_params(plain) == 4_697_742
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == sum(cfg.blocks)
    assert all(torch.count_nonzero(b.bn2.weight) == 0 for b in blocks)
    assert all(torch.all(b.bn1.weight == 1) for b in blocks)  # only the last BN of a block
    x = torch.randn(2, 64, 32, 32)
    block = blocks[0]
    assert torch.equal(block(x), torch.relu(block.shortcut(x)))
