"""Idefics2 connector microbenchmark: transformers' ``Idefics2Connector`` (eager attention, SDPA, torch.compile
max-autotune) vs ``FusedIdefics2Connector``.

Shapes (random weights at Idefics2-8B's sizes, built from config classes, no download):
    idefics2-8b@PxB   SwiGLU modality projection 1152 -> 14336 -> 4096, then the Perceiver (64 latents, depth 3,
                      16 heads x 96, 4 kv heads, MLP 16384) over P context tokens per image, B images:
                      P = 729 (384 px) for B in 1, 8, 64; P = 4900 (980 px) for B in 1, 8
    tiny@PxB          (``--quick``) a small config that runs on a CPU in seconds
With B > 1 the last image's patches are a third padding (the patch mask), as in a batch of differently sized images.
Modes: "fwd" (no_grad) and "fwd+bwd" (connector training: every connector parameter trains, the vision features do
not). Each provider's output is compared, in the same run, with the module evaluated in fp32 with eager attention
(``rel_err``); in fwd+bwd every parameter's gradient too (``grad_rel_err``, the worst parameter). Rows are appended to
``--out`` as measured; a provider that fails records its error. ``FASTVLM_BENCH_TINY=1``: tiny sizes, same names.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fastvlm.bench import harness

SHAPES = ["idefics2-8b@729x1", "idefics2-8b@729x8", "idefics2-8b@729x64", "idefics2-8b@4900x1", "idefics2-8b@4900x8"]
QUICK_SHAPES = ["tiny@49x1", "tiny@49x4"]
PROVIDERS = ["hf_eager", "hf_sdpa", "hf_compile_max_autotune", "fastvlm"]
MODES = ["fwd", "fwd+bwd"]

_8B = dict(vision=1152, inter=14336, hidden=4096, latents=64, depth=3, heads=16, head_dim=96, kv_heads=4)
_TINY = dict(vision=32, inter=96, hidden=64, latents=8, depth=2, heads=4, head_dim=24, kv_heads=2)


def build(shape, device, dtype):
    """(connector, x, mask, flops_fwd, flops_fwd_bwd, min_bytes) for a shape id."""
    from transformers import Idefics2Config
    from transformers.models.idefics2.modeling_idefics2 import Idefics2Connector

    name, _, arg = shape.partition("@")
    if name not in ("idefics2-8b", "tiny"):
        raise KeyError(f"unknown shape {shape!r}; choose from {SHAPES + QUICK_SHAPES}")
    c = _8B if name == "idefics2-8b" else _TINY
    P, B = (int(v) for v in arg.split("x"))
    if harness.tiny():  # FASTVLM_BENCH_TINY: the shape keeps its name, the sizes are tiny's
        c, P, B = _TINY, 49, min(B, 2)
    cfg = Idefics2Config(
        perceiver_config=dict(hidden_size=c["hidden"], resampler_n_latents=c["latents"],
                              resampler_depth=c["depth"], resampler_n_heads=c["heads"],
                              resampler_head_dim=c["head_dim"], num_key_value_heads=c["kv_heads"]),
        text_config=dict(model_type="mistral", hidden_size=c["hidden"], intermediate_size=c["inter"]),
        vision_config=dict(hidden_size=c["vision"]))
    with torch.device("meta"):
        m = Idefics2Connector(cfg)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or "layernorm" in n:
                p.fill_(1.0)
            elif n.endswith("latents"):
                p.normal_()
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    m = m.to(dtype).eval()
    x = torch.randn(B, P, c["vision"], device=device, dtype=dtype)
    mask = torch.ones(B, P, dtype=torch.bool, device=device)
    if B > 1:
        mask[-1, P - P // 3:] = False
    H, n, d, kv = c["hidden"], c["latents"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    proj = 2 * B * P * (2 * c["vision"] * c["inter"] + c["inter"] * H)
    layer = 2 * B * (n * H * d + (P + n) * H * kv * 2 + 2 * n * (P + n) * d + n * d * H + 3 * n * H * 4 * H)
    flops_fwd = proj + c["depth"] * layer
    flops_fwd_bwd = 3 * flops_fwd - 2 * B * P * c["vision"] * c["inter"] * 2  # no dx of the frozen vision features
    elem = torch.finfo(dtype).bits // 8
    params = sum(p.numel() for p in m.parameters())
    min_bytes = elem * (params + x.numel() + B * n * H)
    return m, x, mask, flops_fwd, flops_fwd_bwd, min_bytes


def _set_attn(m, impl):
    m.perceiver_resampler.config._attn_implementation = impl


def _provider(name, m):
    import fastvlm

    if name == "hf_eager":
        _set_attn(m, "eager")
        return m
    _set_attn(m, "sdpa")
    if name == "hf_sdpa":
        return m
    if name == "hf_compile_max_autotune":
        return harness.compile_module(m, "max-autotune")
    if name == "fastvlm":
        return fastvlm.nn.from_module(m)
    raise KeyError(name)


def _float_ref(m, x, mask, mode, gy):
    """The connector in fp32 with eager attention (a copy): output, and for fwd+bwd every parameter's gradient."""
    import copy

    ref_m = copy.deepcopy(m).float()
    _set_attn(ref_m, "eager")
    if mode == "fwd":
        with torch.no_grad():
            return ref_m(x.float(), mask), None
    for p in ref_m.parameters():
        p.requires_grad_(True)
    out = ref_m(x.float(), mask)
    out.backward(gy.float())
    return out.detach(), harness.grads_of(ref_m.parameters())


