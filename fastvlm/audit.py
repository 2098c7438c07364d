"""Static audit: compile every kernel x config for an H100 (sm_90a) without a GPU.

For each case it reports registers, spilled bytes, shared memory, whether the matrix instructions are wgmma, and
whether the main loop is pipelined: every tile load inside a loop of the TTGIR is an asynchronous copy (cp.async or a
TMA bulk copy) rather than a register load, and a wgmma wait leaves at least one group in flight (``wgmma.wait_group
N`` with N >= 1 in the PTX), so the tensor cores overlap the next tile's loads.
Run it as ``fastvlm audit`` or ``python -m fastvlm.audit [--json] [--jobs N]``. It must run in a process where
``TRITON_INTERPRET`` is unset: with the interpreter on, triton builds its own standard library as interpreter
functions at import and compilation fails with misleading errors.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

H100_SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)


def _cases():
    from fastvlm.kernels import attention, gemm, gemm_tma_audit, linear_norm, norm_stats, pool, row_norm, scatter

    return (gemm.audit_cases() + gemm_tma_audit.audit_cases() + norm_stats.audit_cases() + scatter.audit_cases()
            + attention.audit_cases()
            + pool.audit_cases() + linear_norm.audit_cases() + _perceiver_cases() + row_norm.audit_cases())


def _perceiver_cases():
    from fastvlm.ops import perceiver  # the fused-GEMM variants of Idefics2's Perceiver (fastvlm::norm_linear)

    return perceiver.audit_cases()


def _ptxas():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


_DOT_OPS = ("tt.dot ", "tt.dot_scaled", "ttng.warp_group_dot ", "ttng.tc_gen5_mma")


def loop_loads(ttgir):
    """(asynchronous copies, synchronous tile loads) inside the main loop of a TTGIR listing. A tile load is a
    tt.load of a tensor of rank >= 2 (per-row or per-column vectors such as a bias or norm statistics do not count).
    The main loop is the scf.for that issues the matrix multiply, with the loops nested in it (a pooled A's window
    loop); a persistent kernel's outer tile loop and its epilogue (split-K partial sums, a residual) are not part of
    it. A listing without a matrix multiply counts every loop."""
    frames = []  # (parent index, [n_async, n_sync], [has a dot directly])
    stack = []  # (frame index, brace depth inside it)
    depth = 0
    outside = [0, 0]
    for line in ttgir.splitlines():
        opens, closes = line.count("{"), line.count("}")
        counts = frames[stack[-1][0]][1] if stack else outside
        if stack and any(op in line for op in _DOT_OPS):
            frames[stack[-1][0]][2][0] = True
        if stack and ("async_copy_global_to_local" in line or "async_tma_copy_global_to_local" in line
                      or "async_tma_gather" in line or "tt.descriptor_load" in line):
            counts[0] += 1
        elif stack and "tt.load" in line:
            m = re.search(r":\s*tensor<([0-9x]+)x!tt\.ptr", line)
            if m and m.group(1).count("x") >= 1:
                counts[1] += 1
        if "scf.for" in line and line.rstrip().endswith("{"):
            frames.append((stack[-1][0] if stack else None, [0, 0], [False]))
            stack.append((len(frames) - 1, depth + opens - closes))
        depth += opens - closes
        while stack and depth < stack[-1][1]:
            stack.pop()
    any_dot = any(f[2][0] for f in frames)

    def counted(i):
        while i is not None:
            if frames[i][2][0]:
                return True
            i = frames[i][0]
        return not any_dot

    n_async = sum(f[1][0] for i, f in enumerate(frames) if counted(i))
    n_sync = sum(f[1][1] for i, f in enumerate(frames) if counted(i))
    return n_async, n_sync


def compile_case(case, arch=90):
    """Compile one case and return its resource report (a dict)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(case["fn"].arg_names)
    missing = set(names) ^ set(case["signature"])
    if missing:
        raise ValueError(f"audit case {case['name']}: signature does not match the kernel's arguments: {sorted(missing)}")
    signature = {n: case["signature"][n] for n in names}  # in the kernel's argument order
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in case["divisible"]}
    src = ASTSource(fn=case["fn"], signature=signature, constexprs=dict(case["constexprs"]), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    ptx = compiled.asm["ptx"]
    n_async, n_sync = loop_loads(compiled.asm["ttgir"])
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    report = {
        "name": case["name"],
        "num_warps": case["num_warps"],
        "num_stages": case["num_stages"],
        "shared_bytes": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "mma_sync": "mma.sync" in ptx,
        "expect_mma": case["expect_mma"],
        "loop_async_loads": n_async,
        "loop_sync_tile_loads": n_sync,
        "async_loads": n_async > 0 and n_sync == 0,
        "wgmma_in_flight": any(n >= 1 for n in waits),
        "tma": "cp.async.bulk.tensor" in ptx,
        "registers": None,
        "spill_bytes": None,
    }
    ptxas = _ptxas()
    if ptxas:
        with tempfile.TemporaryDirectory() as tmp:
            p = os.path.join(tmp, "k.ptx")
            with open(p, "w") as f:
                f.write(ptx)
            target = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
            res = subprocess.run([ptxas, "-v", f"--gpu-name={target}", p, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            text = res.stdout + res.stderr
            regs = re.search(r"Used (\d+) registers", text)
            spills = re.findall(r"(\d+) bytes spill stores", text) + re.findall(r"(\d+) bytes spill loads", text)
            report["registers"] = int(regs.group(1)) if regs else None
            report["spill_bytes"] = sum(int(s) for s in spills) if spills else 0
    report["ok"] = (report["shared_bytes"] <= H100_SMEM_LIMIT and (report["spill_bytes"] or 0) == 0
                    and (report["wgmma"] or not report["expect_mma"]) and (report["tma"] or not case.get("expect_tma")))
    return report


_FORKED_CASES = None  # the case list a forked worker inherits (kernel objects are not sent between processes)


def _compile_nth(i):
    return compile_case(_FORKED_CASES[i])


def run_audit(jobs=None):
    """Reports in case order. Compilation is single-threaded per kernel, so ``jobs`` forked workers (default: one per
    CPU) divide the wall time; ``jobs=1`` compiles in this process."""
    global _FORKED_CASES
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("fastvlm audit must run without TRITON_INTERPRET=1 (unset it; the audit compiles, it never launches)")
    cases = _cases()
    jobs = min(jobs or os.cpu_count() or 1, len(cases))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [compile_case(c) for c in cases]
    _FORKED_CASES = cases
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_nth, range(len(cases)), chunksize=4))
    finally:
        _FORKED_CASES = None


def format_table(reports):
    head = (f"{'kernel / config':58} {'regs':>5} {'spill B':>8} {'smem KB':>8} {'matrix':>9} {'loads':>9} "
            f"{'in flight':>9}  ok")
    lines = [head, "-" * len(head)]
    for r in reports:
        mma = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "-")
        loads = "async" if r["async_loads"] else (f"{r['loop_sync_tile_loads']} sync" if r["loop_sync_tile_loads"]
                                                  else "-")
        flight = ("yes" if r["wgmma_in_flight"] else "no") if r["wgmma"] else "-"
        lines.append(f"{r['name']:58} {r['registers'] if r['registers'] is not None else '?':>5} "
                     f"{r['spill_bytes'] if r['spill_bytes'] is not None else '?':>8} {r['shared_bytes'] / 1024:8.1f} "
                     f"{mma:>9} {loads:>9} {flight:>9}  {'yes' if r['ok'] else 'NO'}")
    lines.append(summary(reports))
    return "\n".join(lines)


def summary(reports):
    """One line: how many matrix cases load every tile asynchronously and keep a wgmma group in flight."""
    mma = [r for r in reports if r["expect_mma"]]
    n_async = sum(r["async_loads"] for r in mma)
    n_flight = sum(r["wgmma_in_flight"] for r in mma if r["wgmma"])
    n_wgmma = sum(r["wgmma"] for r in mma)
    sync = sorted({r["name"].split("]")[0] + "]" for r in mma if not r["async_loads"]})
    n_tma = sum(bool(r.get("tma")) for r in mma)
    return (f"pipelining: {n_async}/{len(mma)} matrix cases load every tile of their main loop asynchronously, "
            f"{n_flight}/{n_wgmma} wgmma cases keep >= 1 group in flight, {n_tma} load by TMA bulk copies"
            + (f"; synchronous tile loads in: {', '.join(sync)}" if sync else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    jobs = int(argv[argv.index("--jobs") + 1]) if "--jobs" in argv else None
    reports = run_audit(jobs)
    if "--json" in argv:
        print(json.dumps(reports))
    else:
        print("sm_90a compile audit (no GPU needed): shared memory limit 227 KB, no spills, wgmma for GEMM tiles")
        print(format_table(reports))
    return 0 if all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
