"""Q-Former benchmark: the whole BLIP-2 Q-Former (batch 1/8/64) and its attention core (32 x 257), transformers
eager / sdpa / torch.compile max-autotune vs fastvlm, fp32 and bf16. On a GPU, for example

    python benchmarks/bench_qformer.py --out benchmarks/results/$(nvidia-smi --query-gpu=name --format=csv,noheader | tr ' ' _)-qformer.jsonl --csv q.csv

On CPU it runs the tiny ``--quick`` setting by default (a harness check, not a speed measurement).
See fastvlm/bench/qformer.py for shapes and providers.
"""
import sys

from fastvlm.bench.qformer import main

if __name__ == "__main__":
    sys.exit(main())
