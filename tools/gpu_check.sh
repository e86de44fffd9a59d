#!/usr/bin/env bash
# What only a GPU can check, in one run (under 8 minutes on one H100): the gpu-marked tests (Triton kernels
# against float64 on CUDA, a bf16 SFT and GRPO step of a tiny model with sdpa, VLLMEngine where vllm
# imports) and the fused-kernel bench on CUDA, then a table of outcomes. Usage: bash tools/gpu_check.sh
# It installs nothing (GPU machines are often offline): the project runs from this checkout (PYTHONPATH);
# torch, transformers, lightning, pytest and omegaconf must be importable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${GPU_CHECK_OUT:-gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=()
timeout 360 "$py" -m pytest -p no:cacheprovider -q -m gpu tests/gpu -rA > "$out/pytest.log" 2>&1
status+=("gpu tests|$?|$(tail -1 "$out/pytest.log")")
timeout 180 "$py" tools/bench_cuda_logprob.py > "$out/bench_cuda_logprob.md" 2>&1
status+=("bench_cuda_logprob|$?|see $out/bench_cuda_logprob.md")
echo "GPU: $(cat "$out/gpu.txt")"
echo "| check | exit | result |"
echo "|---|---|---|"
for row in "${status[@]}"; do IFS='|' read -r name code result <<< "$row"; echo "| $name | $code | $result |"; done
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$out/pytest.log" | sed 's/^/  /'
cat "$out/bench_cuda_logprob.md"
