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
Providers (run in the order given): hf_eager (the transformers module), fastvlm, hf_compile (torch.compile default)
and hf_compile_max_autotune (the baseline issue 2's target names). A provider that fails records its error and the
others still run. Modes: "fwd" (inference, no_grad) and "fwd+bwd" (stage-1 alignment: every projector parameter
trains, the vision features do not). Each provider's forward output is compared, in the same run, with the module
evaluated in fp32 (``rel_err``); in fwd+bwd also every parameter's gradient (``grad_rel_err``, the worst parameter).
Rows are appended to ``--out`` as they are measured. ``FASTVLM_BENCH_TINY=1``: each shape's family at tiny sizes.
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
PROVIDERS = ["hf_eager", "fastvlm", "hf_compile", "hf_compile_max_autotune"]
# on request only: the fused module with its dense GEMMs kept on the pointer kernel (FASTVLM_GEMM_CORE=pointer while
# its calls are planned), beside "fastvlm" (the TMA core on sm_90): the two GEMM cores side by side
EXTRA_PROVIDERS = ["fastvlm_pointer_core"]
MODES = ["fwd", "fwd+bwd"]


def build(shape, device, dtype):
    """(module, inputs (a tuple), flops_fwd, flops_fwd_bwd, min_bytes) for a shape id (inputs drawn on ``device``)."""
    import transformers

    name, _, arg = shape.partition("@")
    gemms = None  # [(M, K, N), ...] of the GEMM chain when it is not Linear-act-Linear with (M, K, I, O)
    extra = ()
    if name == "llava-1.5-7b":
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        m = LlavaMultiModalProjector(transformers.LlavaConfig())
        x = torch.randn(int(arg), 576, 1024, device=device)
        M, K, I, O = int(arg) * 576, 1024, 4096, 4096
    elif name == "qwen2-vl-7b":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

        m = PatchMerger(dim=3584, context_dim=1280)
        x = torch.randn(int(arg), 1280, device=device)
        M, K, I, O = int(arg) // 4, 5120, 5120, 3584
    elif name == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

        cfg = transformers.InternVLConfig(vision_config=dict(model_type="internvl_vision", hidden_size=1024,
                                                             num_attention_heads=16, intermediate_size=4096),
                                          text_config=dict(model_type="qwen2", hidden_size=3584, num_attention_heads=28,
                                                           num_key_value_heads=4, intermediate_size=18944))
        m = InternVLMultiModalProjector(cfg)
        b, t = (int(v) for v in arg.split("x"))
        x = torch.randn(b, t, 4096, device=device)
        M, K, I, O = b * t, 4096, 3584, 3584
    elif name == "internvl-shuffle":
        m, _, *_ = build("internvl@1x256", device, torch.float32)
        m = InternVLShuffleEager(m)
        x = torch.randn(int(arg), 1024, 1024, device=device)
        M, K, I, O = int(arg) * 256, 4096, 3584, 3584
    elif name == "gemma3-4b":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

        m = Gemma3MultiModalProjector(transformers.Gemma3Config(
            vision_config=dict(_SIGLIP_SO400M, image_size=896),
            text_config=_text("gemma3_text", 2560, 8, 4, head_dim=256), mm_tokens_per_image=256))
        x = torch.randn(int(arg), 4096, 1152, device=device)
        gemms = [(int(arg) * 256, 1152, 2560)]
    elif name == "idefics3-8b":
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        m = Idefics3Connector(transformers.Idefics3Config(
            vision_config=dict(_SIGLIP_SO400M, model_type="idefics3_vision", image_size=364),
            text_config=_text("llama", 4096, 32, 8), scale_factor=2))
        x = torch.randn(int(arg), 676, 1152, device=device)
        gemms = [(int(arg) * 169, 4608, 4096)]
    elif name == "mistral-small-3.1":
        from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

        side = int(round(int(arg) ** 0.5))
        m = Mistral3MultiModalProjector(transformers.Mistral3Config(
            vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=64, num_attention_heads=16,
                               num_hidden_layers=1, patch_size=14, image_size=14 * side, head_dim=64),
            text_config=_text("mistral", 5120, 32, 8, head_dim=128), spatial_merge_size=2))
        x = torch.randn(side * side, 1024, device=device)
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
        return harness.compile_module(m)
    if name == "hf_compile_max_autotune":
        return harness.compile_module(m, "max-autotune")
    if name == "fastvlm":
        if isinstance(m, InternVLShuffleEager):
            return fastvlm.nn.InternVLShuffleProjector.from_projector(m.projector, 0.5)
        return fastvlm.nn.from_module(m)
    if name == "fastvlm_pointer_core":
        return _PointerCore(fastvlm.nn.from_module(m))
    raise KeyError(name)


