#!/usr/bin/env bash
# One prepared run for a lent GPU (one H200 or H100; torch, triton, transformers, timm and pytest installed, no
# network): install, correctness first (every kernel family once on the device), then the benchmarks in order of
# value (each issue's target first), every step under its own time limit. Results come back as <= 4 files in $OUT.
#
#   OUT=<dir> FASTVLM_COMMIT=<sha> bash benchmarks/gpu_session.sh   # on the GPU (9 minutes at most; the sha
#                                                                   # written out: the copy may lack .git)
#   OUT=<dir> bash benchmarks/gpu_session.sh --dry-run              # on a CPU: tiny shapes, PyTorch path (CI)
#   bash benchmarks/gpu_session.sh --list                           # the plan, nothing run
#   ... --only smoke,projector                                      # a subset of the steps (comma list)
#
# Exit status: every step runs whatever an earlier one did; a dry run then exits 1 if any step failed (non-zero exit,
# or not run for lack of time), else 0. A GPU run exits 0 (summary.md reports each step's exit status).
# Plan: budgets are each step's `timeout` (SIGINT, so pytest still writes its report and every benchmark row already
# measured stays: rows are appended as they are measured). A step gets min(its budget, what is left of the 510 s
# deadline); the last two steps take whatever earlier steps left. Estimates are for an H200 with a cold Triton cache
# (no GPU run has confirmed them yet: replace them with the step times a session's summary.md reports).
#
#   step              budget s  est. s  what
#   install              20       10    pip install --no-deps --no-build-isolation -e ., fastvlm info (dry run: pip)
#   env                  15        8    env.json: device, versions, commit; copy + matmul ceilings measured
#   smoke                90       70    pytest -m gpu_smoke (tests/test_gpu_smoke.py, -n 8 where xdist is there):
#                                       every kernel family once vs float64; CUDA extension built in the background
#   projector            45       35    issues 2, 5: LLaVA B=8/1/64, Gemma 3 B=64, InternVL/Idefics3 shuffles; eager, fastvlm
#   patch-embed          30       25    issue 3: CLIP-L/14-336 + pre-LN B=8/64; eager, GEMM formulation, fastvlm
#   qformer              45       40    issue 4: Q-Former B=8 fp32/bf16; eager, sdpa, fastvlm (+bf16 compute); attention 32x257
#   perceiver            35       30    issue 5: Idefics2 connector 729 x B=8; eager, sdpa, fastvlm; fwd, fwd+bwd
#   projector-compile    45       40    issue 2: LLaVA B=8 under torch.compile max-autotune
#   patch-compile        30       25    issue 3: CLIP-L B=8 under torch.compile max-autotune
#   qformer-compile      60       55    issue 4: Q-Former B=8 fp32 under torch.compile max-autotune
#   train                25       20    fwd+bwd with gradient checks: LLaVA B=8, Gemma 3 B=64
#   e2e                  25       20    issue 6: LLaVA-1.5 and Qwen2-VL: connector path and image features, eager vs patched
#   ext                  15       10    CUDA extension: GPU tests of scatter + preprocessing, scatter benchmark
#   overhead             30        8    fastvlm bench --overhead (host time per call; the kernels compile cold)
#   more-shapes        rest        -    pointer vs TMA GEMM core (LLaVA B=1/8, Qwen2-VL 16384); other shapes: Qwen2-VL
#                                       merger 16384, Mistral 3, SigLIP, Idefics2, Pixtral, Qwen rows, uint8
#   gpu-tests          rest        -    the remaining GPU tests (-m "not gpu_smoke"), per-test limit 90 s
#   sum of budgets      510             + packing (~1 s after each step): the script ends by 520 s, under 9 minutes
#
# Files in $OUT (at most 4, rewritten after every step, so a run cut short still returns what it measured):
#   summary.md       each issue's target: measured ratio, met or not; steps and times; GPU tests; accuracy flags
#   env.json         device, torch / triton / transformers / timm versions, commit, ceilings measured here
#   results.tar.gz   <device>_<date>_<commit>/: every JSON-lines file, every step's log, pytest reports, steps.tsv
# Unpack results.tar.gz into benchmarks/results/ and commit it with summary.md (see README, Performance).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 ONLY="" LIST=0
while (($#)); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --only) ONLY=",$2,"; shift ;;
        --list) LIST=1 ;;
        *) echo "usage: OUT=<dir> bash benchmarks/gpu_session.sh [--dry-run] [--only step,step] [--list]" >&2; exit 2 ;;
    esac
    shift
