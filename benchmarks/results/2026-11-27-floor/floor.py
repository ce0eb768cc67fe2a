import json, subprocess, sys
sys.path.insert(0, "benchmarks")
import profile_step as ps
from fasttrain.config import load_config
from fasttrain.model import build_model, forward_flops

THROUGHPUT = "benchmarks/results/2026-11-27-h100-writeup/throughput/throughput.json"
KERNELS = "benchmarks/results/2026-11-27-h100/kernels/bench_se_nvidia-h100-80gb-hbm3.json"
t, k = json.load(open(THROUGHPUT)), json.load(open(KERNELS))
tflops, gbs = t["measured_bf16_matmul_tflops"], k["copy_gbs"]
rows = []
for name in ("seed", "best"):
    model = build_model(load_config(f"configs/{name}.yaml").model)
    flops, norm = ps.TRAIN_FLOPS_PER_FORWARD * forward_flops(model), ps.norm_elements_per_image(model)
    for batch in (128, 512, 1024):
        rows.append({"config": f"configs/{name}.yaml", "batch_size": batch, "train_flops_per_image": flops,
                     "norm_elements_per_image": norm, **ps.step_floor(flops, norm, batch, 2, tflops, gbs)})
report = {"what": "profile_step.step_floor with the H100 ceilings on file (bf16 activations)",
          "git_sha": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
          "command": "python benchmarks/results/2026-11-27-floor/floor.py",
          "ceilings": {"bf16_matmul_tflops": tflops, "from": THROUGHPUT, "from_device": t["meta"]["device"],
                       "from_git_sha": t["meta"]["git_sha"],
                       "copy_gbs": gbs, "copy_from": KERNELS, "copy_from_device": k["device"],
                       "copy_from_git_sha": k["git_sha"], "norm_passes": ps.NORM_PASSES},
          "rows": rows}
print(json.dumps(report, indent=1))
