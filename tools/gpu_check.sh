#!/usr/bin/env bash
# What only a GPU can check, in one run that fits 10 minutes of a lent H200: the gpu-marked tests (Triton kernels
# and the device plan's low-precision products against float64 on CUDA, a bf16 SFT and GRPO step of a tiny model
# with sdpa, VLLMEngine where vllm imports), then tools/bench_cuda_logprob.py (ours beside the naive path and
# Liger's fused linear cross-entropy, N in {4096, 16384}, H=1536, V=151936, bf16), then a table of outcomes.
# Everything it prints is also written under $OUT (the device tool's folder; else $GPU_CHECK_OUT or gpu_check/).
# It fetches nothing: the project runs from this checkout (PYTHONPATH); torch, transformers, lightning and pytest
# come from the machine; what the image lacks travels as wheels in .whl/ (made by tools/gpu_wheels.sh), installed
# into /tmp/site. Usage: bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-${GPU_CHECK_OUT:-gpu_check}}
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
status=()
timeout 270 "$py" -m pytest -p no:cacheprovider -q -m gpu tests/gpu -rA > "$out/pytest.log" 2>&1
status+=("gpu tests|$?|$(tail -1 "$out/pytest.log")")
timeout 240 "$py" tools/bench_cuda_logprob.py --repeats 3 --json "$out/bench_cuda_logprob.json" > "$out/bench_cuda_logprob.md" 2>&1
status+=("bench_cuda_logprob|$?|see $out/bench_cuda_logprob.md")
echo "GPU: $(cat "$out/gpu.txt")"
echo "| check | exit | result |"
echo "|---|---|---|"
for row in "${status[@]}"; do IFS='|' read -r name code result <<< "$row"; echo "| $name | $code | $result |"; done
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)" "$out/pytest.log" | sed 's/^/  /'
cat "$out/bench_cuda_logprob.md"
