"""Patch-embedding microbenchmark (eager module, GEMM formulation, torch.compile max-autotune, fastvlm). On a GPU:

    python benchmarks/bench_patch_embed.py --out benchmarks/results/<device>.jsonl
    python benchmarks/bench_patch_embed.py --prenorm --shapes clip-l-336@1 clip-l-336@8 clip-l-336@64
    python benchmarks/bench_patch_embed.py --uint8

``--quick`` is a smoke run (one shape, three repetitions) that also works on a CPU. See fastvlm/bench/patch_embed.py.
"""
import sys

from fastvlm.bench.patch_embed import main

if __name__ == "__main__":
    sys.exit(main())
