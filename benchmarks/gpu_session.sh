#!/usr/bin/env bash
# One stage of the GPU checks, sized for the device tool (10 minutes a command, 30 a session).
#
#   bash benchmarks/gpu_session.sh STAGE [OUT_DIR]
#
# Run from the repository root on the GPU machine after staging data and DALI
# (`../shared/device/stage` here, then `. .stage/env.sh` there). Each stage installs the project
# (a fresh machine is bare), logs to OUT_DIR (default $OUT, else ./gpu-out) and prints a short
# summary last. Suggested order in one session: tests, kernels, loader, throughput, seed, best.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|kernels|loader|throughput|seed|best|torchrun [OUT_DIR]}
out=${2:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
[[ -f .stage/env.sh ]] && . .stage/env.sh
python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || {
  echo "gpu_session: pip install -e . failed" >&2; exit 1; }
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

run() {  # run NAME CMD...: log everything, keep the exit code
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  return "$rc"
}

case $stage in
  tests)       # the gpu-marked tests: real Triton kernels, compile fullgraph, DALI on the GPU
    run gpu-tests python -m pytest -m gpu -q -rA -p no:cacheprovider ;;
  kernels)     # SE and optimizer microbenchmarks (results/bench_se_*, bench_optim_*)
    run bench-se python benchmarks/kernels/bench_se.py --out "$out"
    run bench-optim python benchmarks/kernels/bench_optim.py --out "$out" ;;
  loader)      # loaders alone and inside a training step: decides data.loader auto
    run bench-loader python benchmarks/bench_loader.py --out "$out/loader.json" ;;
  throughput)  # the 8-step ablation (shortened to fit one command)
    run throughput python benchmarks/throughput.py --batch-sizes 512 1024 --repeats 2 --steps 50 \
      --out "$out/throughput.json" ;;
  seed)        # the paper's recipe for a few epochs: epoch times, images/s
    run seed python -m fasttrain --config configs/seed.yaml --train.epochs 3 --output.dir "$out/seed" \
      --output.progress false ;;
  best)        # the fast recipe in full, timed
    run best python benchmarks/time_to_accuracy.py --config configs/best.yaml --seeds 1 --targets 94 95 96 \
      --out "$out/best.json" ;;
  torchrun)    # single-GPU torchrun overhead against a plain run of the same config
    run plain python -m fasttrain --config configs/seed.yaml --train.epochs 2 --output.dir "$out/plain" \
      --output.progress false
    run torchrun1 torchrun --standalone --nproc_per_node=1 -m fasttrain --config configs/seed.yaml \
      --train.epochs 2 --output.dir "$out/torchrun1" --output.progress false ;;
  *) echo "gpu_session: unknown stage $stage" >&2; exit 2 ;;
esac
