#!/usr/bin/env bash
# One prepared script for a lent GPU: install, GPU tests, audit, benchmarks; everything lands in $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
fastvlm info 2>&1 | tee "$OUT/info.txt"
python -m pytest -q -x tests 2>&1 | tee "$OUT/tests.log" | tail -5
fastvlm check 2>&1 | tee "$OUT/check.txt" | tail -3
fastvlm bench --overhead 2>&1 | tee "$OUT/overhead.txt"
name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' _)
fastvlm bench --out "$OUT/$name.jsonl" 2>&1 | tee "$OUT/bench.txt"
python -m fastvlm.bench.e2e --out "$OUT/e2e-$name.jsonl" 2>&1 | tee "$OUT/e2e.txt"
python -m fastvlm.bench.scatter --out "$OUT/scatter-$name.jsonl" 2>&1 | tee "$OUT/scatter.txt"