class _PointerCore:
    """Calls ``fused`` with FASTVLM_GEMM_CORE=pointer on its first call, when its GEMM calls are planned (the fused
    module's call sites keep their plans; fused_linear's shared plans are cleared before and after, so neither this
    provider nor the next one reuses the other core's)."""

    def __init__(self, fused):
        self.fused, self.first = fused, True

    def __call__(self, *xs):
        if not self.first:
            return self.fused(*xs)
        import os

        from fastvlm.kernels import gemm

        old = os.environ.get("FASTVLM_GEMM_CORE")
        os.environ["FASTVLM_GEMM_CORE"] = "pointer"
        gemm._CALLS.clear()
        try:
            return self.fused(*xs)
        finally:
            self.first = False
            gemm._CALLS.clear()
            if old is None:
                del os.environ["FASTVLM_GEMM_CORE"]
            else:
                os.environ["FASTVLM_GEMM_CORE"] = old


# FASTVLM_BENCH_TINY: each shape's module family at fastvlm.testing's tiny sizes (same classes, same code paths)
_TINY = {"llava-1.5-7b": "llava", "qwen2-vl-7b": "qwen2_vl", "internvl": "internvl", "internvl-shuffle": "internvl",
         "gemma3-4b": "gemma3", "idefics3-8b": "idefics3", "mistral-small-3.1": "mistral3"}


def build_tiny(shape, device, dtype):
    """``build``'s tuple for the tiny instance of ``shape``'s family (FLOPs counted over its Linear layers)."""
    from fastvlm import testing

    name = shape.partition("@")[0]
    if name not in _TINY:
        raise KeyError(f"unknown shape {shape!r}; choose from {SHAPES}")
    m = testing.build(_TINY[name])
    xs = testing.args_for(_TINY[name], m)
    if name == "internvl-shuffle":
        m, xs = InternVLShuffleEager(m), (torch.randn(2, 16, m.linear_1.in_features // 4),)
    with torch.no_grad():
        out = m(*xs)
    rows = out.numel() // out.shape[-1]
    lin = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
    flops = sum(2 * rows * mod.in_features * mod.out_features for mod in lin)
    elem = torch.finfo(dtype).bits // 8
    min_bytes = elem * (sum(a.numel() for a in xs) + sum(p.numel() for p in m.parameters()) + out.numel())
    xs = tuple(a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device) for a in xs)
    return m.to(device=device, dtype=dtype).eval(), xs, flops, 3 * flops - flops // max(1, len(lin)), min_bytes


def _float_ref(m, xs, mode, gy):
    """The module evaluated in fp32 (a copy): its output and, for fwd+bwd, its parameter gradients for ``gy``."""
    import copy

    ref_m = copy.deepcopy(m).float()
    fx = [a.float() if a.is_floating_point() else a for a in xs]
    if mode == "fwd":
        with torch.no_grad():
            return ref_m(*fx), None
    for p in ref_m.parameters():
        p.requires_grad_(True)
    out = ref_m(*fx)
    out.backward(gy.float())
    return out.detach(), harness.grads_of(ref_m.parameters())


def _one(prov, m, xs, mode, gy, ref, ref_grads, device):
    """(timing fn, output rel err, gradient rel err or None) of one provider."""
    mod = _provider(prov, m)
    params = list(m.parameters())  # every provider trains m's parameters (shared by the fused module)
    for p in params:
        p.requires_grad_(mode != "fwd")
        p.grad = None
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return mod(*xs)
        return fn, harness.rel_err(fn(), ref), None

    def fn():
        mod(*xs).backward(gy)
    out = mod(*xs)
    err = harness.rel_err(out, ref)
    out.backward(gy)
    gerr = harness.grad_rel_err(harness.grads_of(params), ref_grads)
    return fn, err, gerr


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
    rec = harness.Recorder(out, echo=harness.format_row if verbose else None)
    if verbose:
        print(harness.header())
    if harness.only_skipped_compiles(providers, ("hf_compile", "hf_compile_max_autotune")):
        for shape, mode, prov in ((s, md, p) for s in shapes for md in modes for p in providers):
            rec.add(dict(suite="projector", shape=shape, mode=mode, provider=prov, dtype=str(dtype), ms=None,
                         skipped=harness.COMPILE_ON_CPU, **env))
        return rec.rows  # nothing to time here: no model is built
    for shape in shapes:
        m, xs, f_fwd, f_train, min_bytes = (build_tiny if harness.tiny() else build)(shape, device, dtype)
        harness.time_modes(
            rec, m, xs, base=dict(suite="projector", shape=shape, **env), modes=modes, providers=providers,
            flops=(f_fwd, f_train), min_bytes=min_bytes, dtype=dtype,
            float_ref=lambda mode, gy: _float_ref(m, xs, mode, gy),
            one=lambda prov, mode, gy, ref, rg: _one(prov, m, xs, mode, gy, ref, rg, device),
            warmup=3 if device == "cpu" else 10, reps=reps, device=device)
        m = xs = None  # release before the next shape
    if verbose:
        harness.print_footer(env, rec.rows, out)
    return rec.rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fastvlm bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"default: all on GPU, llava-1.5-7b@1 on CPU. Choices: {SHAPES}")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS + EXTRA_PROVIDERS)
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
