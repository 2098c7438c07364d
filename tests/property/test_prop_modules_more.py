"""Property tests of the other fused module families against their originals, on both paths: LLaVA-NeXT-Video's
pooler (average, max, conv), the BLIP-2 Q-Former, Idefics2's connector and Perceiver resampler, the vision
embeddings (CLIP, SigLIP, BLIP-2, Qwen2-VL / Qwen2.5-VL / Qwen3-VL patch embeds, Idefics2/3 NaViT embeddings,
InternVL, Llama 4's unfold), timm's PatchEmbed, ``torch.nn.Linear`` and the feature-map reference projectors."""
import copy

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.func import functional_call

import fastvlm
from conftest import budget, known
from fastvlm.testing import randomize_
from prop_rule import check, check_grads
from prop_strategies import dtypes, f64, laid_out, values

LAYOUTS = ("contiguous", "transposed", "sliced", "strided_rows", "expanded")
PIX_LAYOUTS = LAYOUTS + ("channels_last",)
V = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=42, patch_size=14)


def _kinds(grads, dtype, softmax):
    if grads:
        return ("normal",)
    if softmax and dtype != torch.float16:
        # near-overflow fp32/fp64 inputs make attention scores ~1e30: softmax is then ill-conditioned (score rounding
        # of O(1) picks the key), a property of the input, not of a path; fp16's x^2 overflow stays in
        return ("normal", "normal", "specials")
    return ("normal", "normal", "specials", "large")


def _x(draw, shape, dtype, grads, layouts=LAYOUTS, softmax=False, **kw):
    return draw(laid_out(draw(values(shape, dtype, kinds=_kinds(grads, dtype, softmax), **kw)), layouts))


# ------------------------------------------------------------------------------------- builders and their inputs


def _pooler(mode):
    import transformers
    from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoPooler

    cfg = transformers.LlavaNextVideoConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=24, intermediate_size=32, num_attention_heads=4,
                           num_hidden_layers=1, image_size=84, patch_size=14),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_hidden_layers=1, vocab_size=100), spatial_pool_mode=mode, spatial_pool_stride=2)
    return LlavaNextVideoPooler(cfg)


def _pooler_in(draw, m, dtype, path, grads):
    side = draw(st.integers(1, 6))
    P = side * side + (draw(st.sampled_from([0, 0, 0, 1, 3])) if not grads else 0)
    x = _x(draw, (draw(st.integers(0 if not known("zero_images") else 1, 3)), P, 24), dtype, grads)
    if path == "triton" and known("nan_relu_maxpool") and m.pool.__class__.__name__ == "MaxPool2d":
        x = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0)
    return (x,), {}


def _qformer():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             encoder_hidden_size=40, cross_attention_frequency=1, initializer_range=0.15)
    return Blip2QFormerModel(cfg)


def _qformer_in(draw, m, dtype, path, grads):
    B, nq, nk = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 20))
    kw = dict(query_embeds=_x(draw, (B, nq, 32), dtype, grads, softmax=True),
              encoder_hidden_states=_x(draw, (B, nk, 40), dtype, grads, softmax=True))
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        mask = (torch.rand(B, nk, generator=g) < 0.7).long()
        kw["encoder_attention_mask"] = mask
    return (), kw


def _idefics2(kind):
    from transformers import Idefics2Config
    from transformers.models.idefics2 import modeling_idefics2 as M

    cfg = Idefics2Config(perceiver_config=dict(hidden_size=64, resampler_n_latents=8, resampler_depth=2,
                                               resampler_n_heads=4, resampler_head_dim=24, num_key_value_heads=2),
                         text_config=dict(model_type="mistral", hidden_size=64, intermediate_size=96),
                         vision_config=dict(hidden_size=32))
    conn = M.Idefics2Connector(cfg)
    randomize_(conn, 0.3)
    return conn if kind == "connector" else conn.perceiver_resampler


def _idefics2_in(width):
    def make(draw, m, dtype, path, grads):
        B, P = draw(st.integers(1, 2)), draw(st.integers(1, 20))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
        mask = torch.rand(B, P, generator=g) < 0.8
        x = _x(draw, (B, P, width), dtype, grads, softmax=True)
        return (x, mask), {}

    return make


