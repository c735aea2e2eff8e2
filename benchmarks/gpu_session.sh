#!/usr/bin/env bash
# Everything the GPU figures need, in one device call (about 10 minutes of an H100/H200):
#   bash benchmarks/gpu_session.sh   # from the project root, bpfree importable, MNIST under $BPFREE_DATA
# Each step has its own time limit; logs and JSON land in $OUT (or ./gpu-out without it).
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 BPFREE_GPU_TESTS=1
step() { local name=$1 limit=$2; shift 2; echo "== $name (limit ${limit}s)"; timeout "$limit" "$@" >"$out/$name.log" 2>&1; echo "   exit $?"; tail -n 25 "$out/$name.log"; }
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv >"$out/gpu.txt" 2>&1; cat "$out/gpu.txt"
step gpu-tests 150 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
step bench 200 python3 -m bpfree.cli bench --device cuda --dataset mnist --epochs 3
step noprop-depth 150 python3 benchmarks/noprop_depth.py --device cuda --dataset mnist --epochs 2 --plot "$out/noprop_depth.png"
for cfg in src/bpfree/configs/paper/*mnist*.yaml; do
  [ -f "$cfg" ] || continue
  case "$cfg" in *fashion*) continue;; esac
  step "paper-$(basename "$cfg" .yaml)" 120 python3 -m bpfree.cli run "$cfg" --device cuda --seed 0 --output "$out/paper" --data-root "${BPFREE_DATA:-data}"
done
