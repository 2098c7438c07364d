"""The GPU session's report: ``env.json`` (device, versions, commit, measured ceilings) and ``summary.md`` (each
issue's target with the measured ratio and whether it is met, the steps and their times, the GPU test results, rows
whose error or gradient looks wrong, rows slower than eager, failures), written by benchmarks/gpu_session.sh.

    python -m fastvlm.bench.session env --work DIR --out OUT/env.json [--measure]
    python -m fastvlm.bench.session summary --work DIR --out OUT/summary.md

``env`` imports torch (once, early in the session); ``summary`` does not (run it as ``python
fastvlm/bench/session.py summary ...``): it only reads DIR's ``*.jsonl`` rows, ``steps.tsv`` (step, budget s, seconds,
exit code, CPU seconds) and ``*.junit.xml`` (pytest reports), so it can run after every step.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict


def _load_targets():
    """fastvlm/bench/targets.py loaded by path: ``python fastvlm/bench/session.py summary`` runs without importing
    fastvlm (and torch), in a fraction of a second after every step of the session."""
    name = "fastvlm.bench.targets"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                     "targets.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


targets = _load_targets()


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"


def environment(measure=False, ceilings_out=None):
    """Device, versions, commit, the roofline profile in use and (``measure``) the ceilings measured here."""
    import torch

    from fastvlm.bench import devices, harness

    env = dict(harness.environment(), python=platform.python_version(), host_cpus=os.cpu_count(),
               dry_run=os.environ.get("FASTVLM_BENCH_TINY") == "1")
    from importlib import metadata

    for mod in ("timm", "pytest", "pytest-xdist", "pytest-timeout"):  # versions without importing them
        try:
            env[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            env[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2 ** 30, 1),
                   driver=_run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"]))
    env["roofline_profile"] = asdict(devices.current())
    if measure:
        env["measured_ceilings"] = devices.measure()
        if ceilings_out:
            with open(ceilings_out, "w") as f:
                json.dump(env["measured_ceilings"], f, indent=1)
    return env


def read_rows(work):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "*.jsonl"))):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a row cut by a time limit
    rows.sort(key=lambda r: r.get("time", ""))  # stable: within one second, file order
    return rows


def read_steps(work):
    steps = []
    path = os.path.join(work, "steps.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    steps.append(dict(step=parts[0], budget=parts[1], seconds=parts[2], rc=parts[3],
                                      cpu=parts[4] if len(parts) > 4 else "-"))
    return steps


def read_tests(work):
    """{junit file stem: (tests, failures, errors, skipped, [failed test ids])}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(work, "*.junit.xml"))):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            out[os.path.basename(path)[:-10]] = None
            continue
        n = f = e = s = 0
        failed = []
        for case in root.iter("testcase"):
            n += 1
            for child in case:
                if child.tag in ("failure", "error"):
                    f += child.tag == "failure"
                    e += child.tag == "error"
                    msg = (child.get("message") or "").strip().splitlines()
                    failed.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:160] if msg else ''}")
                elif child.tag == "skipped":
                    s += 1
        out[os.path.basename(path)[:-10]] = (n, f, e, s, failed)
    return out


def _fmt(v, measure):
    if v is None:
        return "—"
    return f"{100 * v:.0f}%" if measure in ("tflops", "bandwidth", "roofline") else f"{v:.2f}x"


def _thr(t):
    if t.threshold is None:
        return "(info)"
    return f">= {100 * t.threshold:.0f}%" if t.measure != "speedup" else f">= {t.threshold:g}x"


def _row_label(r):
    return f"{r.get('suite')} {r.get('shape')} {r.get('mode', 'fwd')} {r.get('provider')} {r.get('dtype', '')}"