def _embeddings(fam):
    import transformers

    if fam == "clip":
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as C
        return C(transformers.CLIPVisionConfig(**V))
    if fam == "siglip":
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as C
        return C(transformers.SiglipVisionConfig(**V))
    if fam == "blip_2":
        from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings as C
        return C(transformers.Blip2VisionConfig(**V))
    if fam == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings as C
        return C(transformers.InternVLVisionConfig(hidden_size=32, image_size=28, patch_size=7, num_attention_heads=4,
                                                   num_hidden_layers=1, intermediate_size=32))
    if fam == "llama4":
        from transformers.models.llama4.modeling_llama4 import Llama4UnfoldConvolution as C
        return C(transformers.Llama4VisionConfig(hidden_size=32, patch_size=7, num_channels=3))
    raise KeyError(fam)


def _pixels_in(sizes, kw_options=()):
    def make(draw, m, dtype, path, grads):
        h, w = draw(st.sampled_from(sizes))
        x = _x(draw, (draw(st.integers(0, 2)), 3, h, w), dtype, grads, PIX_LAYOUTS)
        kw = {k: draw(st.booleans()) for k in kw_options}
        return (x,), kw

    return make


def _qwen_patch(fam):
    if fam == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed as C
        return C(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40)
    if fam == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed as C
        return C(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40)
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed as C
    return C(Qwen3VLVisionConfig(hidden_size=40, patch_size=16, num_heads=4, depth=1, out_hidden_size=40))


def _rows_in(width):
    def make(draw, m, dtype, path, grads):
        return (_x(draw, (draw(st.integers(0, 9)), width), dtype, grads),), {}

    return make


def _navit(fam):
    if fam == "idefics2":
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig as Cfg
        from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings as C
    else:
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionConfig as Cfg
        from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings as C
    return C(Cfg(hidden_size=24, image_size=56, patch_size=7, num_attention_heads=4, num_hidden_layers=1,
                 intermediate_size=32))


def _navit_in(draw, m, dtype, path, grads):
    B, gh, gw = draw(st.integers(1, 3)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    mask = torch.zeros(B, gh, gw, dtype=torch.bool)
    for n in range(B):
        mask[n, :draw(st.integers(0 if n else 1, gh)), :draw(st.integers(0 if n else 1, gw))] = True
    valid = mask.repeat_interleave(7, 1).repeat_interleave(7, 2)[:, None]
    x = _x(draw, (B, 3, gh * 7, gw * 7), dtype, grads, PIX_LAYOUTS)
    return (torch.where(valid, x, torch.zeros((), dtype=dtype)), mask), {}


def _timm(opts):
    from timm.layers import PatchEmbed

    return PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16, **opts)


def _linear():
    return torch.nn.Linear(13, 17)


def _feature_map(kind):
    from fastvlm.reference.feature_map import CAbstractor, LDPv2Projector

    if kind == "cabs":
        return CAbstractor(12, 16, 20, num_input_tokens=36, num_queries=9, depth=1)
    return LDPv2Projector(12, 20, 9)


def _tokens_in(width, counts):
    def make(draw, m, dtype, path, grads):
        lead = draw(st.sampled_from([(1,), (2,), (3,)]))
        x = _x(draw, (*lead, draw(st.sampled_from(counts)), width), dtype, grads)
        if path == "triton" and known("nan_relu_maxpool"):
            x = torch.nan_to_num(x, nan=1.0, posinf=2.0, neginf=-2.0)
        return (x,), {}

    return make


