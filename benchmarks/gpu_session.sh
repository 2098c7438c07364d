#!/usr/bin/env bash
# One prepared script for a lent GPU (about 10 minutes of a 15-minute lease): install, the benchmarks first (the most
# valuable evidence), then the GPU tests; each step has its own time limit so one slow step cannot eat the lease.
# Everything lands in $OUT (or ./gpu_out); commit it under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' _)
name=${name:-cpu}
{ fastvlm info; nvidia-smi; git rev-parse HEAD; } > "$OUT/info.txt" 2>&1
timeout 60 fastvlm bench --overhead 2>&1 | tee "$OUT/overhead.txt"
timeout 200 fastvlm bench --shapes llava-1.5-7b@1 llava-1.5-7b@8 llava-1.5-7b@64 qwen2-vl-7b@1024 qwen2-vl-7b@16384 \
    internvl@7x256 --providers hf_eager hf_compile fastvlm --out "$OUT/projector-$name.jsonl" 2>&1 | tee "$OUT/bench.txt"
timeout 150 fastvlm bench --shapes llava-1.5-7b@1 llava-1.5-7b@8 --providers hf_compile_max_autotune fastvlm \
    --modes fwd --out "$OUT/projector-$name.jsonl" 2>&1 | tee "$OUT/bench-max-autotune.txt"
timeout 60 python -m fastvlm.bench.scatter --out "$OUT/scatter-$name.jsonl" 2>&1 | tee "$OUT/scatter.txt"
timeout 90 python -m fastvlm.bench.e2e --paths connector --out "$OUT/e2e-$name.jsonl" 2>&1 | tee "$OUT/e2e.txt"
timeout 120 python -m fastvlm.bench.patch_embed --shapes clip-l-336@1 clip-l-336@64 siglip-so400m-384@8 idefics2-980@8 \
    --providers eager gemm fastvlm --out "$OUT/patch-embed-$name.jsonl" 2>&1 | tee "$OUT/patch-embed.txt"
timeout 60 python -m fastvlm.bench.patch_embed --prenorm --uint8 --shapes clip-l-336@1 clip-l-336@64 \
    --providers eager fastvlm --out "$OUT/patch-embed-$name.jsonl" 2>&1 | tee -a "$OUT/patch-embed.txt"
timeout 150 python -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log" | tail -5
timeout 120 python -m pytest -q tests/test_kernels.py tests/test_attention.py 2>&1 | tee "$OUT/tests-kernels.log" | tail -5
timeout 60 fastvlm check 2>&1 | tee "$OUT/check.txt" | tail -3
