"""End-to-end connector path: pixels (or vision features) -> connector -> inputs_embeds, at real model sizes.

Models are built from their config classes with random weights; the language model keeps its real embedding table
but only one decoder layer (it never runs here). Paths:
    "connector"  precomputed vision features -> connector -> image-token scatter into inputs_embeds
    "full"       pixel_values -> vision encoder -> connector -> scatter (``model.model.get_image_features`` + scatter)
Providers: transformers eager, ``fastvlm.patch``, ``torch.compile`` of the same, and on a GPU the patched path under
CUDA graphs (``torch.compile(mode="reduce-overhead")``); for Qwen2-VL also ``fastvlm_still``
(``fastvlm.patch(model, still_images=True)``: the patch GEMM reads one of the two frames the processor repeats).
Qwen2-VL's pixel rows are built as the processor builds an image's: each frame twice. Rows are appended to ``--out`` as
measured (a provider that fails records its error); ``--tiny`` or FASTVLM_BENCH_TINY=1: tiny configs.
    python -m fastvlm.bench.e2e --models llava-1.5-7b qwen2-vl-7b --out benchmarks/results/e2e.jsonl
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from fastvlm.bench import harness

MODELS = ["llava-1.5-7b", "qwen2-vl-7b"]
PATHS = ["connector", "full"]
PROVIDERS = ["hf_eager", "fastvlm", "fastvlm_still", "hf_compile", "fastvlm_compile", "fastvlm_cudagraph"]


def build(name, device, dtype, tiny=False):
    """(model, pixel inputs dict, number of image tokens)."""
    import transformers

    if name == "llava-1.5-7b":
        vis = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        txt = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                   num_attention_heads=32, vocab_size=32064)
        if tiny:
            vis.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56)
            txt.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, vocab_size=1000)
        cfg = transformers.LlavaConfig(vision_config=vis, text_config=txt, image_token_id=txt["vocab_size"] - 1,
                                       image_seq_length=(vis["image_size"] // 14) ** 2)
        with torch.device(device):  # initialised on the device: seconds, not a minute, at 7B sizes
            model = transformers.LlavaForConditionalGeneration(cfg)
        n_img = (vis["image_size"] // 14) ** 2
        inputs = dict(pixel_values=torch.randn(1, 3, vis["image_size"], vis["image_size"]))
    elif name == "qwen2-vl-7b":
        vis = dict(embed_dim=1280, depth=32, num_heads=16, hidden_size=3584, in_channels=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
        txt = dict(model_type="qwen2_vl_text", hidden_size=3584, intermediate_size=18944, num_hidden_layers=1,
                   num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                   rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
        grid = (1, 32, 32)  # a 448 x 448 image: 1024 patches -> 256 tokens
        if tiny:
            vis.update(embed_dim=64, depth=2, num_heads=4, hidden_size=128)
            txt.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=1000, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                             mrope_section=[4, 6, 6]))
            grid = (1, 4, 4)
        cfg = transformers.Qwen2VLConfig(vision_config=vis, text_config=txt, image_token_id=txt["vocab_size"] - 1)
        with torch.device(device):
            model = transformers.Qwen2VLForConditionalGeneration(cfg)
        patches = grid[0] * grid[1] * grid[2]
        n_img = patches // 4
        frame = torch.randn(patches, 3, 1, 14 * 14)  # an image: the processor repeats its frame (temporal patch 2)
        inputs = dict(pixel_values=frame.expand(patches, 3, 2, 14 * 14).reshape(patches, -1),
                      image_grid_thw=torch.tensor([grid]))
    else:
        raise KeyError(f"unknown model {name!r}; choose from {MODELS}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(device=device, dtype=dtype).eval()
    inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
    return model, inputs, n_img


def _connector(model):
    inner = model.model
    return inner.visual.merger if hasattr(inner, "visual") else inner.multi_modal_projector


def _path_fn(model, inputs, n_img, path, features):
    """A callable running the chosen path and returning inputs_embeds."""
    from fastvlm.integrations import handoff
    from fastvlm.ops.scatter import scatter_image_features

    inner = model.model
    ids = torch.full((1, n_img + 8), 1, dtype=torch.long, device=features.device)
    ids[0, 4:4 + n_img] = model.config.image_token_id
    embed = inner.get_input_embeddings()

    def scatter(feats):
        emb = embed(ids)
        if handoff.is_installed(inner):  # the patched model scatters with fastvlm's op (where that is exact)
            return scatter_image_features(emb, ids == model.config.image_token_id, feats)
        mask = (ids == model.config.image_token_id)[..., None].expand_as(emb)
        return emb.masked_scatter(mask, feats.reshape(-1, emb.shape[-1]).to(emb.dtype))

    if path == "connector":
        conn = _connector(model)
        return lambda: scatter(conn(features))

    def full():
        out = inner.get_image_features(**inputs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        return scatter(feats)
    return full


def run(models=None, paths=None, providers=None, dtype=torch.bfloat16, reps=None, out=None, tiny=False):
    import fastvlm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No CUDA device: timing the PyTorch path on the CPU; these numbers are not kernel measurements.")
        dtype = torch.float32
        providers = providers or ["hf_eager", "fastvlm"]
        reps = reps or 3
    models, paths = models or MODELS, paths or PATHS
    providers = [p for p in (providers or PROVIDERS) if device == "cuda" or p != "fastvlm_cudagraph"]
    env = harness.environment()
    tiny = tiny or harness.tiny()
    rec = harness.Recorder(out)
    for name in models:
        model, inputs, n_img = build(name, device, dtype, tiny)
        with torch.no_grad():  # the connector's input, as the vision tower hands it over
            conn = _connector(model)
            captured = {}
            h = conn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
            model.model.get_image_features(**inputs)
            h.remove()
            features = captured["x"]
        for path in paths:
            base = ref = None
            for prov in providers:
                if prov == "fastvlm_still" and (name != "qwen2-vl-7b" or path != "full"):
                    continue  # the halved patch GEMM exists for Qwen-VL's pixel rows only
                row = dict(env, suite="e2e", model=name, shape=f"{name} {path}", mode="fwd", path=path,
                           provider=prov, dtype=str(dtype), tiny=tiny)
                try:
                    m = copy.deepcopy(model) if prov.startswith("fastvlm") else model
                    if prov.startswith("fastvlm"):
                        fastvlm.patch(m, still_images=prov == "fastvlm_still")
                    fn = _path_fn(m, inputs, n_img, path, features)
                    if prov.endswith("compile"):
                        fn = harness.compile_module(fn)
                    elif prov.endswith("cudagraph"):
                        fn = harness.compile_module(fn, "reduce-overhead")
                    with torch.no_grad():
                        result = fn()
                        if ref is None or prov == "hf_eager":
                            ref = result.float()
                        err = harness.rel_err(result, ref)
                        med, p20, p80 = harness.measure(fn, warmup=3, reps=reps or 20, device=device)
                except harness.Skipped as exc:
                    rec.add(dict(row, ms=None, skipped=str(exc)))
                    continue
                except Exception as exc:  # recorded; the other providers still run
                    rec.add(dict(row, ms=None, error=harness.error_text(exc)))
                    print(f"{name:14} {path:10} {prov:18} FAILED: {rec.rows[-1]['error']}")
                    continue
                if prov == "hf_eager":
                    base = med
                rec.add(dict(row, **harness.timing_cols(med, p20, p80, base_ms=base), rel_err=err))
                print(f"{name:14} {path:10} {prov:18} {med:10.3f} ms  (p20 {p20:.3f}, p80 {p80:.3f})  "
                      f"vs eager {rec.rows[-1]['speedup_vs_eager']:.2f}x  rel err {err:.1e}")
        del model, features
    return rec.rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastvlm.bench.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", choices=MODELS)
    ap.add_argument("--paths", nargs="*", choices=PATHS)
    ap.add_argument("--providers", nargs="*", choices=PROVIDERS)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke run)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", module="fastvlm")
    run(args.models, args.paths, args.providers, reps=args.reps, out=args.out, tiny=args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
