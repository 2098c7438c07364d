"""Q-Former benchmark: the whole BLIP-2 Q-Former and its attention core, transformers vs fastvlm.

Suites (rows carry ``suite``):
    qformer    Blip2QFormerModel at BLIP-2 size (768 wide, 12 layers, 12 heads, 6 cross-attention layers,
               32 queries x 257 image tokens of 1408), batch B in 1, 8, 64. Providers: hf_eager (eager attention),
               hf_sdpa, hf_compile_max_autotune (sdpa module under torch.compile(mode="max-autotune")), fastvlm
               (FusedBlip2QFormerModel computing in the module's dtype) and, for fp32 modules, fastvlm_bf16 (the
               opt-in bf16 compute mode: fp32 parameters, bf16 activations and weight copies).
    attention  the attention core alone, 32 queries x 257 keys, 12 heads of 64, batch B: torch SDPA, flash-attn and
               xformers when importable (16-bit only), fastvlm.
dtypes: fp32 (what transformers keeps the Q-Former in) and bf16 (the module cast to bf16). Each provider's output is
compared in the same run with a float64 evaluation (``rel_err``).

``--quick``: a tiny Q-Former (64 wide, 2 layers, 16 queries x 50 keys), batch 1 and 2, 3 repetitions: checks that
the harness runs (the CPU default, and FASTVLM_BENCH_TINY's). Rows are appended to ``--out`` as they are measured; a
provider that cannot run records why (``skipped`` or ``error``). On CPU the numbers time PyTorch paths, never fastvlm's kernels.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from fastvlm.bench import harness

BATCHES = [1, 8, 64]
QF_PROVIDERS = ["hf_eager", "hf_sdpa", "hf_compile_max_autotune", "fastvlm", "fastvlm_bf16"]
ATTN_PROVIDERS = ["sdpa", "flash_attn", "xformers", "fastvlm"]
FULL = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            encoder_hidden_size=1408, cross_attention_frequency=2)
QUICK = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
             encoder_hidden_size=48, cross_attention_frequency=2)


def build_qformer(cfg_kw, attn, device, dtype):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    cfg = Blip2QFormerConfig(**cfg_kw)
    cfg._attn_implementation = attn
    return Blip2QFormerModel(cfg).eval().to(device=device, dtype=dtype)


def qformer_flops(cfg_kw, B, nq, nk):
    H, I, E, L = cfg_kw["hidden_size"], cfg_kw["intermediate_size"], cfg_kw["encoder_hidden_size"], \
        cfg_kw["num_hidden_layers"]
    n_cross = len(range(0, L, cfg_kw["cross_attention_frequency"]))
    M = B * nq
    per_layer = 2 * M * H * 3 * H + 4 * B * nq * nq * H + 2 * M * H * H + 2 * M * H * I * 2
    cross = 2 * M * H * H + 2 * B * nk * E * 2 * H + 4 * B * nq * nk * H + 2 * M * H * H
    return L * per_layer + n_cross * cross


def _param_bytes(m, elem):
    return elem * sum(p.numel() for p in m.parameters())


def _qformer_provider(name, m_eager, m_sdpa):
    import fastvlm

    if name == "hf_eager":
        return m_eager
    if name == "hf_sdpa":
        return m_sdpa
    if name == "hf_compile_max_autotune":
        return harness.compile_module(m_sdpa, "max-autotune")
    fused = fastvlm.nn.from_module(m_sdpa)
    fused.fastvlm_compute_dtype = torch.bfloat16 if name == "fastvlm_bf16" else None
    return fused


def _attn_provider(name):
    if name == "sdpa":
        import torch.nn.functional as F

        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "flash_attn":
        from flash_attn import flash_attn_func  # noqa: F401 (ImportError -> skipped)

        return lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    if name == "xformers":
        import xformers.ops as xops

        return lambda q, k, v: xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2))
    if name == "fastvlm":
        from fastvlm.ops.attention import attention

        return lambda q, k, v: attention(q, k, v)
    raise KeyError(name)


def _row(suite, shape, prov, dtype, med, p20, p80, flops, min_bytes, eager_ms, err, env):
    cols = harness.roofline(flops, min_bytes, dtype)
    row = dict(suite=suite, shape=shape, mode="fwd", provider=prov, dtype=str(dtype).replace("torch.", ""),
               flops=flops, min_bytes=min_bytes, **cols, **env)
    if isinstance(med, Exception):  # a provider that cannot run here: the reason instead of a time
        return dict(row, ms=None, **({"skipped": str(med)} if isinstance(med, harness.Skipped)
                                     else {"error": harness.error_text(med)}))
    return dict(row, **harness.timing_cols(med, p20, p80, flops, cols["roofline_ms"], eager_ms), rel_err=err)


def run_qformer(batches, providers, dtypes, quick, reps, device, env, rec):
    cfg_kw = QUICK if quick else FULL
    nq, nk = (16, 50) if quick else (32, 257)
    if harness.only_skipped_compiles(providers, ("hf_compile_max_autotune",)):  # no model is built
        return [rec.add(_row("qformer", f"blip2-qformer{'-quick' if quick else ''}@{B} {str(dt)[6:]}", p, dt,
                             harness.Skipped(harness.COMPILE_ON_CPU), 0, 0, 0, 0, None, None, env))
                for dt in dtypes for B in batches for p in providers]
    for dtype in dtypes:
        m_eager = build_qformer(cfg_kw, "eager", device, dtype)
        m_sdpa = build_qformer(cfg_kw, "sdpa", device, dtype)
        m64 = build_qformer(cfg_kw, "eager", device, torch.float64)
        for B in batches:
            q = torch.randn(B, nq, cfg_kw["hidden_size"], device=device)
            e = torch.randn(B, nk, cfg_kw["encoder_hidden_size"], device=device)
            with torch.no_grad():
                ref = m64(query_embeds=q.double(), encoder_hidden_states=e.double()).last_hidden_state
            q, e = q.to(dtype), e.to(dtype)
            flops = qformer_flops(cfg_kw, B, nq, nk)
            elem = torch.finfo(dtype).bits // 8
            min_bytes = _param_bytes(m_sdpa, elem) + elem * (e.numel() + 2 * q.numel())
            eager_ms = None
            shape = f"blip2-qformer{'-quick' if quick else ''}@{B} {str(dtype)[6:]}"
            for prov in providers:
                if prov == "fastvlm_bf16" and dtype != torch.float32:
                    continue
                try:
                    mod = _qformer_provider(prov, m_eager, m_sdpa)

                    def fn():
                        with torch.no_grad():
                            return mod(query_embeds=q, encoder_hidden_states=e).last_hidden_state

                    out = fn()
                    err = harness_rel_err(out, ref)
                    med, p20, p80 = harness.measure(fn, warmup=2 if device == "cpu" else 10, reps=reps,
                                                    device=device)
                except Exception as exc:  # a provider that cannot run here (e.g. compile without a compiler)
                    rec.add(_row("qformer", shape, prov, dtype, exc, 0, 0, flops, min_bytes, None, None, env))
                    continue
                if prov == "hf_eager":
                    eager_ms = med
                rec.add(_row("qformer", shape, prov, dtype, med, p20, p80, flops, min_bytes, eager_ms, err, env))
    return rec.rows


def harness_rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def run_attention(batches, providers, dtypes, quick, reps, device, env, rec):
    H, D = (2, 32) if quick else (12, 64)
    nq, nk = (16, 50) if quick else (32, 257)
    for dtype in dtypes:
        for B in batches:
            q = torch.randn(B, H, nq, D, device=device, dtype=dtype)
            k = torch.randn(B, H, nk, D, device=device, dtype=dtype)
            v = torch.randn(B, H, nk, D, device=device, dtype=dtype)
            ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) * D ** -0.5, -1) @ v.double()
            flops = 4 * B * H * nq * nk * D
            elem = torch.finfo(dtype).bits // 8
            min_bytes = elem * (q.numel() * 2 + k.numel() + v.numel())
            shape = f"attn {nq}x{nk} h{H} d{D}@{B} {str(dtype)[6:]}"
            eager_ms = None
            for prov in providers:
                try:
                    if prov in ("flash_attn", "xformers") and (device != "cuda" or dtype == torch.float32):
                        raise harness.Skipped("16-bit CUDA only")
                    try:
                        f = _attn_provider(prov)
                    except ImportError as exc:
                        raise harness.Skipped(f"not installed ({exc})") from exc
                    out = f(q, k, v)
                    if prov in ("flash_attn", "xformers"):
                        out = out.transpose(1, 2)  # [B, L, H, D] -> [B, H, L, D]
                    elif prov == "fastvlm":
                        out = out.transpose(1, 2)
                    err = harness_rel_err(out, ref)
                    med, p20, p80 = harness.measure(lambda: f(q, k, v), warmup=2 if device == "cpu" else 10,
                                                    reps=reps, device=device)
                except Exception as exc:
                    rec.add(_row("attention", shape, prov, dtype, exc, 0, 0, flops, min_bytes, None, None, env))
                    continue
                if prov == "sdpa":
                    eager_ms = med
                rec.add(_row("attention", shape, prov, dtype, med, p20, p80, flops, min_bytes, eager_ms, err, env))
    return rec.rows


def run(suites=("qformer", "attention"), batches=None, providers=None, dtypes=None, quick=None, reps=None, out=None,
        csv_path=None, verbose=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if quick is None:
        quick = device == "cpu" or harness.tiny()
    if device == "cpu" and verbose:
        print("No CUDA device: timing PyTorch paths on the CPU. These numbers show the harness runs; they are not a "
              "measurement of fastvlm's kernels.")
    batches = batches or ([1, 2] if quick else BATCHES)
    dtypes = dtypes or [torch.float32, torch.bfloat16]
    reps = reps or (3 if quick else 30)
    rec = harness.Recorder(out, echo=harness.format_row if verbose else None)
    if verbose:
        print(harness.header())
    if "qformer" in suites:
        provs = providers or [p for p in QF_PROVIDERS if not (device == "cpu" and p == "hf_compile_max_autotune")]
        run_qformer(batches, [p for p in provs if p in QF_PROVIDERS], dtypes, quick, reps, device, env, rec)
    if "attention" in suites:
        provs = providers or ATTN_PROVIDERS
        run_attention(batches, [p for p in ATTN_PROVIDERS if p in provs], dtypes, quick, reps, device, env, rec)
    rows = rec.rows
    if verbose:
        harness.print_footer(env, rows)
    if csv_path:
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as f:
            keys = list(dict.fromkeys(k for r in rows for k in r)) or ["suite"]
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_qformer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="*", default=["qformer", "attention"], choices=["qformer", "attention"])
    ap.add_argument("--batches", nargs="*", type=int)
    ap.add_argument("--providers", nargs="*", choices=list(dict.fromkeys(QF_PROVIDERS + ATTN_PROVIDERS)))
    ap.add_argument("--dtypes", nargs="*", choices=["float32", "bfloat16"])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=None, help="tiny Q-Former (the CPU default)")
    size.add_argument("--full", dest="quick", action="store_false", help="BLIP-2 size even on CPU")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    ap.add_argument("--csv", help="append result rows (CSV) to this file")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    run(args.suites, args.batches, args.providers, [getattr(torch, d) for d in args.dtypes] if args.dtypes else None,
        args.quick, args.reps, args.out, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
