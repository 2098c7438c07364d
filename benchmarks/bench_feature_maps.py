"""Feature-map connector benchmark: eager PyTorch, torch.compile (default, max-autotune) and fastvlm.

Shapes (random weights; the map is the vision tower's output, the timed call starts from it):
    convnext-l@B        ConvNeXt-L stage-4 map [B, 1536, 24, 24] -> flatten (576 tokens) -> 1536 -> 4096 -> 4096
    convnext-l-pool2@B  the same map, 2x2 average pool (144 tokens) -> 1536 -> 4096 -> 4096
    fastvlm-7b@B        transformers' FastVlmMultiModalProjector on FastViTHD's map [B, 3072, 16, 16] as fast_vlm
                        feeds it (``map.flatten(2).permute(0, 2, 1)``) -> 3584 -> 3584
    ldpv2@B             LDPv2Projector (MobileVLM V2 1.7B): [B, 576, 1024] -> 2048, 2x2 pool, depthwise PEG
    cabstractor@B       C-Abstractor (Honeybee): [B, 576, 1024], 3 + 3 ResNet blocks at 1024, 144 queries -> 4096
B in 1, 8, 64 (the GPU default). Providers: ``eager`` (permute + flatten + Linear / avg_pool2d + Linear, or the
reference module), ``compile`` (torch.compile default), ``compile_max_autotune``, ``fastvlm``. Modes: ``fwd``
(no_grad) and ``fwd+bwd`` (every connector parameter trains, the map does not).

    python benchmarks/bench_feature_maps.py --out benchmarks/results/feature_maps_<device>.jsonl --csv x.csv
    python benchmarks/bench_feature_maps.py --quick    # CPU smoke run: tiny shapes, eager vs fastvlm, 3 reps

Each row's output is compared in the same run with the fp32 eager result (rel err column); in fwd+bwd every
parameter's gradient with the fp32 module's (grad err). Rows are appended to ``--out`` as they are measured. On a CPU the PyTorch
paths are timed: the numbers show the harness works, not kernel speed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvlm.bench import harness

KINDS = ["convnext-l", "convnext-l-pool2", "fastvlm-7b", "ldpv2", "cabstractor"]
BATCHES = [1, 8, 64]
PROVIDERS = ["eager", "compile", "compile_max_autotune", "fastvlm"]
MODES = ["fwd", "fwd+bwd"]


class EagerMapMLP(nn.Module):
    """The eager glue + LLaVA-style MLP: avg_pool2d (optional) -> flatten(2).transpose(1, 2) -> Linear-GELU-Linear."""

    def __init__(self, c, hidden, out, pool):
        super().__init__()
        self.pool = pool
        self.linear_1, self.act, self.linear_2 = nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, out)

    def forward(self, m):
        if self.pool > 1:
            m = F.avg_pool2d(m, self.pool)
        return self.linear_2(self.act(self.linear_1(m.flatten(2).transpose(1, 2))))


class FastVlmGlue(nn.Module):
    """transformers' fast_vlm get_image_features glue around its projector (the timed call starts at the map)."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, m):
        return self.proj(m.flatten(2).permute(0, 2, 1))


def _dims(kind, quick):
    """(C, side, hidden, out, pool) of the map connectors, scaled down with --quick."""
    full = {"convnext-l": (1536, 24, 4096, 4096, 1), "convnext-l-pool2": (1536, 24, 4096, 4096, 2),
            "fastvlm-7b": (3072, 16, 3584, 3584, 1)}
    small = {"convnext-l": (96, 12, 128, 128, 1), "convnext-l-pool2": (96, 12, 128, 128, 2),
             "fastvlm-7b": (192, 8, 112, 112, 1)}
    return (small if quick else full)[kind]


