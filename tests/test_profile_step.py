"""benchmarks/profile_step.py: the host-vs-GPU verdict, the interval union behind GPU busy time, the
profile summary (CUDA branch on hand-made profiler events), and the script itself on a CPU, in-process."""
import copy
import importlib
import json
import statistics
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import Interval

from fasttrain.config import ConfigError, load_config
from fasttrain.model import build_model


@pytest.fixture(scope="module")
def ps(repo_root):
    """benchmarks/profile_step.py as a module, imported from benchmarks/ as the scripts import each other."""
    sys.path.insert(0, str(repo_root / "benchmarks"))
    try:
        yield importlib.import_module("profile_step")
    finally:
        sys.path.remove(str(repo_root / "benchmarks"))


# ------------------------------------------------------------------------------------- pure helpers
def test_step_floor_is_the_compute_at_the_matmul_rate_plus_the_norm_traffic_at_the_copy_bandwidth(ps):
    floor = ps.step_floor(train_flops=10**9, norm_elements=10**6, batch=500, element_bytes=2, tflops=1000.0,
                          copy_gbs=2000.0)
    assert floor["compute_ms"] == pytest.approx(0.5)           # 5e11 FLOP at 1e15 FLOP/s
    assert floor["norm_traffic_ms"] == pytest.approx(4.0)      # 8 passes x 2 bytes x 5e8 elements at 2e12 B/s
    assert floor["step_ms"] == pytest.approx(4.5) and floor["images_per_second"] == pytest.approx(500 / 4.5e-3)
    assert ps.step_floor(10**9, 10**6, 500, 4, 1000.0, 2000.0)["norm_traffic_ms"] == pytest.approx(8.0)  # fp32
    assert ps.step_floor(10**9, 10**6, 500, 2, None, 2000.0) is None  # no GPU, no ceilings, no floor


def test_norm_elements_per_image_counts_every_batch_norm_output(ps):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8))
    assert ps.norm_elements_per_image(net) == 4 * 32 * 32 + 8 * 16 * 16
    # the paper's network: the stem, then per stage 2 norms a block and one on the projection shortcut of
    # stages 2 and 3: 64 channels at 32x32 (1 + 8 norms), 128 at 16x16 (9), 256 at 8x8 (7)
    seed = build_model(load_config("configs/seed.yaml").model)
    assert ps.norm_elements_per_image(seed) == 9 * 64 * 32 * 32 + 9 * 128 * 16 * 16 + 7 * 256 * 8 * 8 == 999_424
    norms = [m for m in seed.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert seed.training and all(int(m.num_batches_tracked) == 0 for m in norms)  # its mode back, no statistics taken


@pytest.mark.parametrize("intervals, length", [
    ([], 0.0),
    ([(0.0, 2.0), (1.0, 3.0)], 3.0),                  # overlapping (two streams): counted once
    ([(2.0, 4.0), (0.0, 1.0)], 3.0),                  # disjoint, unsorted: the gap is not busy
    ([(0.0, 10.0), (2.0, 3.0), (4.0, 12.0)], 12.0),   # nested, then overlapping past the end
    ([(0.0, 1.0), (1.0, 2.0), (5.0, 5.5)], 2.5),      # touching
])
def test_union_length(ps, intervals, length):
    assert ps.union_length(iter(intervals)) == pytest.approx(length)


@pytest.mark.parametrize("wall, host, busy, expected", [
    (10.0, 9.5, 3.0, "host-bound"),   # Python takes the whole step, the GPU idles most of it
    (10.0, 9.0, 6.99, "host-bound"),  # both thresholds inclusive / exclusive as documented
    (10.0, 9.0, 7.0, "mixed"),
    (10.0, 8.9, 3.0, "mixed"),        # host finishes early, GPU not busy: neither
    (10.0, 2.0, 8.5, "GPU-bound"),
    (10.0, 9.9, 9.5, "GPU-bound"),    # host ~ wall because the launch queue filled: the GPU decides
    (10.0, 9.9, 8.49, "mixed"),
    (10.0, 10.0, None, "cpu"),
])
def test_verdict(ps, wall, host, busy, expected):
    assert ps.verdict(wall, host, busy) == expected


def event(name, device, start, end, parent=None, kind="cuda_runtime", annotation=False):
    return SimpleNamespace(name=name, device_type=device, time_range=Interval(start, end), cpu_parent=parent,
                           activity_type=kind, is_user_annotation=annotation)


def fake_cuda_window(with_activity_type: bool):
    """Two profiled steps as torch.profiler reports them: host ops and runtime calls, device work on two
    streams, and device-side events that are not work (a step annotation, a stream sync)."""
    cpu, gpu = DeviceType.CPU, DeviceType.CUDA
    step = event("ProfilerStep*", cpu, 0, 50, kind="user_annotation")
    conv = event("aten::conv2d", cpu, 1, 9, parent=step, kind="cpu_op")
    events = [step, event("ProfilerStep*", cpu, 50, 100, kind="user_annotation"), conv,
              event("aten::convolution", cpu, 2, 8, parent=conv, kind="cpu_op"),      # nested: not top level
              event("aten::add_", cpu, 10, 11, parent=step, kind="cpu_op"),
              *[event(n, cpu, 3, 4) for n in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                                               "cudaGraphLaunch", "cudaMemcpyAsync", "cudaStreamSynchronize",
                                               "cudaDeviceSynchronize", "cudaGetDevice")],
              event("conv_kernel_a", gpu, 0, 10_000, kind="kernel"),
              event("gemm_kernel_b", gpu, 5_000, 12_000, kind="kernel"),                  # overlaps a
              event("conv_kernel_a", gpu, 30_000, 31_000, kind="kernel"),
              event("Memcpy HtoD (Pinned -> Device)", gpu, 20_000, 22_000, kind="gpu_memcpy"),
              event("ProfilerStep#1", gpu, 0, 50_000, kind="gpu_user_annotation", annotation=True),
              event("Stream Sync", gpu, 22_000, 29_000, kind="cuda_sync")]
    if not with_activity_type:  # older torch: FunctionEvent has no activity_type
        for e in events:
            del e.activity_type
    return events


