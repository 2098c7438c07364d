"""Projector-family microbenchmark: transformers modules (eager, torch.compile default and max-autotune) vs fastvlm.

Shapes are real checkpoints' sizes (random weights, built from config classes):
    llava-1.5-7b@B     LlavaMultiModalProjector 1024 -> 4096 -> 4096, x [B, 576, 1024], B in 1, 8, 64
    qwen2-vl-7b@P      PatchMerger LN(1280), 2x2 merge, 5120 -> 5120 -> 3584, x [P, 1280], P in 1024, 16384
    internvl@7x256     InternVLMultiModalProjector LN(4096) -> 3584 -> 3584, x [7, 256, 4096]
Modes: "fwd" (inference, no_grad) and "fwd+bwd" (stage-1 alignment: every projector parameter trains, the vision
features do not). Each provider's forward output is compared, in the same run, with the module evaluated in fp32.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastvlm.bench import harness

SHAPES = ["llava-1.5-7b@1", "llava-1.5-7b@8", "llava-1.5-7b@64", "qwen2-vl-7b@1024", "qwen2-vl-7b@16384",
          "internvl@7x256"]
PROVIDERS = ["hf_eager", "hf_compile", "hf_compile_max_autotune", "fastvlm"]
MODES = ["fwd", "fwd+bwd"]


def build(shape, device, dtype):
    """(module, input, flops_fwd, flops_fwd_bwd, min_bytes) for a shape id."""
    import transformers

    name, _, arg = shape.partition("@")
    if name == "llava-1.5-7b":
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        m = LlavaMultiModalProjector(transformers.LlavaConfig())
        x = torch.randn(int(arg), 576, 1024)
        M, K, I, O = int(arg) * 576, 1024, 4096, 4096
    elif name == "qwen2-vl-7b":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

        m = PatchMerger(dim=3584, context_dim=1280)
        x = torch.randn(int(arg), 1280)
        M, K, I, O = int(arg) // 4, 5120, 5120, 3584
    elif name == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        cfg = transformers.InternVLConfig(vision_config=dict(model_type="internvl_vision", hidden_size=1024,
                                                             num_attention_heads=16, intermediate_size=4096),
                                          text_config=dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28,
                                                           num_key_value_heads=4, intermediate_size=18944))
        m = InternVLMultiModalProjector(cfg)
        b, t = (int(v) for v in arg.split("x"))
        x = torch.randn(b, t, 4096)
        M, K, I, O = b * t, 4096, 3584, 3584
    else:
        raise KeyError(f"unknown shape {shape!r}; choose from {SHAPES}")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m = m.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype)
    flops_fwd = 2 * M * (K * I + I * O)
    flops_fwd_bwd = 2 * M * (2 * K * I + 3 * I * O)  # + dW2, dA, dW1 (no dx: the vision features are frozen)
    elem = torch.finfo(dtype).bits // 8
    min_bytes = elem * (x.numel() + K * I + I + I * O + O + M * O)
    return m, x, flops_fwd, flops_fwd_bwd, min_bytes


def _provider(name, m):
    import fastvlm

    if name == "hf_eager":
        return m
    if name == "hf_compile":
        return torch.compile(m)
    if name == "hf_compile_max_autotune":
        return torch.compile(m, mode="max-autotune")
    if name == "fastvlm":
        return fastvlm.nn.from_module(m)
    raise KeyError(name)


def run(shapes=None, providers=None, modes=None, dtype=torch.bfloat16, reps=None, out=None, verbose=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if device == "cpu":
        shapes = shapes or ["llava-1.5-7b@1"]
        providers = providers or ["hf_eager", "fastvlm"]
        modes = modes or ["fwd"]
        dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        reps = reps or 3
        if verbose:
            print("No CUDA device: timing the CPU path (PyTorch ops on the CPU). These numbers show the harness runs; "
                  "they are not a measurement of fastvlm's kernels.")
    shapes, providers, modes, reps = shapes or SHAPES, providers or PROVIDERS, modes or MODES, reps or 30
    rows = []
    for shape in shapes:
        m, x, f_fwd, f_train, min_bytes = build(shape, device, dtype)
        with torch.no_grad():
            ref = m.float()(x.float())
            m.to(dtype)
        for mode in modes:
            eager_ms = None
            for prov in providers:
                mod = _provider(prov, m)
                if mode == "fwd":
                    def fn():
                        with torch.no_grad():
                            return mod(x)
                    flops = f_fwd
                else:
                    for p in m.parameters():
                        p.requires_grad_(True)
                    gy = torch.randn_like(ref, dtype=dtype) * 0.01

                    def fn():
                        mod(x).backward(gy)
                    flops = f_train
                with torch.no_grad():
                    out_check = mod(x)
                err = float((out_check.float() - ref).norm() / ref.norm())
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                med, p20, p80 = harness.measure(fn, warmup=3 if device == "cpu" else 10, reps=reps, device=device)
                peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
                if prov == "hf_eager":
                    eager_ms = med
                bound = harness.roofline_ms(flops, min_bytes if mode == "fwd" else 3 * min_bytes)
                rows.append(dict(suite="projector", shape=shape, mode=mode, provider=prov, dtype=str(dtype), ms=med,
                                 p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9, roofline_ms=bound,
                                 roofline_fraction=bound / med, speedup_vs_eager=(eager_ms / med) if eager_ms else float("nan"),
                                 rel_err=err, peak_mem_bytes=peak, **env))
                for p in m.parameters():
                    p.grad = None
                    p.requires_grad_(False)
                if device == "cuda":
                    torch.cuda.empty_cache()
    if verbose:
        print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}")
        print(harness.format_rows(rows))
    if out:
        harness.append_results(rows, out)
        if verbose:
            print(f"appended {len(rows)} rows to {out}")
    return rows


def dispatch_overhead(reps=2000):
    """Host cost per call of the custom-op boundary vs the eager bypass, on tiny inputs (microseconds)."""
    import time

    from fastvlm.ops import projector as P

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(4, 16, device=device)
    w1, b1, w2, b2 = (torch.randn(16, 16, device=device), torch.randn(16, device=device),
                      torch.randn(8, 16, device=device), torch.randn(8, device=device))
    args = (x, w1, b1, w2, b2, None, None, "none", 16, 1e-5, "gelu")
    os.environ.setdefault("FASTVLM_BACKEND", "torch" if device == "cpu" else "auto")
    calls = {
        "direct implementation": lambda: P._forward(*args, False),
        "eager bypass (fastvlm.mlp_projector)": lambda: P.mlp_projector(x, w1, b1, w2, b2, act="gelu"),
        "torch.ops.fastvlm.mlp_projector": lambda: torch.ops.fastvlm.mlp_projector(*args, False),
    }
    res = {}
    for name, fn in calls.items():
        for _ in range(50):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
        res[name] = (time.perf_counter() - t0) / reps * 1e6
    return device, res


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastvlm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"default: all on GPU, llava-1.5-7b@1 on CPU. Choices: {SHAPES}")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS)
    ap.add_argument("--modes", nargs="*", choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    ap.add_argument("--overhead", action="store_true", help="only measure the custom-op dispatch overhead")
    args = ap.parse_args(argv)
    if args.overhead:
        device, res = dispatch_overhead()
        print(f"per-call host time on {device} (tiny 4x16 inputs; the op's own work is identical in each row):")
        for k, v in res.items():
            print(f"  {k:40} {v:8.1f} us")
        return 0
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    run(args.shapes, args.providers, args.modes, getattr(torch, args.dtype), args.reps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