CASES = {  # name: (builder, input maker, reduction length for the bound, roundings, output picker)
    "pooler_average": (lambda: _pooler("average"), _pooler_in, 8, 2, None),
    "pooler_max": (lambda: _pooler("max"), _pooler_in, 1, 1, None),
    "pooler_conv": (lambda: _pooler("conv"), _pooler_in, 100, 2, None),
    "blip2_qformer": (_qformer, _qformer_in, 120, 8, lambda r: r.last_hidden_state),
    "idefics2_connector": (lambda: _idefics2("connector"), _idefics2_in(32), 260, 8, None),
    "idefics2_resampler": (lambda: _idefics2("resampler"), _idefics2_in(64), 260, 8, None),
    "clip_embeddings": (lambda: _embeddings("clip"), _pixels_in([(42, 42), (28, 56), (42, 40)],
                                                                ("interpolate_pos_encoding",)), 640, 4, None),
    "siglip_embeddings": (lambda: _embeddings("siglip"), _pixels_in([(42, 42), (28, 56)],
                                                                    ("interpolate_pos_encoding",)), 640, 4, None),
    "blip2_embeddings": (lambda: _embeddings("blip_2"), _pixels_in([(42, 42), (28, 28)],
                                                                   ("interpolate_pos_encoding",)), 640, 4, None),
    "internvl_embeddings": (lambda: _embeddings("internvl"), _pixels_in([(28, 28), (35, 21), (30, 29)]), 200, 4,
                            lambda r: r[0] if isinstance(r, tuple) else r),
    "llama4_unfold": (lambda: _embeddings("llama4"), _pixels_in([(28, 28), (35, 21), (30, 29)]), 200, 3, None),
    "qwen2_vl_patch": (lambda: _qwen_patch("qwen2_vl"), _rows_in(1176), 1200, 2, None),
    "qwen2_5_vl_patch": (lambda: _qwen_patch("qwen2_5_vl"), _rows_in(1176), 1200, 2, None),
    "qwen3_vl_patch": (lambda: _qwen_patch("qwen3_vl"), _rows_in(1536), 1600, 2, None),
    "idefics2_navit": (lambda: _navit("idefics2"), _navit_in, 200, 3, None),
    "idefics3_navit": (lambda: _navit("idefics3"), _navit_in, 200, 3, None),
    "timm_patch_embed": (lambda: _timm({}), _pixels_in([(32, 32), (40, 24), (16, 16)]), 200, 2, None),
    "timm_patch_embed_norm_nhwc": (lambda: _timm(dict(norm_layer=torch.nn.LayerNorm, output_fmt="NHWC")),
                                   _pixels_in([(32, 32), (40, 24)]), 200, 3, None),
    "timm_patch_embed_dynamic_pad": (lambda: _timm(dict(strict_img_size=False, dynamic_img_pad=True)),
                                     _pixels_in([(32, 32), (36, 30)]), 200, 2, None),
    "linear": (_linear, _tokens_in(13, [0, 1, 5]), 13, 1, None),
    "cabstractor": (lambda: _feature_map("cabs"), _tokens_in(12, [36, 25]), 200, 8, None),
    "ldpv2": (lambda: _feature_map("ldp"), _tokens_in(12, [36, 16]), 200, 6, None),
}
_BUILT = {}


def _modules(name, dtype):
    if (name, dtype) not in _BUILT:
        torch.manual_seed(0)
        m = randomize_(CASES[name][0](), 0.3).eval()
        m64 = copy.deepcopy(m).double()
        m = m.to(dtype)
        _BUILT[(name, dtype)] = (m, fastvlm.nn.from_module(m), m64)
    return _BUILT[name, dtype]


@pytest.mark.parametrize("name", list(CASES))
def test_module_matches_original(name, path):
    _, make, k, roundings, pick = CASES[name]

    @budget(path, torch=10, triton=2)
    @given(dtype=dtypes(path), data=st.data())
    def run(dtype, data):
        m, fused, m64 = _modules(name, dtype)
        args, kw = make(data.draw, m, dtype, path, False)
        with torch.no_grad():
            check(fused, m, args, kwargs=kw, original64=m64, args64=f64(args), names=("pixel", "x", "hidden",
                  "features", "input", "mask", "embeds", "context", "weight"), dtype=dtype, k=k,
                  roundings=roundings, pick=pick or (lambda r: r))

    run()


@pytest.mark.parametrize("name", [n for n in CASES if n != "pooler_max"])
def test_module_gradients(name, path):
    _, make, k, roundings, pick = CASES[name]

    @budget(path, torch=4, triton=1)
    @given(dtype=dtypes(path), data=st.data(), seed=st.integers(0, 2 ** 31 - 1))
    def run(dtype, data, seed):
        m, fused, _ = _modules(name, dtype)
        args, kw = make(data.draw, m, dtype, path, True)
        floats = {f"a{i}": a for i, a in enumerate(args) if a.is_floating_point()}
        floats.update({n: t for n, t in kw.items() if isinstance(t, torch.Tensor) and t.is_floating_point()})
        assume(all(t.numel() > 0 for t in floats.values()))
        leaves = {**floats, **{"p." + n: p.detach() for n, p in m.named_parameters()}}

        def call(mod):
            def fn(d):
                params = {n[2:]: t for n, t in d.items() if n.startswith("p.")}
                a = tuple(d.get(f"a{i}", x) for i, x in enumerate(args))
                kws = {n: d.get(n, v) for n, v in kw.items()}
                return (pick or (lambda r: r))(functional_call(mod, params, a, kws))

            return fn

        check_grads(call(fused), call(m), leaves, dtype=dtype, k=k * 4, roundings=roundings + 3, gy_seed=seed)

    run()
