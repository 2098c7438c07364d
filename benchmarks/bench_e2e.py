"""End-to-end connector path (pixels or vision features -> inputs_embeds); see fastvlm/bench/e2e.py.

    python benchmarks/bench_e2e.py --out benchmarks/results/e2e-$(hostname).jsonl
"""
import sys

from fastvlm.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