done
# seconds for all steps, install included; a dry run on a (shared) CPU gets its limits scaled by SESSION_SCALE (3)
SCALE=${SESSION_SCALE:-$((DRY ? 3 : 1))}
DEADLINE=$((${SESSION_DEADLINE:-510} * SCALE))
PY=${PYTHON:-python3}
command -v "$PY" > /dev/null || PY=python
OUT=${OUT:-gpu_out}
((LIST)) || mkdir -p "$OUT"
ROOT=$(mktemp -d)
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$ROOT/triton_cache"  # one kernel cache for the tests and the benchmarks
COMMIT=$(git rev-parse --short HEAD 2> /dev/null || echo "${FASTVLM_COMMIT:-unknown}")
export FASTVLM_COMMIT=$COMMIT
if ((DRY)); then
    export FASTVLM_BENCH_TINY=1 FASTVLM_SMOKE_CPU=1 FASTVLM_CEXT=nobuild
    DEVICE=dry-run-cpu
else
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1 | tr -c 'A-Za-z0-9.\n-' _)
    DEVICE=${DEVICE:-no-gpu}
fi
WORK="$ROOT/${DEVICE}_$(date +%Y%m%d-%H%M)_$COMMIT"
mkdir -p "$WORK"
export FASTVLM_CEILINGS="$WORK/ceilings.json"
# the benchmarks time the kernels themselves, not the per-shape choice (fastvlm/choice.py) that could pick eager ops
export FASTVLM_CHOICE=0 FASTVLM_CACHE_DIR="$WORK/fastvlm_cache"
# pytest: 8 workers and a per-test limit where the plugins are installed (the GPU image has both)
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider)
"$PY" -c "import pytest_timeout" 2> /dev/null && PYTEST+=(--timeout 90)
PYTEST_N=("${PYTEST[@]}")  # for the long test steps: kernels compile in 8 processes at once
"$PY" -c "import xdist" 2> /dev/null && ((!DRY)) && PYTEST_N+=(-n 8)

FAILED=()  # steps that exited non-zero or were not run: a dry run then ends with exit 1, after every step
selected() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }
cpu_mark() { times > "$ROOT/times"; }  # in this shell (not a subshell): its finished children's CPU times
cpu_read() { awk 'NR == 2 { gsub(/[ms]/, " "); print int($1 * 60 + $2 + $3 * 60 + $4) }' "$ROOT/times"; }

