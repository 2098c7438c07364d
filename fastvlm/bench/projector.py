"""Projector-family microbenchmark: transformers modules (eager, torch.compile default and max-autotune) vs fastvlm.

Shapes are real checkpoints' sizes (random weights, built from config classes):
    llava-1.5-7b@B     LlavaMultiModalProjector 1024 -> 4096 -> 4096, x [B, 576, 1024], B in 1, 8, 64
    qwen2-vl-7b@P      PatchMerger LN(1280), 2x2 merge, 5120 -> 5120 -> 3584, x [P, 1280], P in 1024, 16384
    internvl@7x256     InternVLMultiModalProjector LN(4096) -> 3584 -> 3584, x [7, 256, 4096]
    internvl-shuffle@7 InternVL3-8B: pixel shuffle 0.5 of 7 tiles of 32 x 32 x 1024 + that projector (eager: the
                       model's pixel_shuffle then the projector; fastvlm: InternVLShuffleProjector, one call)
    gemma3-4b@B        Gemma3MultiModalProjector: 4x4 average pool of a 64 x 64 x 1152 grid, RMSNorm(1 + w),
                       matmul 1152 -> 2560, x [B, 4096, 1152], B in 1, 8, 64
    idefics3-8b@17     Idefics3Connector: pixel shuffle 2 of 17 crops of 26 x 26 x 1152, Linear 4608 -> 4096
    mistral-small-3.1@12100  Mistral3MultiModalProjector: RMSNorm, 2x2 unfold merge of one 110 x 110 patch grid,
                       merging Linear 4096 -> 1024, then 1024 -> 5120 -> 5120
Modes: "fwd" (inference, no_grad) and "fwd+bwd" (stage-1 alignment: every projector parameter trains, the vision
features do not). Each provider's forward output is compared, in the same run, with the module evaluated in fp32.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fastvlm.bench import harness

SHAPES = ["llava-1.5-7b@1", "llava-1.5-7b@8", "llava-1.5-7b@64", "qwen2-vl-7b@1024", "qwen2-vl-7b@16384",
          "internvl@7x256", "internvl-shuffle@7", "gemma3-4b@1", "gemma3-4b@8", "gemma3-4b@64", "idefics3-8b@17",
          "mistral-small-3.1@12100"]


class InternVLShuffleEager(torch.nn.Module):
    """The eager baseline of ``fastvlm.nn.InternVLShuffleProjector``: InternVLModel's pixel_shuffle lines, then the
    projector (what get_image_features runs)."""

    def __init__(self, projector):
        super().__init__()
        self.projector = projector

    def forward(self, feats):
        from transformers.models.internvl.modeling_internvl import InternVLModel

        B, P, C = feats.shape
        side = int(P ** 0.5)
        shuffled = InternVLModel.pixel_shuffle(None, feats.reshape(B, side, side, C), scale_factor=0.5)
        return self.projector(shuffled.reshape(B, -1, 4 * C))


def _text(model_type, hidden, heads, kv, **kw):
    return dict(model_type=model_type, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
                intermediate_size=64, num_hidden_layers=1, vocab_size=100, **kw)


_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                      num_attention_heads=16, patch_size=14)
PROVIDERS = ["hf_eager", "hf_compile", "hf_compile_max_autotune", "fastvlm"]
MODES = ["fwd", "fwd+bwd"]


def build(shape, device, dtype):
    """(module, inputs (a tuple), flops_fwd, flops_fwd_bwd, min_bytes) for a shape id."""
    import transformers

    name, _, arg = shape.partition("@")
    gemms = None  # [(M, K, N), ...] of the GEMM chain when it is not Linear-act-Linear with (M, K, I, O)
    extra = ()
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
    elif name == "internvl-shuffle":
        m, _, *_ = build("internvl@1x256", "cpu", torch.float32)
        m = InternVLShuffleEager(m)
        x = torch.randn(int(arg), 1024, 1024)
        M, K, I, O = int(arg) * 256, 4096, 3584, 3584
    elif name == "gemma3-4b":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        m = Gemma3MultiModalProjector(transformers.Gemma3Config(
            vision_config=dict(_SIGLIP_SO400M, image_size=896),
            text_config=_text("gemma3_text", 2560, 8, 4, head_dim=256), mm_tokens_per_image=256))
        x = torch.randn(int(arg), 4096, 1152)
        gemms = [(int(arg) * 256, 1152, 2560)]
    elif name == "idefics3-8b":
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        m = Idefics3Connector(transformers.Idefics3Config(
            vision_config=dict(_SIGLIP_SO400M, model_type="idefics3_vision", image_size=364),
            text_config=_text("llama", 4096, 32, 8), scale_factor=2))
        x = torch.randn(int(arg), 676, 1152)
        gemms = [(int(arg) * 169, 4608, 4096)]
    elif name == "mistral-small-3.1":
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

        side = int(round(int(arg) ** 0.5))
        m = Mistral3MultiModalProjector(transformers.Mistral3Config(
            vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=64, num_attention_heads=16,
                               num_hidden_layers=1, patch_size=14, image_size=14 * side, head_dim=64),
            text_config=_text("mistral", 5120, 32, 8, head_dim=128), spatial_merge_size=2))
        x = torch.randn(side * side, 1024)
        extra = (torch.tensor([[14 * side, 14 * side]]),)
        merged = (side // 2) ** 2
        gemms = [(merged, 4096, 1024), (merged, 1024, 5120), (merged, 5120, 5120)]
    else:
        raise KeyError(f"unknown shape {shape!r}; choose from {SHAPES}")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    m = m.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype)
    if gemms is None:
        gemms = [(M, K, I), (M, I, O)]
    fl = [2 * mm * k * n for mm, k, n in gemms]
    flops_fwd = sum(fl)
    flops_fwd_bwd = 3 * flops_fwd - fl[0]  # + dW and dA of every GEMM, no dA of the first (frozen vision features)
    elem = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in m.parameters())
    min_bytes = elem * (x.numel() + weights + gemms[-1][0] * gemms[-1][2])
    return m, (x,) + tuple(e.to(device) for e in extra), flops_fwd, flops_fwd_bwd, min_bytes


def _provider(name, m):
    import fastvlm

    if name == "hf_eager":
        return m
    if name == "hf_compile":
        return torch.compile(m)
    if name == "hf_compile_max_autotune":
        return torch.compile(m, mode="max-autotune")
    if name == "fastvlm":
        if isinstance(m, InternVLShuffleEager):
            return fastvlm.nn.InternVLShuffleProjector.from_projector(m.projector, 0.5)
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
        m, xs, f_fwd, f_train, min_bytes = build(shape, device, dtype)
        with torch.no_grad():
            ref = m.float()(*[a.float() if a.is_floating_point() else a for a in xs])
            m.to(dtype)
        for mode in modes:
            eager_ms = None
            for prov in providers:
                mod = _provider(prov, m)
                if mode == "fwd":
                    def fn():
                        with torch.no_grad():
                            return mod(*xs)
                    flops = f_fwd
                else:
                    for p in m.parameters():
                        p.requires_grad_(True)
                    gy = torch.randn_like(ref, dtype=dtype) * 0.01

                    def fn():
                        mod(*xs).backward(gy)
                    flops = f_train
                with torch.no_grad():
                    out_check = mod(*xs)
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastvlm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"default: all on GPU, llava-1.5-7b@1 on CPU. Choices: {SHAPES}")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS)
    ap.add_argument("--modes", nargs="*", choices=MODES)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    ap.add_argument("--overhead", action="store_true",
                    help="host time per call of every fused module vs its original (fastvlm.bench.overhead; "
                         "`fastvlm bench --overhead --help` for its options)")
    if argv and "--overhead" in argv:
        from fastvlm.bench.overhead import main as overhead_main

        return overhead_main([a for a in argv if a != "--overhead"])
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    run(args.shapes, args.providers, args.modes, getattr(torch, args.dtype), args.reps, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
