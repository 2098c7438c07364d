"""Image-token scatter microbenchmark: transformers' masked_scatter, the Triton op and the CUDA-extension op.

This is the measurement docs/design-csrc.md asks for before the CUDA kernel may become the default on CUDA tensors
(Triton is the default until a GPU run shows otherwise).

Shapes (inputs_embeds [B, S, D], n image tokens per sequence in one block, features [B * n, D]):
    llava-1.5-7b@1      B=1, S=640,   D=4096, n=576    (one 336px image)
    llava-1.5-7b@8      B=8, S=640,   D=4096, n=576
    llava-next-7b@4     B=4, S=3072,  D=4096, n=2880   (AnyRes, 672px)
    qwen2-vl-7b@16k     B=1, S=16384, D=3584, n=14400  (a large image or a video)
    qwen2-vl-7b@8x4k    B=8, S=4096,  D=3584, n=3600
    BxSxD:n             any other size, e.g. 2x64x40:30
Providers:
    masked_scatter      transformers: inputs_embeds.masked_scatter(mask[..., None].expand_as(...), features.to(dtype))
                        (its count check, one host synchronisation, not included)
    triton              torch.ops.fastvlm.scatter_image_features, the Triton kernel (CUDA tensors only)
    cuda_ext            torch.ops.fastvlm_ext.scatter_image_features: scan + row-copy kernels, count returned unread
    api_auto, api_cuda  fastvlm.scatter_image_features(backend=...), with the host count check (not run by default)
Timing: harness.measure: on CUDA each repetition is bracketed by CUDA events after a warm-up (median, p20, p80);
GB/s counts the minimum traffic (text rows of inputs_embeds and the features read, the output written, the mask).
Each provider's output is compared with masked_scatter's in the same run (``exact``). Without a GPU the available
providers (masked_scatter, the extension's CPU implementation) are timed with perf_counter and the Triton op is
skipped with the reason: CPU numbers show that the harness runs, never which kernel is faster.
"""
from __future__ import annotations

import argparse
import re
import sys

import torch

from fastvlm.bench import harness

SHAPES = {
    "llava-1.5-7b@1": (1, 640, 4096, 576),
    "llava-1.5-7b@8": (8, 640, 4096, 576),
    "llava-next-7b@4": (4, 3072, 4096, 2880),
    "qwen2-vl-7b@16k": (1, 16384, 3584, 14400),
    "qwen2-vl-7b@8x4k": (8, 4096, 3584, 3600),
}
PROVIDERS = ["masked_scatter", "triton", "cuda_ext"]
ALL_PROVIDERS = PROVIDERS + ["api_auto", "api_cuda"]


def parse_shape(shape: str):
    """(B, S, D, n per sequence) for a shape id or a "BxSxD:n" string."""
    if shape in SHAPES:
        return SHAPES[shape]
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+):(\d+)", shape)
    if not m:
        raise KeyError(f"unknown shape {shape!r}; choose from {list(SHAPES)} or give BxSxD:n")
    B, S, D, n = (int(v) for v in m.groups())
    if n > S:
        raise ValueError(f"{shape}: {n} image tokens do not fit in {S} positions")
    return B, S, D, n


def build(shape, device, dtype, feat_dtype=None):
    """(inputs_embeds [B, S, D], image_mask [B, S], features [B * n, D], min_bytes)."""
    B, S, D, n = parse_shape(shape)
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    start = min(5, S - n)  # a short text prefix, then the image block, then text
    mask[:, start:start + n] = True
    feats = torch.randn(B * n, D, generator=g).to(device=device, dtype=feat_dtype or dtype)
    e = torch.finfo(dtype).bits // 8
    fe = torch.finfo(feats.dtype).bits // 8
    min_bytes = (B * S - B * n) * D * e + B * n * D * fe + B * S * D * e + B * S
    return embeds, mask.to(device), feats, min_bytes


def _providers(names, embeds, mask, feats):
    """{name: fn} for the providers that can run here, and {name: reason} for those that cannot."""
    import fastvlm
    from fastvlm import _cext, _dispatch

    D = embeds.shape[-1]
    flat_e, flat_m = embeds.reshape(-1, D), mask.reshape(-1)
    fns, skipped = {}, {}
    ext_ok, ext_why = _cext.available(build=True)
    for name in names:
        if name == "masked_scatter":
            fns[name] = lambda: embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))
        elif name == "triton":
            why = _dispatch.environment_reasons(embeds.device) if embeds.is_cuda else [
                "needs CUDA tensors (on CPU only the Triton interpreter could run it, which is not a kernel to time)"]
            if _dispatch.requested_backend() == "torch":
                why = why + ["FASTVLM_BACKEND=torch"]
            if why:
                skipped[name] = "; ".join(why)
            else:
                fns[name] = lambda: torch.ops.fastvlm.scatter_image_features(flat_e, flat_m, feats)
        elif name in ("cuda_ext", "api_cuda"):
            if not ext_ok:
                skipped[name] = f"CUDA extension unavailable: {ext_why}"
            elif name == "cuda_ext":
                fns[name] = lambda: torch.ops.fastvlm_ext.scatter_image_features(flat_e, flat_m, feats)[0]
            else:
                fns[name] = lambda: fastvlm.scatter_image_features(embeds, mask, feats, backend="cuda")
        elif name == "api_auto":
            fns[name] = lambda: fastvlm.scatter_image_features(embeds, mask, feats, backend="auto")
        else:
            raise KeyError(f"unknown provider {name!r}; choose from {ALL_PROVIDERS}")
    return fns, skipped


