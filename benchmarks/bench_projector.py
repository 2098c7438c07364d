"""Projector-family microbenchmark (same as `fastvlm bench`). On a GPU, run for example

    python benchmarks/bench_projector.py --out benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | tr ' ' _).jsonl

Every row records the device, torch/triton/transformers versions and the git commit. See fastvlm/bench/projector.py
for the shapes, providers and modes.
"""
import sys

from fastvlm.bench.projector import main

if __name__ == "__main__":
    sys.exit(main())