@pytest.mark.parametrize("with_activity_type", [True, False])
def test_summarize_cuda_window(ps, with_activity_type):
    s = ps.summarize(fake_cuda_window(with_activity_type), steps=2, cuda=True)
    assert s["profiled_steps"] == 2  # the CPU step annotations only, not their GPU twins
    assert s["gpu_busy_ms_per_step"] == pytest.approx((12 + 2 + 1) / 2)  # [0,12] + [20,22] + [30,31] ms
    assert s["kernels_per_step"] == 1.5  # 3 kernels, the copy is not one
    assert s["launches_per_step"] == 2.0  # 4 launch calls; the async copy and cudaGetDevice are not launches
    assert s["syncs_per_step"] == 0.5  # the stream sync; the window's closing device synchronize is not counted
    assert s["aten_ops_per_step"] == 1.0  # conv2d and add_, not the convolution inside conv2d
    assert [(o["name"], o["count_per_step"]) for o in s["top_ops"]] == [("aten::conv2d", 0.5), ("aten::add_", 0.5)]
    assert s["top_ops"][0]["ms_per_step"] == pytest.approx(0.008 / 2)
    top = [(k["name"], k["ms_per_step"], k["count_per_step"]) for k in s["top_kernels"]]
    assert top == [("conv_kernel_a", pytest.approx(5.5), 1.0), ("gemm_kernel_b", pytest.approx(3.5), 0.5),
                   ("Memcpy HtoD (Pinned -> Device)", pytest.approx(1.0), 0.5)]
    # by class: kernel times summed (the overlap of a and b counted in both), largest first
    assert s["gpu_ms_by_class"] == {"convolution": pytest.approx(5.5), "matmul": pytest.approx(3.5),
                                    "copies": pytest.approx(1.0)}
    assert list(s["gpu_ms_by_class"]) == ["convolution", "matmul", "copies"]