def run(shapes=None, providers=None, dtype=torch.bfloat16, feat_dtype=None, reps=None, out=None, verbose=True):
    """Time the providers on each shape; return the result rows (skipped providers have ms=None and a reason)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if device == "cpu":
        shapes = shapes or ["llava-1.5-7b@1"]
        reps = reps or 5
        if verbose:
            print("No CUDA device: timing what runs on the CPU (masked_scatter, the CUDA extension's CPU "
                  "implementation) with perf_counter; the Triton op is skipped. These numbers show the harness "
                  "runs; they say nothing about which GPU kernel is faster.")
    shapes, providers, reps = shapes or list(SHAPES), providers or PROVIDERS, reps or 50
    if harness.tiny():  # FASTVLM_BENCH_TINY: one small shape of the same structure
        shapes = ["2x64x40:30"]
    rec = harness.Recorder(out)
    for shape in shapes:
        embeds, mask, feats, min_bytes = build(shape, device, dtype, feat_dtype)
        ref = embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))
        fns, skipped = _providers(providers, embeds, mask, feats)
        base_ms = None
        cols = harness.roofline(0, min_bytes, dtype)
        bound = cols["roofline_ms"]
        for prov in providers:
            row = dict(suite="scatter", shape=shape, provider=prov, dtype=str(dtype),
                       feat_dtype=str(feats.dtype), min_bytes=min_bytes, **cols, **env)
            if prov in skipped:
                rec.add(dict(row, ms=None, skipped=skipped[prov]))
                continue
            fn = fns[prov]
            try:
                with torch.no_grad():
                    got = fn()
                    exact = bool(torch.equal(got.reshape(ref.shape), ref))
                    med, p20, p80 = harness.measure(fn, warmup=2 if device == "cpu" else 10, reps=reps,
                                                    device=device)
            except Exception as exc:  # recorded; the other providers still run
                rec.add(dict(row, ms=None, error=harness.error_text(exc)))
                continue
            if prov == "masked_scatter":
                base_ms = med
            rec.add(dict(row, ms=med, p20_ms=p20, p80_ms=p80, gbps=min_bytes / med / 1e6,
                         roofline_fraction=bound / med, exact=exact,
                         speedup_vs_masked_scatter=(base_ms / med) if base_ms else float("nan")))
        del embeds, mask, feats, ref
        if device == "cuda":
            torch.cuda.empty_cache()
    rows = rec.rows
    if verbose:
        harness.print_footer(env, rows, out, table=format_rows)
    return rows


def format_rows(rows):
    head = (f"{'shape':20} {'provider':16} {'median ms':>10} {'p20':>8} {'p80':>8} {'GB/s':>8} {'%roof':>6} "
            f"{'vs masked':>9} {'exact':>5}")
    out = [head, "-" * len(head)]
    for r in rows:
        if r["ms"] is None:
            out.append(f"{r['shape']:20} {r['provider']:16} {'skipped' if 'skipped' in r else 'FAILED'}: "
                       f"{r.get('skipped') or r.get('error')}")
            continue
        out.append(f"{r['shape']:20} {r['provider']:16} {r['ms']:10.4f} {r['p20_ms']:8.4f} {r['p80_ms']:8.4f} "
                   f"{r['gbps']:8.1f} {100 * r['roofline_fraction']:6.1f} {r['speedup_vs_masked_scatter']:9.2f} "
                   f"{'yes' if r['exact'] else 'NO':>5}")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.bench.scatter", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"default: all on GPU, llava-1.5-7b@1 on CPU. Ids: {list(SHAPES)} "
                                                "or BxSxD:n")
    ap.add_argument("--providers", nargs="*", choices=ALL_PROVIDERS, help=f"default: {PROVIDERS}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--feat-dtype", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the features (default: the embeddings'); float32 exercises the in-kernel cast")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    run(args.shapes, args.providers, getattr(torch, args.dtype),
        getattr(torch, args.feat_dtype) if args.feat_dtype else None, args.reps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