pack() {  # summary.md, env.json and results.tar.gz into $OUT (atomic renames)
    "$PY" fastvlm/bench/session.py summary --work "$WORK" --out "$OUT/summary.md.tmp" >> "$WORK/session.log" 2>&1 &&
        mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    [[ -f $WORK/env.json ]] && cp "$WORK/env.json" "$OUT/env.json"
    tar -czf "$OUT/results.tar.gz.tmp" -C "$ROOT" "$(basename "$WORK")" && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

step() {  # step NAME BUDGET|rest CMD...: CMD under min(BUDGET, time left), output to $WORK/NAME.log
    local name=$1 budget=$2
    shift 2
    if ((LIST)); then printf '  %-18s %5s s\n' "$name" "$budget"; return 0; fi
    selected "$name" || return 0
    local left=$((DEADLINE - SECONDS))
    [[ $budget == rest ]] && budget=$left || budget=$((budget * SCALE))
    ((budget > left)) && budget=$left
    if ((budget < 5)); then
        printf '%s\t%s\t0\tnot run (deadline)\n' "$name" "$budget" >> "$WORK/steps.tsv"
        echo "== $name: not run, ${left} s left of ${DEADLINE}"
        FAILED+=("$name (not run: deadline)")
        return 0
    fi
    local t0=$SECONDS c0
    cpu_mark
    c0=$(cpu_read)
    echo "== [${SECONDS}s] $name (limit ${budget}s): $*" | tee -a "$WORK/session.log"
    timeout -s INT -k 10 "$budget" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    ((rc != 0)) && FAILED+=("$name (exit $rc)")
    cpu_mark
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$budget" "$((SECONDS - t0))" "$rc" "$(($(cpu_read) - c0))" >> "$WORK/steps.tsv"
    tail -n 4 "$WORK/$name.log" | cut -c1-160
    pack
}

B=(-m fastvlm.bench)
PROJ=("$PY" "${B[@]}".projector --out "$WORK/projector.jsonl")
PATCH=("$PY" "${B[@]}".patch_embed --out "$WORK/patch_embed.jsonl")
QF=("$PY" "${B[@]}".qformer --full --out "$WORK/qformer.jsonl")
PERC=("$PY" "${B[@]}".perceiver --out "$WORK/perceiver.jsonl")
((DRY)) && QF=("$PY" "${B[@]}".qformer --quick --out "$WORK/qformer.jsonl")
if ((DRY)); then INSTALL=("$PY" -m pip --version)  # dry run: no install, pip is there
else  # if pip fails, the steps still import this tree (PYTHONPATH, and fastvlm.kernels linked to kernels/)
    INSTALL=(bash -c '"$0" -m pip install --no-deps --no-build-isolation -e . || { ln -sfn ../kernels fastvlm/kernels;
        echo "pip install failed: running from the source tree"; }; "$0" -m fastvlm.cli info' "$PY")
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ((DRY)); then EXT_BUILD=("$PY" -m fastvlm._cext status); else EXT_BUILD=("$PY" -m fastvlm._cext build); fi
REST=(-m "not gpu_smoke and not slow" tests/test_gpu.py tests/test_patch_embed_gpu.py tests/test_scatter.py
      tests/test_qformer.py tests/test_kernels.py tests/test_attention.py tests/test_perceiver.py)
((DRY)) && REST=(-m gpu tests/test_gpu.py)

((LIST)) && echo "steps (budget, command), deadline ${DEADLINE} s:"
step install 20 "${INSTALL[@]}"
step env 15 "$PY" -m fastvlm.bench.session env --measure --work "$WORK" --out "$WORK/env.json"
if ((!LIST)) && selected ext; then  # the CUDA extension builds (nvcc) while the smoke tests compile Triton kernels
    (timeout -s INT $((150 * SCALE)) "${EXT_BUILD[@]}" > "$WORK/ext-build.log" 2>&1; echo $? > "$WORK/ext-build.rc") &
fi
step smoke 90 "${PYTEST_N[@]}" -m gpu_smoke tests/test_gpu_smoke.py --junitxml "$WORK/smoke.junit.xml"
# issue 2 (LLaVA-1.5 projector B=8 and 1, >= 65% of the bf16 ceiling at B >= 8) and issue 5 (Gemma 3 B=64, shuffles)
step projector 45 "${PROJ[@]}" --modes fwd --providers hf_eager fastvlm --shapes llava-1.5-7b@8 gemma3-4b@64 \
    llava-1.5-7b@1 llava-1.5-7b@64 internvl-shuffle@7 idefics3-8b@17
# issue 3: CLIP-L/14-336 with class token, positions and the fused pre-LayerNorm, B=8 and 64
step patch-embed 30 "${PATCH[@]}" --prenorm --providers eager gemm fastvlm --shapes clip-l-336@8 clip-l-336@64
# issue 4: the whole Q-Former at B=8 (fp32 as transformers keeps it, and bf16) and the attention core at 32 x 257
step qformer 45 "${QF[@]}" --batches 8 --providers hf_eager hf_sdpa fastvlm fastvlm_bf16 sdpa flash_attn xformers
# issue 5: the Idefics2 connector at B=8 against transformers' sdpa module (forward, then training with gradients)
step perceiver 35 "${PERC[@]}" --modes fwd fwd+bwd --providers hf_sdpa fastvlm hf_eager --shapes idefics2-8b@729x8
# the torch.compile baselines the targets name (max-autotune: minutes of autotuning, so after every eager row)
step projector-compile 45 "${PROJ[@]}" --modes fwd --providers hf_compile_max_autotune --shapes llava-1.5-7b@8
step patch-compile 30 "${PATCH[@]}" --prenorm --providers compile --shapes clip-l-336@8
step qformer-compile 60 "${QF[@]}" --suites qformer --batches 8 --dtypes float32 --providers hf_compile_max_autotune
# training (stage-1 alignment): forward + backward, every parameter's gradient checked against the fp32 module
step train 25 "${PROJ[@]}" --modes fwd+bwd --providers hf_eager fastvlm --shapes llava-1.5-7b@8 gemma3-4b@64
# issue 6: the connector path into inputs_embeds (features -> connector -> scatter) and the image features (tower
# included), LLaVA-1.5-7B and Qwen2-VL-7B (with the still-image patch GEMM)
step e2e 25 "$PY" -m fastvlm.bench.e2e --out "$WORK/e2e.jsonl" --paths connector full \
    --providers hf_eager fastvlm fastvlm_still
# issue 7: the CUDA extension (built in the background since the smoke step)
step ext 15 bash -c 'while [[ ! -f $1/ext-build.rc ]]; do sleep 1; done; cat "$1/ext-build.log";
    "${@:2}" tests/test_scatter.py tests/test_preprocess.py -k cuda --junitxml "$1/ext.junit.xml";
    "$0" -m fastvlm.bench.scatter --out "$1/scatter.jsonl" --shapes llava-1.5-7b@8 qwen2-vl-7b@16k' \
    "$PY" "$WORK" "${PYTEST[@]}"
# issue 11: host time per call (fastvlm bench --overhead; owned by the launch-overhead work, tolerated if absent)
# (a dry run times only the Q-Former, the hand-off and the GEMM launch rows, 3 rounds: it checks the plumbing)
if ((DRY)); then OVERHEAD=(--families none --rounds 3); else OVERHEAD=(); fi
step overhead 30 "$PY" -m fastvlm.cli bench --overhead "${OVERHEAD[@]}"
# first the dense GEMM's two cores side by side: the pointer kernel beside the "fastvlm" rows (the TMA core on sm_90)
step more-shapes rest bash -c '"${@:2}" --modes fwd --providers fastvlm_pointer_core --shapes llava-1.5-7b@1 \
    llava-1.5-7b@8 qwen2-vl-7b@16384 && "${@:2}" --modes fwd --providers hf_eager fastvlm --shapes qwen2-vl-7b@16384 \
    mistral-small-3.1@12100 gemma3-4b@8 qwen2-vl-7b@1024 &&
    "$0" -m fastvlm.bench.patch_embed --out "$1" --providers eager gemm fastvlm fastvlm_still --shapes \
    siglip-so400m-384@8 idefics2-980@8 pixtral-1024@8 qwen2-vl-rows@8 qwen3-vl-rows@8 &&
    "$0" -m fastvlm.bench.patch_embed --out "$1" --uint8 --providers eager fastvlm --shapes clip-l-336@8 idefics2-980@8' \
    "$PY" "$WORK/patch_embed.jsonl" "${PROJ[@]}"
step gpu-tests rest "${PYTEST_N[@]}" "${REST[@]}" --junitxml "$WORK/gpu-tests.junit.xml"
((LIST)) && { rm -rf "$ROOT"; exit 0; }
wait  # the background extension build (bounded by its own timeout)
pack
echo "== done in ${SECONDS}s; $OUT:"
ls -la "$OUT"
sed -n '/^## Targets/,/^## Steps/p' "$OUT/summary.md"
if ((${#FAILED[@]})); then
    printf '== %d step(s) failed: %s\n' "${#FAILED[@]}" "$(IFS=,; echo "${FAILED[*]}")" | tee -a "$WORK/session.log" >&2
    # a dry run checks the plumbing: any failed step fails it (CI). A GPU run keeps exit 0: its steps are cut by their
    # time budgets by design, and summary.md reports each step's exit status.
    ((DRY)) && exit 1
fi
exit 0
