"""Benchmark plumbing shared by every suite: timing, roofline, environment stamp, result files, checks.

Timing: on CUDA, each repetition is bracketed by CUDA events after a warm-up, with the L2 cache left warm (connector
weights are re-read by every call in a real model too); the median, 20th and 80th percentiles are reported. On CPU the
same loop uses time.perf_counter; CPU numbers only show that the harness runs, never a speed claim.

Rows are written as they are measured: ``Recorder.add`` appends each row to the JSON-lines file at once (and
flushes), so a suite stopped by a time limit leaves every row it finished.

Roofline: the ceilings of the device the row ran on (fastvlm/bench/devices.py: measured H100 and H200 ceilings;
16-bit rows against the bf16 ceiling, fp32 rows against the tf32 one with the fp32-IEEE bound beside it).

``FASTVLM_BENCH_TINY=1`` (the GPU session's ``--dry-run``): every suite swaps its shapes for tiny ones of the same
structure and times 1 warm-up and 2 repetitions; rows carry ``tiny: true``. It only checks that the suites run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time

import torch

from fastvlm.bench import devices

# The H100 ceilings, kept for callers that read them (fastvlm/bench/devices.py holds every device's).
PEAK_TFLOPS_BF16 = devices.PROFILES["H100"].bf16_tflops
PEAK_TBPS = devices.PROFILES["H100"].copy_tbps


def tiny() -> bool:
    """True in a dry run: tiny shapes, few repetitions (FASTVLM_BENCH_TINY=1)."""
    return os.environ.get("FASTVLM_BENCH_TINY", "0") == "1"


def measure(fn, *, warmup=5, reps=30, device="cuda"):
    """Run ``fn`` and return (median, p20, p80) in milliseconds."""
    if tiny():
        warmup, reps = min(warmup, 1), min(reps, 2)
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


def roofline_ms(flops, min_bytes, dtype=torch.bfloat16):
    """Lower bound in ms on this device: max(compute time at the dtype's ceiling, minimal traffic at the copy
    ceiling)."""
    c = devices.current()
    return max(flops / (c.tflops(dtype) * 1e12), min_bytes / (c.copy_tbps * 1e12)) * 1e3


def roofline(flops, min_bytes, dtype=torch.bfloat16):
    """The roofline columns of a row: ``roofline_ms``, its profile, and for fp32 the fp32-IEEE bound."""
    c = devices.current()
    cols = dict(roofline_ms=roofline_ms(flops, min_bytes, dtype), roofline_profile=c.label())
    if dtype == torch.float32 and c.fp32_tflops:
        cols["roofline_ms_ieee"] = max(flops / (c.fp32_tflops * 1e12), min_bytes / (c.copy_tbps * 1e12)) * 1e3
    return cols


def timing_cols(med, p20, p80, flops=None, bound_ms=None, base_ms=None):
    """ms, p20/p80, TFLOP/s, fraction of the roofline and speed-up over the suite's baseline."""
    cols = dict(ms=med, p20_ms=p20, p80_ms=p80, speedup_vs_eager=(base_ms / med) if base_ms else float("nan"))
    if flops is not None:
        cols["tflops"] = flops / med / 1e9
    if bound_ms is not None:
        cols["roofline_fraction"] = bound_ms / med
    return cols


class Skipped(Exception):
    """A provider that cannot run here; the row records the reason instead of a time."""


COMPILE_ON_CPU = "CPU: torch.compile baselines are timed on CUDA only (FASTVLM_BENCH_COMPILE_CPU=1 forces it)"


def _compile_skipped():
    return not torch.cuda.is_available() and os.environ.get("FASTVLM_BENCH_COMPILE_CPU", "0") != "1"


def compile_module(m, mode=None):
    """``torch.compile(m, mode=mode)``. On a CPU, torch.compile is not timed (it would measure the host's C++ build,
    not a GPU baseline) unless FASTVLM_BENCH_COMPILE_CPU=1: Skipped with the reason."""
    if _compile_skipped():
        raise Skipped(COMPILE_ON_CPU)
    torch._dynamo.reset()  # each provider compiles afresh (no recompile limit carried over from the last one)
    return torch.compile(m, mode=mode) if mode else torch.compile(m)


def only_skipped_compiles(providers, compile_names):
    """True when every provider asked for is a torch.compile baseline that this (CPU) run does not time: the suite
    then records the skipped rows without building its models."""
    return bool(providers) and _compile_skipped() and all(p in compile_names for p in providers)


def rel_err(out, ref):
    ref = ref.detach().double()
    out = out.detach().to(ref.device, torch.float64)
    den = ref.norm()
    return float((out - ref).norm() / (den if den > 0 else 1.0))


