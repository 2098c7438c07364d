"""Idefics2 connector (SwiGLU modality projection + Perceiver resampler) benchmark: transformers eager / SDPA /
torch.compile max-autotune vs fastvlm, forward and forward+backward, at Idefics2-8B sizes (729 and 4900 context
tokens per image). On a GPU, for example

    python benchmarks/bench_perceiver.py --out benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | tr ' ' _).jsonl

``--quick`` runs tiny shapes that finish on a CPU. See fastvlm/bench/perceiver.py for the shapes, providers and modes.
"""
import sys

from fastvlm.bench.perceiver import main

if __name__ == "__main__":
    sys.exit(main())
