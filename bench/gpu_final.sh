#!/usr/bin/env bash
# One device call that checks and measures what the CPU machines cannot: the test suite on the GPU, then
# the GPU benchmarks whose scripts live in bench/. Run from the repo root with .whl carried (diffusers).
#   bash bench/gpu_final.sh [tests|lora|rounding|rotation|model|autoquant|autoquant-wan|gemm ...]   (default: tests lora rounding rotation model)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch; print(torch.cuda.get_device_name(), torch.__version__)"
steps=${*:-tests lora rounding rotation model}
for s in $steps; do
  t0=$(date +%s)
  case $s in
    tests) timeout 240 python3 -m pytest tests -q -x -p no:cacheprovider --deselect tests/test_demo.py \
             2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    lora) timeout 120 python3 bench/lora_gpu.py --json "$OUT/lora_gpu.json" 2>&1 | tail -25 ;;
    rounding) timeout 150 python3 bench/rounding_gpu.py --quick 2>&1 | tail -15 ;;
    rotation) [ -f bench/rotation_gpu.py ] && timeout 90 python3 bench/rotation_gpu.py 2>&1 | tail -12 ;;
    model) timeout 300 python3 -m ditq.cli bench model --arch flux --formats int8-row,fp8-row,fp8-row+mod \
             --compile regional --compile-formats fp8-row --json "$OUT/model-flux.json" 2>&1 | tail -20 ;;
    autoquant) timeout 570 python3 -m ditq.cli bench autoquant --arch flux --graph --formats fp8-row,int8-row,int8-block \
             --target-cos 0.999,0.9999,0.99995 --time-limit 480 --json "$OUT/autoquant-flux.json" 2>&1 | tail -20 ;;
    autoquant-wan) timeout 575 python3 -m ditq.cli bench autoquant --arch wan-14b --timesteps 0.9,0.1 \
             --formats fp8-row,int8-row,int8-block --target-cos 0.999,0.9999 --time-limit 500 \
             --json "$OUT/autoquant-wan.json" 2>&1 | tail -20 ;;
    gemm) timeout 240 python3 -m ditq.cli bench gemm --json "$OUT/gemm.json" 2>&1 | tail -40 ;;
  esac
  echo "== step $s: $(( $(date +%s) - t0 )) s"
done
