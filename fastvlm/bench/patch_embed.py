"""Patch-embedding microbenchmark: the transformers modules in eager mode, the GEMM formulation, torch.compile and
fastvlm, forward, at real vision-tower sizes.

Shapes (``<model>@<batch>``, batch 1, 8 or 64 by default):
    clip-l-336        CLIP ViT-L/14 at 336 px (LLaVA-1.5): 577 tokens x 1024, class token, position table;
                      ``--prenorm`` adds ``pre_layrnorm`` (a CLIPVisionModel with no encoder layer, patched by
                      fastvlm.patch so the LayerNorm runs as the fused row-norm pass)
    siglip-so400m-384 SigLIP so400m/14 at 384 px: 729 tokens x 1152, conv bias, no class token
    idefics2-980      Idefics2's NaViT embeddings at 980 px, every second image padded to 490 x 700
                      (position ids bucketed from patch_attention_mask)
    qwen2-vl-rows     Qwen2-VL's Conv3d on pre-patchified rows: 1024 patches (448 px) per image x 1176 -> 1280, no
                      bias; the extra provider ``fastvlm_still`` reads one of the two repeated frames against the
                      time-summed kernel (the rows are built as the processor builds a still image's)
    pixtral-1024      Pixtral-12B's tower front (Mistral 3): PixtralVisionModel with no encoder layer, so conv, per-image
                      crop and concatenation, ln_pre (RMSNorm), rotary table and block mask; 1024 px images, every
                      second one 512 x 768 padded to 1024 x 1024 (``image_sizes``); fastvlm pairs conv and ln_pre
    qwen3-vl-rows     Qwen3-VL's patch embedding with its bilinear position table: 1024 patches (512 px) per image
                      x 1536 -> 1152 with bias, plus the 48 x 48 table resampled by 4 taps per patch (taps computed
                      once outside the timing, as they depend on the grid only)
Providers:
    eager             the transformers module(s) (Conv2d, flatten, cat, + positions [, LayerNorm])
    gemm              the GEMM formulation in PyTorch: the patches as a reshape/permute im2col, F.linear on the conv
                      weight viewed as [D, C*p*p], then the same glue
    compile           torch.compile(eager, mode="max-autotune") (CUDA only unless --compile-on-cpu)
    fastvlm           the fused module (Triton on CUDA; its PyTorch path elsewhere, and the row says so)
``--uint8``: the input is the processor's uint8 image; eager/gemm/compile normalise it first ((x / 255 - mean) / std,
the processor's math, on the device, then Idefics2's zero padding), fastvlm folds both into the GEMM's loads
(``image_hw``: pixels outside each image read as 0 after normalising).
Timing: harness.measure. TFLOP/s counts 2 * tokens * C*p*p * D; the roofline is max(FLOPs at the bf16 ceiling, pixel
+ weight + output bytes at the copy ceiling). Outputs are compared with eager's (rel err); rows are appended to
``--out`` as measured. ``--quick``: one shape, 3 repetitions; FASTVLM_BENCH_TINY=1: 4 x 4 patch grids, 64 wide.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
import torch.nn.functional as F

from fastvlm.bench import harness

MODELS = {
    # name: (family, hidden, image, patch)
    "clip-l-336": ("clip", 1024, 336, 14),
    "siglip-so400m-384": ("siglip", 1152, 384, 14),
    "idefics2-980": ("idefics2", 1152, 980, 14),
    "pixtral-1024": ("pixtral", 1024, 1024, 16),
    "qwen2-vl-rows": ("qwen2", 1280, 448, 14),
    "qwen3-vl-rows": ("qwen3", 1152, 512, 16),
}
BATCHES = (1, 8, 64)
PROVIDERS = ["eager", "gemm", "compile", "fastvlm", "fastvlm_still"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_shape(shape):
    name, _, batch = shape.partition("@")
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {list(MODELS)} (as name@batch)")
    return name, min(int(batch or 1), 2) if harness.tiny() else int(batch or 1)


def dims(name):
    """(family, hidden, image, patch) of a model; with FASTVLM_BENCH_TINY a 4 x 4 patch grid, 64 wide."""
    fam, hidden, image, patch = MODELS[name]
    return (fam, 64, 4 * patch, patch) if harness.tiny() else (fam, hidden, image, patch)


def build_module(name, prenorm, device, dtype):
    """The eager transformers module for ``name`` (random weights, std 0.02) and a call(x, mask) for it."""
    import transformers

    fam, hidden, image, patch = dims(name)
    kw = dict(hidden_size=hidden, image_size=image, patch_size=patch, num_attention_heads=16)
    if fam == "clip":
        if prenorm:
            mod = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(num_hidden_layers=0, **kw))
            call = lambda m, x, mask: m(x).last_hidden_state  # noqa: E731  (embeddings + pre_layrnorm)
        else:
            from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

            mod = CLIPVisionEmbeddings(transformers.CLIPVisionConfig(**kw))
            call = lambda m, x, mask: m(x)  # noqa: E731
    elif fam == "siglip":
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

        mod = SiglipVisionEmbeddings(transformers.SiglipVisionConfig(**kw))
        call = lambda m, x, mask: m(x)  # noqa: E731
    elif fam == "pixtral":
        from transformers import PixtralVisionConfig
        from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

        mod = PixtralVisionModel(PixtralVisionConfig(hidden_size=hidden, image_size=image, patch_size=patch,
                                                     num_hidden_layers=0, num_attention_heads=16, head_dim=64))
        call = lambda m, x, sizes: m(x, image_sizes=sizes).last_hidden_state  # noqa: E731
    elif fam == "qwen2":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

        mod = PatchEmbed(patch_size=patch, temporal_patch_size=2, in_channels=3, embed_dim=hidden)
        call = lambda m, x, mask: m(x)  # noqa: E731
    elif fam == "qwen3":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionConfig, Qwen3VLVisionModel

        mod = Qwen3VLVisionModel(Qwen3VLVisionConfig(hidden_size=hidden, patch_size=patch, depth=0, num_heads=16,
                                                     num_position_embeddings=2304))

        def call(m, x, taps):  # Qwen3VLVisionModel.forward's embedding lines
            h = m.patch_embed(x)
            return h + (m.pos_embed(taps[0]) * taps[1][:, :, None]).sum(1).to(h.dtype)
    else:
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionEmbeddings

        mod = Idefics2VisionEmbeddings(Idefics2VisionConfig(**kw))
        call = lambda m, x, mask: m(x, mask)  # noqa: E731
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.02)
    return mod.to(device=device, dtype=dtype).eval(), call


def build_inputs(name, batch, device, dtype, uint8):
    fam, hidden, image, patch = dims(name)
    g = torch.Generator().manual_seed(0)
    if fam in ("qwen2", "qwen3"):  # rows as the processor makes them for still images: each frame twice
        if uint8:
            raise ValueError(f"{name}: the rows are pre-patchified floats (no uint8 input)")
        side = image // patch
        frame = torch.randn(batch * side * side, 3, 1, patch * patch, generator=g)
        x = frame.expand(-1, 3, 2, patch * patch).reshape(batch * side * side, -1).to(device=device, dtype=dtype)
        taps = None
        if fam == "qwen3":
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            grid = torch.tensor([[1, side, side]] * batch, device=device)
            taps = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=48, mode="bilinear",
                                                                align_corners=True, spatial_merge_size=2)
        return x, taps, lambda u: u
    img = torch.randint(0, 256, (batch, 3, image, image), generator=g, dtype=torch.uint8)
    side = image // patch
    mask = None
    if fam == "pixtral":  # every second image 512 x 768, padded with zeros (the mask slot carries image_sizes)
        img[1::2, :, image // 2:] = 0
        img[1::2, :, :, image * 3 // 4:] = 0
        mask = torch.tensor([[image, image] if b % 2 == 0 else [image // 2, image * 3 // 4] for b in range(batch)])
    if fam == "idefics2":
        mask = torch.ones(batch, side, side, dtype=torch.bool)
        mask[1::2, side // 2:] = False  # every second image: 490 x 700 px, padded to 980 x 980
        mask[1::2, :, side * 5 // 7:] = False
        mask = mask.to(device)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    img = img.to(device)
    keep = 1.0
    if fam == "idefics2":  # Idefics2's processor pads after normalising: the padded pixels are 0
        keep = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None].float()
    normalise = lambda u: (((u.float() / 255 - mean) / std) * keep).to(dtype)  # noqa: E731
    return img if uint8 else normalise(img), mask, normalise


def _gemm_formulation(mod, name, prenorm):
    """The embedding in plain PyTorch with the conv as im2col + F.linear (the weight viewed, never copied)."""
    fam = MODELS[name][0]
    if fam in ("qwen2", "qwen3"):
        conv = mod.proj if fam == "qwen2" else mod.patch_embed.proj
        w2 = conv.weight.view(conv.out_channels, -1)

        def rows(x, taps):
            y = F.linear(x, w2, conv.bias)
            return y if taps is None else y + (mod.pos_embed(taps[0]) * taps[1][:, :, None]).sum(1).to(y.dtype)

        return rows
    emb = mod.embeddings if fam == "clip" and prenorm else mod
    conv = emb.patch_embedding
    p = conv.kernel_size[0]
    D = conv.out_channels

    def fn(x, mask):
        B, C, H, W = x.shape
        gh, gw = H // p, W // p
        a = x[:, :, :gh * p, :gw * p].reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, -1)
        y = F.linear(a, conv.weight.view(D, -1), conv.bias).view(B, gh * gw, D)
        if fam == "clip":
            y = torch.cat([emb.class_embedding.expand(B, 1, D), y], 1) + emb.position_embedding.weight
            if prenorm:
                y = mod.pre_layrnorm(y)
        elif fam == "siglip":
            y = y + emb.position_embedding.weight
        else:
            from fastvlm.ops.navit_positions import navit_position_ids

            y = y + emb.position_embedding(navit_position_ids(mask, emb.num_patches_per_side))
        return y

    return fn


def _fastvlm_rows(mod, name, still):
    import fastvlm
    from fastvlm.ops.rows_embed import rows_embed

    if MODELS[name][0] == "qwen2":
        fused = fastvlm.nn.from_module(mod)
        fused.fastvlm_still_images = still
        return lambda x, taps: fused(x)
    conv = mod.patch_embed.proj
    w = conv.weight
    ws = w.float().sum(2).to(w.dtype).reshape(w.shape[0], -1) if still else w.view(w.shape[0], -1)
    kw = dict(frames=2, chunk=w[0, 0, 0].numel(), full_weight=w.view(w.shape[0], -1)) if still else {}
    return lambda x, taps: rows_embed(x, ws, conv.bias, pos=mod.pos_embed.weight, pos_idx=taps[0],
                                      pos_weights=taps[1], **kw)


def _fastvlm(mod, call, name, prenorm, uint8):
    import fastvlm

    if MODELS[name][0] in ("qwen2", "qwen3"):
        return _fastvlm_rows(mod, name, still=False)

    fused = copy.copy(mod)  # a shallow copy shares the parameters; patch it, not the eager module
    fused.__dict__["_modules"] = dict(mod._modules)
    if (MODELS[name][0] == "clip" and prenorm) or MODELS[name][0] == "pixtral":
        fastvlm.patch(fused)
    else:
        fused = fastvlm.nn.from_module(mod)
    if not uint8:
        return lambda x, mask: call(fused, x, mask)
    from fastvlm.ops.patch_embed import patch_embed

    emb = fused.embeddings if MODELS[name][0] == "clip" and prenorm else fused
    conv = emb.patch_embedding
    mean = torch.tensor(CLIP_MEAN, device=conv.weight.device)
    std = torch.tensor(CLIP_STD, device=conv.weight.device)
    scale, shift = 1 / (255 * std), -mean / std
    fam = MODELS[name][0]

    p = conv.kernel_size[0]

    def fn(x, mask):  # the functional with the normalisation folded into the loads
        H, W = x.shape[-2:]
        x = x[:, :, :H // p * p, :W // p * p]  # a view: the "valid" conv drops the remainder
        if fam == "idefics2":
            from fastvlm.ops.navit_positions import navit_position_ids

            ids = navit_position_ids(mask, emb.num_patches_per_side).reshape(-1)
            hw = torch.stack([mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)], 1) * p  # each image's size in pixels
            return patch_embed(x, conv.weight, conv.bias, pos=emb.position_embedding.weight, pos_rows=ids,
                               pixel_scale=scale, pixel_shift=shift, image_hw=hw)
        T = emb.num_patches
        cls = emb.class_embedding if fam == "clip" else None
        rows = torch.arange(1 if cls is not None else 0, T + (1 if cls is not None else 0), device=x.device)
        norm = {}
        if fam == "clip" and prenorm:
            ln = fused.pre_layrnorm
            norm = dict(norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps)
        return patch_embed(x, conv.weight, conv.bias, pos=emb.position_embedding.weight, pos_rows=rows, cls=cls,
                           pixel_scale=scale, pixel_shift=shift, **norm)

    return fn


def _provider_fn(prov, mod, call, name, pn, uint8, eager, normalise, device, compile_on_cpu):
    """The timed callable (x, mask) of a provider; harness.Skipped when it does not apply here."""
    fam = MODELS[name][0]
    if prov == "eager":
        return eager
    if prov == "gemm":
        if fam == "pixtral":
            raise harness.Skipped("the crop and concatenation need the conv's NCHW map")
        g = _gemm_formulation(mod, name, pn)
        return (lambda x, mask: g(normalise(x), mask)) if uint8 else g
    if prov == "compile":
        if device == "cpu" and compile_on_cpu:
            return torch.compile(eager)
        return harness.compile_module(eager, "max-autotune")
    if prov == "fastvlm":
        return _fastvlm(mod, call, name, pn, uint8)
    if prov == "fastvlm_still":
        if fam not in ("qwen2", "qwen3"):
            return None  # still-image mode exists for Qwen-VL's repeated frames only
        return _fastvlm_rows(mod, name, still=True)
    raise KeyError(f"unknown provider {prov!r}; choose from {PROVIDERS}")


def run(shapes=None, providers=None, dtype=torch.bfloat16, prenorm=False, uint8=False, reps=None, out=None,
        quick=False, compile_on_cpu=False, verbose=True):
    from fastvlm import trace

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = harness.environment()
    if quick:
        shapes = shapes or ["clip-l-336@1"]
        reps = reps or 3
    if device == "cpu":
        shapes = shapes or ["clip-l-336@1"]
        reps = reps or 3
        if dtype == torch.bfloat16 and verbose:
            print("No CUDA device: fastvlm runs its PyTorch path and the numbers only show that the suite runs.")
    shapes = shapes or [f"{m}@{b}" for m in MODELS for b in BATCHES]
    providers, reps = providers or PROVIDERS, reps or 30
    rec = harness.Recorder(out, echo=format_row if verbose else None)
    if verbose:
        print(HEADER + "\n" + "-" * len(HEADER))
    if not compile_on_cpu and harness.only_skipped_compiles(providers, ("compile",)):
        return [rec.add(dict(suite="patch_embed", shape=sh, provider="compile", mode="fwd", dtype=str(dtype),
                             prenorm=prenorm, uint8=uint8, ms=None, skipped=harness.COMPILE_ON_CPU, **env))
                for sh in shapes]  # nothing to time here: no model is built
    for shape in shapes:
        name, batch = parse_shape(shape)
        fam, hidden, image, patch = dims(name)
        if uint8 and fam in ("qwen2", "qwen3", "pixtral"):
            continue  # pre-patchified float rows, or a model without a uint8 entry: no uint8 form
        pn = prenorm and fam == "clip"
        mod, call = build_module(name, pn, device, dtype)
        x, mask, normalise = build_inputs(name, batch, device, dtype, uint8)
        eager = (lambda x, mask: call(mod, normalise(x), mask)) if uint8 else (lambda x, mask: call(mod, x, mask))
        T = (image // patch) ** 2
        K = 3 * patch * patch * (2 if fam in ("qwen2", "qwen3") else 1)  # Qwen: two frames per row
        flops = 2 * batch * T * K * hidden
        min_bytes = x.numel() * x.element_size() + hidden * K * 2 + batch * (T + 1) * hidden * 2
        cols = harness.roofline(flops, min_bytes, dtype)
        with torch.no_grad():
            ref = eager(x, mask).float()
        base = None
        for prov in providers:
            row = dict(suite="patch_embed", shape=shape, provider=prov, mode="fwd", dtype=str(dtype), prenorm=pn,
                       uint8=uint8, flops=flops, min_bytes=min_bytes, **cols, **env)
            try:
                fn = _provider_fn(prov, mod, call, name, pn, uint8, eager, normalise, device, compile_on_cpu)
                if fn is None:
                    continue
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with trace() as t:
                        got = fn(x, mask).float()
                    backends = sorted({r.backend for r in t.records})
                    err = harness.rel_err(got, ref)
                    med, p20, p80 = harness.measure(lambda: fn(x, mask), warmup=1 if device == "cpu" else 5,
                                                    reps=reps, device=device)
            except harness.Skipped as exc:
                rec.add(dict(row, ms=None, skipped=str(exc)))
                continue
            except Exception as exc:  # recorded; the other providers still run
                rec.add(dict(row, ms=None, error=harness.error_text(exc)))
                continue
            if prov == "eager":
                base = med
            rec.add(dict(row, **harness.timing_cols(med, p20, p80, flops, cols["roofline_ms"], base), rel_err=err,
                         backends=",".join(backends) or "-"))
        mod = x = mask = eager = fn = None  # release the tensors before the next shape
        if device == "cuda":
            torch.cuda.empty_cache()
    if verbose:
        harness.print_footer(env, rec.rows, out)
    return rec.rows


HEADER = (f"{'shape':24} {'pre':3} {'u8':2} {'provider':13} {'median ms':>10} {'p20':>8} {'p80':>8} {'TFLOP/s':>8} "
          f"{'%roof':>6} {'vs eager':>8} {'rel err':>8} backend")


def format_row(r):
    flags = f"{'y' if r['prenorm'] else '-':3} {'y' if r['uint8'] else '-':2}"
    if r["ms"] is None:
        return f"{r['shape']:24} {flags} {r['provider']:13} {'skipped' if 'skipped' in r else 'FAILED'}: " \
               f"{r.get('skipped') or r.get('error')}"
    return (f"{r['shape']:24} {flags} {r['provider']:13} {r['ms']:10.4f} {r['p20_ms']:8.4f} {r['p80_ms']:8.4f} "
            f"{r['tflops']:8.2f} {100 * r['roofline_fraction']:6.1f} {r['speedup_vs_eager']:8.2f} "
            f"{r['rel_err']:8.1e} {r['backends']}")


def format_rows(rows):
    return "\n".join([HEADER, "-" * len(HEADER)] + [format_row(r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.bench.patch_embed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", help=f"name@batch; names {list(MODELS)}; default every name at "
                                                f"batch {BATCHES} on GPU, clip-l-336@1 on CPU")
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS, help=f"default: {PROVIDERS}")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--prenorm", action="store_true", help="CLIP: embeddings + pre_layrnorm (fused by fastvlm)")
    ap.add_argument("--uint8", action="store_true", help="uint8 input, normalisation folded into fastvlm's loads")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--quick", action="store_true", help="one shape, 3 repetitions (a smoke run)")
    ap.add_argument("--compile-on-cpu", action="store_true")
    ap.add_argument("--out", help="append result rows (JSON lines) to this file")
    args = ap.parse_args(argv)
    run(args.shapes, args.providers, getattr(torch, args.dtype), args.prenorm, args.uint8, args.reps, args.out,
        args.quick, args.compile_on_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