def summary(work):
    env = {}
    if os.path.exists(os.path.join(work, "env.json")):
        with open(os.path.join(work, "env.json")) as f:
            env = json.load(f)
    rows = read_rows(work)
    prof = env.get("roofline_profile")
    lines = ["# GPU session summary", ""]
    if env.get("dry_run"):
        lines += ["**Dry run** (`--dry-run`: tiny shapes, PyTorch path on the CPU): these rows show that every step "
                  "runs; no number here is a measurement.", ""]
    lines += [f"- device: {env.get('device', '?')} ({env.get('capability', '-')}, {env.get('sms', '-')} SMs, "
              f"{env.get('memory_gib', '-')} GiB; driver, max SM clock, power limit: {env.get('driver', '-')})",
              f"- versions: torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
              f"transformers {env.get('transformers')}, timm {env.get('timm')}, python {env.get('python')}",
              f"- commit: {env.get('commit', '?')}; started {env.get('time', '?')}; rows: {len(rows)}"]
    if prof:
        lines.append(f"- roofline ceilings used: {prof['name']}: {prof['bf16_tflops']:g} TFLOP/s bf16, "
                     f"{prof['tf32_tflops']:g} tf32, {prof['fp32_tflops']:g} fp32, {prof['copy_tbps']:g} TB/s "
                     f"({prof['source']})")
    m = env.get("measured_ceilings")
    if m:
        lines.append(f"- measured here: copy {m['copy_tbps']:.2f} TB/s, bf16 {m['bf16_tflops']:.0f}, tf32 "
                     f"{m['tf32_tflops']:.0f}, fp32 {m['fp32_tflops']:.1f} TFLOP/s ({m['matmul_n']}^3 matmuls, "
                     f"{m['copy_gb']} GB copy)")
    lines += ["", "## Targets", "", "| issue | target | measured | wanted | status | fastvlm ms | baseline ms | note |",
              "|---|---|---|---|---|---|---|---|"]
    for ev in targets.evaluate(rows, prof):
        t, fast, base = ev["target"], ev["fast"], ev["base"]
        fms = f"{fast['ms']:.4g}" if fast and fast.get("ms") else "—"
        bms = f"{base['ms']:.4g} ({t.baseline})" if base and base.get("ms") else (t.baseline or "")
        lines.append(f"| {t.issue} | {t.what} | {_fmt(ev['value'], t.measure)} | {_thr(t)} | {ev['status']} | "
                     f"{fms} | {bms} | {ev['note']} |")
    lines += ["", "## Steps", "", "| step | budget s | took s | host CPU s | exit |", "|---|---|---|---|---|"]
    for s in read_steps(work):
        rc = {"124": "124 (time limit)", "137": "137 (killed)", "0": "0"}.get(s["rc"], s["rc"])
        lines.append(f"| {s['step']} | {s['budget']} | {s['seconds']} | {s['cpu']} | {rc} |")
    tests = read_tests(work)
    if tests:
        lines += ["", "## GPU tests", ""]
        for name, res in tests.items():
            if res is None:
                lines.append(f"- {name}: report unreadable (cut by the time limit?)")
                continue
            n, f, e, s, failed = res
            lines.append(f"- {name}: {n} tests, {n - f - e - s} passed, {f} failed, {e} errors, {s} skipped")
            lines += [f"  - FAILED {x}" for x in failed[:30]]
    flags = targets.accuracy_flags(rows)
    lines += ["", "## Accuracy flags", "", "fastvlm rows whose error exceeds max(2 x eager's error in the same "
              "group, the dtype's derived bound):", ""]
    lines += [f"- {_row_label(x['row'])}: {x['key']} {x['value']:.2e} > {x['limit']:.2e}" for x in flags] or ["- none"]
    slow = targets.slower_than_eager(rows)
    lines += ["", "## fastvlm rows slower than eager (issue 12's floor)", ""]
    if env.get("dry_run"):
        lines += ["(dry run: CPU timings of tiny shapes, not a measurement)", ""]
    lines += [f"- {_row_label(r)}: {r['speedup_vs_eager']:.2f}x" for r in slow] or ["- none"]
    bad = [r for r in rows if r.get("error")]
    lines += ["", "## Failed providers", ""]
    lines += [f"- {_row_label(r)}: {r['error']}" for r in bad] or ["- none"]
    lines += ["", "All rows, logs and test reports: results.tar.gz (unpack into benchmarks/results/)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.bench.session", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["env", "summary"])
    ap.add_argument("--work", required=True, help="the session's working folder (rows, logs, steps.tsv)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--measure", action="store_true", help="env: also measure the ceilings on this device")
    args = ap.parse_args(argv)
    if args.what == "env":
        t0 = time.time()
        env = environment(args.measure, os.path.join(args.work, "ceilings.json"))
        env["env_seconds"] = round(time.time() - t0, 1)
        text = json.dumps(env, indent=1, default=str)
        for path in {args.out, os.path.join(args.work, "env.json")}:
            with open(path, "w") as f:
                f.write(text + "\n")
        print(text)
    else:
        text = summary(args.work)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
