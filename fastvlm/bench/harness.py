"""Benchmark plumbing shared by every suite: timing, roofline, environment stamp, result files.

Timing: on CUDA, each repetition is bracketed by CUDA events after a warm-up, with the L2 cache left warm (connector
weights are re-read by every call in a real model too); the median, 20th and 80th percentiles are reported. On CPU the
same loop uses time.perf_counter; CPU numbers only show that the harness runs, never a speed claim.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

# H100 SXM ceilings used for the roofline columns (measured device copy bandwidth and dense bf16 tensor throughput).
PEAK_TFLOPS_BF16 = 790.0
PEAK_TBPS = 3.0


def measure(fn, *, warmup=5, reps=30, device="cuda"):
    """Run ``fn`` and return (median, p20, p80) in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def roofline_ms(flops, min_bytes):
    """Lower bound in ms: max(compute time at peak, minimum traffic at peak bandwidth)."""
    return max(flops / (PEAK_TFLOPS_BF16 * 1e12), min_bytes / (PEAK_TBPS * 1e12)) * 1e3


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or "unknown"
    except Exception:
        return "unknown"


def environment():
    import fastvlm

    env = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastvlm": fastvlm.__version__,
        "commit": git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = None
    return env


def append_results(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def format_rows(rows):
    head = (f"{'shape':28} {'mode':8} {'provider':24} {'median ms':>10} {'p20':>8} {'p80':>8} {'TFLOP/s':>8} "
            f"{'%roof':>6} {'vs eager':>8} {'rel err':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r['shape']:28} {r['mode']:8} {r['provider']:24} {r['ms']:10.4f} {r['p20_ms']:8.4f} "
                   f"{r['p80_ms']:8.4f} {r['tflops']:8.1f} {100 * r['roofline_fraction']:6.1f} "
                   f"{r['speedup_vs_eager']:8.2f} {r['rel_err']:8.1e}")
    return "\n".join(out)
