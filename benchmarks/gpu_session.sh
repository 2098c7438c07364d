#!/usr/bin/env bash
# One prepared script for a lent GPU (about 10 minutes of a 15-minute lease): install, then the benchmarks behind each
# issue's target ratio (most valuable first), then the GPU tests; each step has its own time limit so one slow step
# cannot eat the lease. Everything lands in $OUT (or ./gpu_out); commit it under benchmarks/results/.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' _)
name=${name:-cpu}
{ fastvlm info; nvidia-smi; git rev-parse HEAD; } > "$OUT/info.txt" 2>&1
# issue 2 (LLaVA projector at batch 8) and issue 5 (Gemma 3 at 64, pixel-shuffle connectors), forward and backward
timeout 150 fastvlm bench --shapes llava-1.5-7b@1 llava-1.5-7b@8 llava-1.5-7b@64 qwen2-vl-7b@16384 internvl-shuffle@7 \
    gemma3-4b@8 gemma3-4b@64 idefics3-8b@17 --providers hf_eager hf_compile fastvlm \
    --out "$OUT/projector-$name.jsonl" 2>&1 | tee "$OUT/bench.txt"
# issue 3: CLIP-L/14-336 with class token, positions and the fused pre-LayerNorm at batch 8 and 64; Qwen rows
timeout 90 python -m fastvlm.bench.patch_embed --prenorm --shapes clip-l-336@8 clip-l-336@64 \
    --providers eager gemm fastvlm --out "$OUT/patch-embed-$name.jsonl" 2>&1 | tee "$OUT/patch-embed.txt"
timeout 120 python -m fastvlm.bench.patch_embed --shapes siglip-so400m-384@8 idefics2-980@8 pixtral-1024@8 qwen2-vl-rows@8 \
    qwen3-vl-rows@8 --providers eager gemm fastvlm fastvlm_still --out "$OUT/patch-embed-$name.jsonl" 2>&1 \
    | tee -a "$OUT/patch-embed.txt"
# issue 4: whole Q-Former at batch 8 (fp32 and bf16) and the attention core at 32 x 257
timeout 100 python -m fastvlm.bench.qformer --batches 1 8 --providers hf_sdpa fastvlm fastvlm_bf16 sdpa flash_attn \
    xformers --out "$OUT/qformer-$name.jsonl" 2>&1 | tee "$OUT/qformer.txt"
# issue 5: the Idefics2 connector at batch 8 against transformers' sdpa module
timeout 90 python -m fastvlm.bench.perceiver --shapes idefics2-8b@729x1 idefics2-8b@729x8 \
    --providers hf_sdpa fastvlm --out "$OUT/perceiver-$name.jsonl" 2>&1 | tee "$OUT/perceiver.txt"
# issue 6: the connector path into inputs_embeds
timeout 60 python -m fastvlm.bench.e2e --paths connector --out "$OUT/e2e-$name.jsonl" 2>&1 | tee "$OUT/e2e.txt"
timeout 60 python -m fastvlm.bench.e2e --models qwen2-vl-7b --paths full --providers hf_eager fastvlm fastvlm_still \
    --out "$OUT/e2e-$name.jsonl" 2>&1 | tee -a "$OUT/e2e.txt"
timeout 120 python -m pytest -q -x -m gpu tests 2>&1 | tee "$OUT/tests-gpu.log" | tail -5
timeout 60 fastvlm check 2>&1 | tee "$OUT/check.txt" | tail -3