def grads_of(params):
    """Copies of the gradients of ``params`` (None where a parameter got none)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def grad_rel_err(got, ref):
    """The worst relative error over parameters of gradients ``got`` against ``ref`` (lists from grads_of); inf
    where a reference gradient is missing from ``got`` (a parameter that got no gradient)."""
    worst = 0.0
    for g, r in zip(got, ref):
        if r is None:
            continue
        worst = max(worst, float("inf") if g is None else rel_err(g, r))
    return worst


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (out.stdout.strip() + ("-dirty" if dirty else "")) or os.environ.get("FASTVLM_COMMIT", "unknown")
    except Exception:
        return os.environ.get("FASTVLM_COMMIT", "unknown")


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
    from importlib import metadata

    for mod in ("triton", "transformers"):  # from the installed metadata: importing transformers costs seconds
        try:
            env[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            env[mod] = None
    if tiny():
        env["tiny"] = True
    return env


def append_results(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


class Recorder:
    """Collects a suite's rows and appends each one to ``path`` (JSON lines) the moment it is added."""

    def __init__(self, path=None, echo=None):
        self.path, self.rows, self.echo = path, [], echo

    def add(self, row):
        self.rows.append(row)
        if self.path:
            append_results([row], self.path)
        if self.echo:
            print(self.echo(row), flush=True)
        return row


def error_text(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def time_provider(rec, row, prepare, *, warmup, reps, device, cleanup=None):
    """Time one provider: ``prepare()`` returns (fn, extra columns) and ``fn`` is measured. A provider that is skipped
    or fails (compile error, OOM) is recorded in ``rec`` with its reason and None returned, so the other providers
    still run; otherwise (median, p20, p80, extra columns, peak bytes on CUDA or None)."""
    try:
        fn, extra = prepare()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        med, p20, p80 = measure(fn, warmup=warmup, reps=reps, device=device)
    except Skipped as exc:
        rec.add(dict(row, ms=None, skipped=str(exc)))
        return None
    except Exception as exc:  # recorded; the other providers still run
        rec.add(dict(row, ms=None, error=error_text(exc)))
        return None
    finally:
        if cleanup is not None:
            cleanup()
        if device == "cuda":
            torch.cuda.empty_cache()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return med, p20, p80, extra, peak


def time_modes(rec, m, inputs, *, base, modes, providers, flops, min_bytes, dtype, float_ref, one, warmup, reps,
               device):
    """The loop every module suite runs for one built shape: per mode (forward, or a training step with a fixed
    upstream gradient) a float64 reference, then each provider timed beside the eager one. ``float_ref(mode, gy)``
    returns (output, gradients); ``one(provider, mode, gy, ref, ref_grads)`` returns (fn, rel_err, grad_rel_err).
    ``flops`` is (forward, training step); a training step is taken to move ``3 * min_bytes``."""
    for mode in modes:
        torch.manual_seed(0)
        gy = None
        if mode != "fwd":
            with torch.no_grad():
                gy = torch.randn_like(m(*inputs)) * 0.01
        ref, ref_grads = float_ref(mode, gy)
        fl = flops[0] if mode == "fwd" else flops[1]
        nbytes = min_bytes if mode == "fwd" else 3 * min_bytes
        cols = roofline(fl, nbytes, dtype)
        eager_ms = None
        for prov in providers:
            row = dict(base, mode=mode, provider=prov, dtype=str(dtype), flops=fl, min_bytes=nbytes, **cols)

            def prepare(prov=prov, mode=mode, gy=gy, ref=ref, ref_grads=ref_grads):
                fn, err, gerr = one(prov, mode, gy, ref, ref_grads)
                return fn, dict(rel_err=err, grad_rel_err=gerr)

            timed = time_provider(rec, row, prepare, warmup=warmup, reps=reps, device=device,
                                  cleanup=lambda: release_grads(m))
            if timed is None:
                continue
            med, p20, p80, extra, peak = timed
            eager_ms = med if prov == "hf_eager" else eager_ms
            rec.add(dict(row, **timing_cols(med, p20, p80, fl, cols["roofline_ms"], eager_ms), **extra,
                         peak_mem_bytes=peak))


def print_footer(env, rows, out=None, table=None):
    """The device line after a suite's run, then ``table(rows)`` when a formatter is given (a suite's own columns),
    then where the rows were appended."""
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
    if table is not None:
        print(table(rows))
    if out:
        print(f"appended {len(rows)} rows to {out}")


def release_grads(module):
    """After a timed training step: drop the gradients and freeze the parameters again."""
    for p in module.parameters():
        p.grad = None
        p.requires_grad_(False)


def format_row(r):
    lead = f"{r['shape']:28} {r.get('mode', 'fwd'):8} {r['provider']:24}"
    if r.get("ms") is None:
        return f"{lead} {'skipped' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r.get('error')}"
    g = r.get("grad_rel_err")
    return (f"{lead} {r['ms']:10.4f} {r['p20_ms']:8.4f} {r['p80_ms']:8.4f} {r.get('tflops', float('nan')):8.1f} "
            f"{100 * r.get('roofline_fraction', float('nan')):6.1f} {r.get('speedup_vs_eager', float('nan')):8.2f} "
            f"{r['rel_err']:8.1e}" + (f" {g:8.1e}" if g is not None else ""))


def header():
    head = (f"{'shape':28} {'mode':8} {'provider':24} {'median ms':>10} {'p20':>8} {'p80':>8} {'TFLOP/s':>8} "
            f"{'%roof':>6} {'vs eager':>8} {'rel err':>8} {'grad err':>8}")
    return head + "\n" + "-" * len(head)


def format_rows(rows):
    return "\n".join([header()] + [format_row(r) for r in rows])