@pytest.mark.parametrize("name, label", [  # names as an H100's profile of the seed network's step shows them
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32", "convolution"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc", "convolution"),
    ("triton_poi_fused__native_batch_norm_legit_functional_convolution_relu_0", "compiled fusions"),  # not conv
    ("triton_red_fused__native_batch_norm_legit_functional_native_batch_norm_backward_3", "compiled fusions"),
    ("_se_pool_kernel", "fasttrain kernels"),
    ("_lookahead_sgd_kernel", "fasttrain kernels"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "eager ATen"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "eager ATen"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64", "matmul"),
    ("Memset (Device)", "copies"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_s16816gemm>", "matmul"),
    ("nvjet_tst_128x64_64x6_1x2_h_bz_TNT", "matmul"),  # cuBLAS's Hopper GEMMs name no gemm
    ("nvjet_sm90_tst_64x32_64x16_2x1_v_bz_TNN", "matmul"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "other"),
])
def test_kernel_classes(ps, name, label):
    assert ps.kernel_class(name) == label


def test_long_kernel_names_are_cut(ps):
    s = ps.summarize([event("k" * 200, DeviceType.CUDA, 0, 1000, kind="kernel")], steps=1, cuda=True)
    assert len(s["top_kernels"][0]["name"]) == 60 and s["top_kernels"][0]["name"].endswith("...")


def test_cpu_summary_has_no_gpu_numbers(ps):
    s = ps.summarize(fake_cuda_window(True), steps=2, cuda=False)
    assert s["aten_ops_per_step"] == 1.0
    assert all(s[k] is None for k in ("gpu_busy_ms_per_step", "kernels_per_step", "launches_per_step",
                                       "syncs_per_step", "top_kernels", "gpu_ms_by_class"))


# ------------------------------------------------------------------------------------- command line
def test_batch_sizes_default_to_those_the_rows_name(ps):
    args, overrides = ps.parse_args(["--rows", "7@512,4,8@1024", "--train.seed", "3"])
    assert args.batch_sizes == [512, 1024] and args.batch == 128 and args.steps == 20
    assert overrides == {"train.seed": 3}  # parsed, as config overrides
    assert ps.parse_args([])[0].rows == ["4", "5", "7", "7@512"]


def test_unknown_row_is_a_clear_error(ps, tmp_path):
    with pytest.raises(ConfigError, match=r"--rows 4,4x: each must be one of 1, 2, .*\(R@B: row R at batch size B"):
        ps.main(["--device", "cpu", "--smoke", "--rows", "4,4x", "--out", str(tmp_path / "p.json")])
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("out, message", [("/proc/nowhere/p.json", "cannot write there"), ("FOLDER", "is a folder")])
def test_an_unwritable_out_is_refused_before_any_row(ps, tmp_path, out, message):
    """The result is first written after the first row is measured: an --out that cannot take it is
    refused while parsing, not after minutes of GPU time."""
    out = str(tmp_path) if out == "FOLDER" else out
    with pytest.raises(ConfigError, match=message):
        ps.parse_args(["--smoke", "--out", out])


# ------------------------------------------------------------------------------------- the script on a CPU
def test_profile_step_script_on_cpu(ps, cifar_dir, tmp_path, monkeypatch, capsys, one_torch_thread):
    snapshots = []
    real_write = ps.write_json

    def recording_write(path, payload):
        snapshots.append(copy.deepcopy(payload))
        return real_write(path, payload)

    monkeypatch.setattr(ps, "write_json", recording_write)
    monkeypatch.setattr(sys.modules["common"], "write_json", recording_write)  # write_complete's final write
    out = tmp_path / "profile.json"
    steps = 2
    assert ps.main(["--device", "cpu", "--smoke", "--rows", "4,5,2", "--batch", "16", "--steps", str(steps),
                    "--warmup-steps", "1", "--repeats", "2", "--out", str(out), "--data.dir", str(cifar_dir)]) == 0

    result = json.loads(out.read_text())
    assert result["complete"] is True and result["benchmark"] == "profile_step"
    assert {"device", "versions", "git_sha", "command", "timestamp"} <= result["meta"].keys()
    assert result["meta"]["command"].split()[1:3] == ["benchmarks/profile_step.py", "--device"]
    assert result["model"]["config"]["data"]["dir"] == str(cifar_dir)  # the dotted override reached the config
    assert [r["row"] for r in result["rows"]] == ["4", "5", "2"]  # the order asked for
    # rewritten after every row, incomplete until the end
    assert [([r["row"] for r in s["rows"]], s["complete"]) for s in snapshots] == [
        (["4"], False), (["4", "5"], False), (["4", "5", "2"], False), (["4", "5", "2"], True)]

    smoke_model = build_model(load_config("configs/smoke.yaml").model)
    assert result["model"]["norm_elements_per_image"] == ps.norm_elements_per_image(smoke_model) > 0
    assert result["model"]["ceilings"] == {"bf16_matmul_tflops": None, "copy_gbs": None, "norm_passes": 8}  # no GPU
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["5"]["status"] == "skipped" and "compile" in rows["5"]["reason"] and rows["5"]["verdict"] is None
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in build_model(load_config("configs/smoke.yaml").model).modules())
    for r in (rows["4"], rows["2"]):
        assert r["status"] == "ok" and r["verdict"] == "cpu" and r["batch_size"] == 16
        assert len(r["wall_ms_windows"]) == len(r["host_ms_windows"]) == 2
        assert all(w > 0 for w in r["wall_ms_windows"] + r["host_ms_windows"])
        assert r["wall_ms_per_step"] == pytest.approx(statistics.median(r["wall_ms_windows"]))
        assert r["host_ms_per_step"] == pytest.approx(statistics.median(r["host_ms_windows"]))
        assert r["host_fraction"] == pytest.approx(r["host_ms_per_step"] / r["wall_ms_per_step"])
        assert 0.8 < r["host_fraction"] <= 1.0 + 1e-6  # a CPU runs the step as it is called
        assert r["profiled_steps"] == steps and r["profiled_window_seconds"] > 0
        assert r["aten_ops_per_step"] > 20
        ops = {o["name"]: o for o in r["top_ops"]}
        assert all(name.startswith("aten::") and o["ms_per_step"] > 0 for name, o in ops.items())
        assert ops["aten::conv2d"]["count_per_step"] == convs  # one top-level call per conv layer per step
        # top-level ops run one after another on the one host thread: their time fits in the profiled window
        # (compared with that window, not with the timed ones before it, which a busy machine makes differ)
        assert sum(o["ms_per_step"] for o in r["top_ops"]) * steps <= 1e3 * r["profiled_window_seconds"]
        for key in ("gpu_busy_ms_per_step", "gpu_busy_fraction", "kernels_per_step", "launches_per_step",
                    "syncs_per_step", "top_kernels", "floor"):
            assert r[key] is None, key
    assert rows["4"]["settings"]["channels_last"] and not rows["2"]["settings"]["channels_last"]

    printed = capsys.readouterr().out
    assert printed.rstrip().endswith("┘") and "host vs GPU" in printed  # the table is last
    assert "row 4 (batch 16): top host ops" in printed and "aten::conv2d" in printed
