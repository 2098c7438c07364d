"""Roofline ceilings per device, in one place, and a probe that measures them on the device at hand.

The roofline columns of every benchmark row use the profile of the device the row ran on, found by name from
``torch.cuda.get_device_name()``. The numbers are ceilings *measured* on such machines, not datasheet peaks:

=========  ==========  ==========  ==========  ==========  ====================================================
profile    bf16/fp16   tf32        fp32 IEEE   copy        where the numbers come from
           TFLOP/s     TFLOP/s     TFLOP/s     TB/s
=========  ==========  ==========  ==========  ==========  ====================================================
H100       790         395         54          3.0         bf16 8192^3 matmul on random data and a device-to-
                                                           device copy (bytes read + written), measured on H100
                                                           SXM machines; tf32 and fp32 derived (below)
H200       790         395         54          4.3         the same SMs and clocks as H100 (bf16 769-798 TFLOP/s
                                                           measured on this workplace's H200s); copy measured
                                                           there at 4.3 TB/s (8.6 GB in 2.0 ms)
=========  ==========  ==========  ==========  ==========  ====================================================

Derived, labelled as such until a session measures them (``measure()`` does, see env.json of a GPU session): tf32 is
half the bf16 ceiling (the datasheet ratio, 495 : 989), fp32 IEEE (CUDA cores, what transformers' fp32 modules run
with allow_tf32 off) is the datasheet's 67 TFLOP/s times the measured/datasheet ratio of bf16 (790 / 989 = 0.8).

Scoring: 16-bit rows against the bf16 ceiling; fp32 rows against the tf32 ceiling (the fastest tensor-core path for
fp32 data, so a valid lower bound on time for every fp32 provider: IEEE, tf32x3 or tf32), with the fraction of the
fp32-IEEE bound given beside it (``roofline_ms_ieee``). Memory time is min_bytes over the copy ceiling. A device not
in the table uses the ceilings measured in this session when ``FASTVLM_CEILINGS`` names a JSON file written by
``python -m fastvlm.bench.devices --out FILE``, else the H100 profile; every row names the profile it was scored
against (``roofline_profile``). On a CPU the H100 profile is used, and no CPU number is a speed claim.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    name: str
    bf16_tflops: float  # dense, also fp16
    tf32_tflops: float
    fp32_tflops: float  # IEEE fp32 on CUDA cores
    copy_tbps: float  # device-to-device copy, bytes read + written
    source: str

    def tflops(self, dtype) -> float:
        if dtype in (torch.float32, "float32", "torch.float32"):
            return self.tf32_tflops
        return self.bf16_tflops

    def label(self) -> str:
        return (f"{self.name}: {self.bf16_tflops:g} TFLOP/s bf16, {self.tf32_tflops:g} tf32, {self.fp32_tflops:g} "
                f"fp32, {self.copy_tbps:g} TB/s ({self.source})")


_DERIVED = "bf16 and copy measured; tf32 = bf16 / 2, fp32 = 67 x 790 / 989 derived"
PROFILES = {
    "H100": Ceilings("H100", 790.0, 395.0, 54.0, 3.0, _DERIVED),
    "H200": Ceilings("H200", 790.0, 395.0, 54.0, 4.3, _DERIVED),
}


def profile_for(device_name: str | None) -> Ceilings:
    """The ceilings for a device name as torch reports it ("NVIDIA H100 80GB HBM3", "NVIDIA H200", ...)."""
    name = (device_name or "").upper()
    for key in ("H200", "H100"):  # H200 first: no H100 name contains "H200"
        if key in name:
            return PROFILES[key]
    measured = os.environ.get("FASTVLM_CEILINGS")
    if measured and os.path.exists(measured) and device_name:
        with open(measured) as f:
            m = json.load(f)
        if m.get("device") == device_name and all(m.get(k) for k in ("bf16_tflops", "tf32_tflops", "copy_tbps")):
            return Ceilings(device_name, m["bf16_tflops"], m["tf32_tflops"], m.get("fp32_tflops") or 0.0,
                            m["copy_tbps"], "measured in this session")
    h100 = PROFILES["H100"]
    why = "not a GPU" if not device_name or device_name.startswith("cpu") else "device not in the table"
    return Ceilings(h100.name, h100.bf16_tflops, h100.tf32_tflops, h100.fp32_tflops, h100.copy_tbps,
                    f"H100 constants, {why}")


def current() -> Ceilings:
    return profile_for(torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def measure(size_gb=2.0, n=8192, reps=10):
    """Measure the ceilings on the current device: a device-to-device copy of ``size_gb`` GB (bytes read + written)
    and n^3 matmuls on random data in bf16, tf32 and fp32 (the mean of ``reps`` after warm-ups). On a CPU: small
    sizes, and the numbers only show that the probe runs."""
    import time

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    if not cuda:
        size_gb, n, reps = 0.01, 256, 2

    def timed(fn):
        for _ in range(2):
            fn()
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps

    src = torch.randn(int(size_gb * 2 ** 30 / 4), device=dev)
    dst = torch.empty_like(src)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu",
           "copy_tbps": 2 * src.numel() * 4 / timed(lambda: dst.copy_(src)) / 1e12}
    del src, dst
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, allow in (("bf16_tflops", torch.bfloat16, False), ("tf32_tflops", torch.float32, True),
                                  ("fp32_tflops", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow
            a = torch.randn(n, n, device=dev).to(dtype)
            b = torch.randn(n, n, device=dev).to(dtype)
            out[key] = 2 * n ** 3 / timed(lambda: a @ b) / 1e12
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    out["matmul_n"], out["copy_gb"] = n, size_gb
    prof = current()
    out["profile"] = asdict(prof)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.bench.devices", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the measured ceilings (JSON) here")
    args = ap.parse_args(argv)
    res = measure()
    prof = current()
    print(f"device {res['device']}: copy {res['copy_tbps']:.2f} TB/s, bf16 {res['bf16_tflops']:.0f}, tf32 "
          f"{res['tf32_tflops']:.0f}, fp32 {res['fp32_tflops']:.1f} TFLOP/s (measured)")
    print(f"profile used for the roofline columns: {prof.label()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