def _one(prov, m, x, mask, mode, gy, ref, ref_grads):
    """(timing fn, output rel err, gradient rel err or None) of one provider."""
    mod = _provider(prov, m)
    params = list(m.parameters())  # shared by the fused connector
    for p in params:
        p.requires_grad_(mode != "fwd")
        p.grad = None
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return mod(x, mask)
        return fn, harness.rel_err(fn(), ref), None

    def fn():
        mod(x, mask).backward(gy)
    out = mod(x, mask)
    err = harness.rel_err(out, ref)
    out.backward(gy)
    return fn, err, harness.grad_rel_err(harness.grads_of(params), ref_grads)


def run(shapes=None, providers=None, modes=None, dtype=torch.bfloat16, reps=None, out=None, quick=False,
        verbose=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if quick:
        shapes = shapes or QUICK_SHAPES
        providers = providers or ["hf_eager", "hf_sdpa", "fastvlm"]
        reps = reps or 5
    if device == "cpu":
        shapes = shapes or QUICK_SHAPES
        providers = providers or ["hf_eager", "hf_sdpa", "fastvlm"]
        dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        reps = reps or 3
        if verbose:
            print("No CUDA device: timing the CPU path (PyTorch ops on the CPU). These numbers show the harness runs; "
                  "they are not a measurement of fastvlm's kernels.")
    shapes, providers, modes, reps = shapes or SHAPES, providers or PROVIDERS, modes or MODES, reps or 20
    rec = harness.Recorder(out, echo=harness.format_row if verbose else None)
    if verbose:
        print(harness.header())
    for shape in shapes:
        m, x, mask, f_fwd, f_train, min_bytes = build(shape, device, dtype)
        harness.time_modes(
            rec, m, (x, mask), base=dict(suite="perceiver", shape=shape, **env), modes=modes, providers=providers,
            flops=(f_fwd, f_train), min_bytes=min_bytes, dtype=dtype,
            float_ref=lambda mode, gy: _float_ref(m, x, mask, mode, gy),
            one=lambda prov, mode, gy, ref, rg: _one(prov, m, x, mask, mode, gy, ref, rg),
            warmup=2 if device == "cpu" else 5, reps=reps, device=device)
        m = x = None  # release before the next shape
    if verbose:
        harness.print_footer(env, rec.rows, out)
    return rec.rows


def write_csv(rows, path):
    import csv

    keys = ["suite", "shape", "mode", "provider", "dtype", "ms", "p20_ms", "p80_ms", "tflops", "roofline_fraction",
            "speedup_vs_eager", "rel_err", "peak_mem_bytes", "device", "commit"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="bench_perceiver", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"default: all on GPU, the quick ones on CPU. Choices: "
                                                f"{SHAPES + QUICK_SHAPES}")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS)
    ap.add_argument("--modes", nargs="*", choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, eager / sdpa / fastvlm (runs on a CPU)")
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    ap.add_argument("--csv", help="also write the rows of this run as CSV")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    rows = run(args.shapes, args.providers, args.modes, getattr(torch, args.dtype), args.reps, args.out, args.quick)
    if args.csv:
        write_csv(rows, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