def build(kind, batch, quick=False):
    """(eager module, fastvlm module, input, flops_fwd, flops_train, min_bytes), fp32 on the CPU."""
    import fastvlm
    from fastvlm.nn.feature_map import FeatureMapProjector
    from fastvlm.reference.feature_map import CAbstractor, LDPv2Projector

    if kind in ("convnext-l", "convnext-l-pool2"):
        C, side, I, O, pool = _dims(kind, quick)
        m = EagerMapMLP(C, I, O, pool)
        fast = FeatureMapProjector.from_projector(m, pool=pool)
        x = torch.randn(batch, C, side, side)
        M, K = batch * (side // pool) ** 2, C
    elif kind == "fastvlm-7b":
        import transformers
        from transformers.models.fast_vlm.modeling_fast_vlm import FastVlmMultiModalProjector

        C, side, I, O, _ = _dims(kind, quick)
        cfg = transformers.FastVlmConfig(text_config=dict(model_type="qwen2", hidden_size=I, num_attention_heads=4,
                                                          num_key_value_heads=4, intermediate_size=2 * I))
        cfg.vision_config.hidden_size = C
        proj = FastVlmMultiModalProjector(cfg)
        m, fast = FastVlmGlue(proj), FastVlmGlue(fastvlm.nn.from_module(proj))
        x = torch.randn(batch, C, side, side)
        M, K = batch * side * side, C
    elif kind == "ldpv2":
        C, O, L, Q = (64, 96, 144, 36) if quick else (1024, 2048, 576, 144)
        m = LDPv2Projector(C, O, Q)
        fast = fastvlm.nn.from_module(m)
        x = torch.randn(batch, L, C)
        # linear_1 over L tokens, linear_2 over L (eager) tokens; the depthwise conv is negligible
        M, K, I = batch * L, C, O
    elif kind == "cabstractor":
        C, H, O, L, Q = (32, 32, 64, 36, 9) if quick else (1024, 1024, 4096, 576, 144)
        m = CAbstractor(C, H, O, num_input_tokens=L, num_queries=Q, depth=3)
        fast = fastvlm.nn.from_module(m)
        x = torch.randn(batch, L, C)
        M, K, I = batch * Q, H, O  # the readout only; the ResNet stages dominate and run on cuDNN for every provider
    else:
        raise KeyError(f"unknown kind {kind!r}; choose from {KINDS}")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    flops = 2 * M * (K * I + I * O)
    params = sum(p.numel() for p in m.parameters())
    return m.eval(), fast.eval(), x, flops, 3 * flops, (x.numel() + params + M * O)


def _provider(name, m, fast):
    if name == "eager":
        return m
    if name == "compile":
        return torch.compile(m)
    if name == "compile_max_autotune":
        return torch.compile(m, mode="max-autotune")
    if name == "fastvlm":
        return fast
    raise KeyError(name)


def run(kinds, batches, providers, modes, dtype, reps, quick=False, out=None, csv_path=None, verbose=True):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if device == "cpu" and verbose:
        print("No CUDA device: timing the CPU path (PyTorch ops on the CPU). These numbers show the harness runs; "
              "they are not a measurement of fastvlm's kernels.")
    rec = harness.Recorder(out)
    rows = rec.rows
    elem = torch.finfo(dtype).bits // 8
    for kind in kinds:
        for batch in batches:
            m, fast, x, f_fwd, f_train, n_elems = build(kind, batch, quick)
            ref_m, x32 = copy.deepcopy(m), x  # the fp32 CPU module: output and gradient reference
            with torch.no_grad():
                ref = m(x)
            m.to(device=device, dtype=dtype)  # fast shares m's parameters (from_module / from_projector)
            x = x.to(device=device, dtype=dtype)
            shape = f"{kind}@{batch}"
            for mode in modes:
                eager_ms = ref_grads = None
                if mode != "fwd":
                    gy = torch.randn(ref.shape, device=device, dtype=dtype) * 0.01
                    for p in ref_m.parameters():
                        p.grad = None
                    ref_m(x32).backward(gy.float().cpu())
                    ref_grads = harness.grads_of(ref_m.parameters())
                for prov in providers:
                    mod = _provider(prov, m, fast)
                    gerr = None
                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                return mod(x)
                        flops = f_fwd
                    else:
                        for p in m.parameters():
                            p.requires_grad_(True)
                            p.grad = None
                        mod(x).backward(gy)  # every parameter's gradient against the fp32 module's
                        gerr = harness.grad_rel_err(harness.grads_of(m.parameters()), ref_grads)

                        def fn():
                            mod(x).backward(gy)
                        flops = f_train
                    with torch.no_grad():
                        got = mod(x)
                    err = harness.rel_err(got, ref)
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    med, p20, p80 = harness.measure(fn, warmup=2 if device == "cpu" else 10, reps=reps, device=device)
                    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
                    if prov == "eager":
                        eager_ms = med
                    bound = harness.roofline_ms(flops, elem * n_elems * (1 if mode == "fwd" else 3), dtype)
                    rec.add(dict(suite="feature_maps", shape=shape, mode=mode, provider=prov, dtype=str(dtype),
                                 ms=med, p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9, roofline_ms=bound,
                                 roofline_fraction=bound / med,
                                 speedup_vs_eager=(eager_ms / med) if eager_ms else float("nan"), rel_err=err,
                                 grad_rel_err=gerr, peak_mem_bytes=peak, quick=quick, **env))
                    for p in m.parameters():
                        p.grad = None
                        p.requires_grad_(False)
            if device == "cuda":
                torch.cuda.empty_cache()
    if verbose:
        harness.print_footer(env, rows, table=harness.format_rows)
    if csv_path:
        new = not os.path.exists(csv_path)
        os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="*", choices=KINDS)
    ap.add_argument("--batches", nargs="*", type=int)
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS)
    ap.add_argument("--modes", nargs="*", choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, batch 1 and 8, eager vs fastvlm, 3 reps (CPU)")
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    ap.add_argument("--csv", help="append result rows to this CSV file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="fastvlm")
    cpu = not torch.cuda.is_available()
    quick = args.quick or harness.tiny()
    dtype = getattr(torch, args.dtype)
    if cpu:
        dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    run(args.kinds or KINDS, args.batches or ([1, 8] if quick else ([1] if cpu else BATCHES)),
        args.providers or (["eager", "fastvlm"] if quick or cpu else PROVIDERS),
        args.modes or MODES, dtype, args.reps or (3 if quick or cpu else 30), quick, args.out, args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
