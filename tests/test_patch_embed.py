"""Fused patch embeddings: im2col in the GEMM's loads, bias + position table + class token, vs the originals."""
import copy
import re
import warnings

import pytest
import torch

import fastvlm
from fastvlm.kernels.gemm import fused_linear
from fastvlm.ops.patch_embed import _tables, im2col_ref, patch_embed
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield


def _ref(pixels, weight, bias, pos, pos_rows, cls, cls_pos=0):
    """float64 reference: conv as unfold + matmul, cat class token, add positions."""
    B = pixels.shape[0]
    p = weight.shape[-1]
    a = im2col_ref(pixels.double(), p)
    y = (a @ weight.double().reshape(weight.shape[0], -1).T).view(B, -1, weight.shape[0])
    if bias is not None:
        y = y + bias.double()
    if pos is not None:
        y = y + pos.double()[pos_rows]
    if cls is not None:
        c = cls.double() + (pos.double()[cls_pos] if pos is not None else 0)
        y = torch.cat([c.expand(B, 1, -1), y], 1)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,patch", [((2, 3, 28, 42), 14), ((1, 3, 21, 35), 7), ((3, 2, 16, 16), 8)])
def test_kernel_vs_float64(dtype, shape, patch, triton_backend):
    B, C, H, W = shape
    T = (H // patch) * (W // patch)
    D = 40
    x = torch.randn(shape).to(dtype)
    w = (torch.randn(D, C, patch, patch) * (C * patch * patch) ** -0.5).to(dtype)
    b, pos, cls = torch.randn(D).to(dtype), torch.randn(T + 1, D).to(dtype), torch.randn(D).to(dtype)
    rows = torch.arange(1, T + 1)
    out = patch_embed(x, w, b, pos=pos, pos_rows=rows, cls=cls)
    assert out.shape == (B, T + 1, D) and out.dtype == dtype
    assert_close(out, _ref(x, w, b, pos, rows, cls), dtype, C * patch * patch, roundings=2)


def test_channels_last_and_strided_views(triton_backend):
    """The im2col offsets follow the pixel tensor's strides: channels_last and cropped views read in place."""
    x = torch.randn(2, 3, 30, 44).to(memory_format=torch.channels_last)[:, :, 1:29, 2:44]
    w = torch.randn(24, 3, 14, 14) / 20
    out = patch_embed(x, w)
    assert_close(out, _ref(x, w, None, None, None, None), torch.float32, 588)


def test_output_rows_stay_inside_the_buffer(triton_backend):
    """The epilogue's row remap (room for class tokens) writes only the patch rows of a poisoned output."""
    B, C, H, W, p, D = 2, 3, 28, 28, 14, 16
    x = torch.randn(B, C, H, W)
    w = torch.randn(D, C, p, p) / 20
    rows, cols = _tables(tuple(x.shape), tuple(x.stride()), p, "cpu")
    out = Guarded((B * 5, D), torch.float32, "cpu")
    out_rows = (torch.arange(B).view(B, 1) * 5 + 1 + torch.arange(4)).reshape(-1)
    fused_linear(x, w.reshape(D, -1), a_mode="separable", a_rows=rows, a_cols=cols, out_rows=out_rows, out=out.tensor,
                 config=(16, 16, 32, 4, 1))
    out.check("out")
    got = out.tensor.view(B, 5, D)
    assert torch.isnan(got[:, 0]).all()  # class-token rows untouched by the GEMM
    assert_close(got[:, 1:], _ref(x, w, None, None, None, None), torch.float32, C * p * p)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_uint8_pixels_equal_the_normalised_float_path(backend, monkeypatch):
    """Raw uint8 pixels with the processor's rescale + mean/std folded into the loads = the float path on its output."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    img = torch.randint(0, 256, (2, 3, 28, 42), dtype=torch.uint8)
    normalised = (img.float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    w, b = torch.randn(32, 3, 14, 14) / 20, torch.randn(32)
    ref = patch_embed(normalised, w, b)
    out = patch_embed(img, w, b, pixel_scale=1 / (255 * std), pixel_shift=-mean / std)
    assert rel_err(out, ref) < 1e-6


FAMS = ["clip", "siglip", "blip_2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _module(fam):
    import transformers

    from fastvlm.testing import randomize_

    V = dict(hidden_size=48, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=42,
             patch_size=14)
    if fam == "clip":
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as C
        m, x = C(transformers.CLIPVisionConfig(**V)), torch.randn(2, 3, 42, 42)
    elif fam == "siglip":
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as C
        m, x = C(transformers.SiglipVisionConfig(**V)), torch.randn(2, 3, 42, 42)
    elif fam == "blip_2":
        from transformers.models.blip_2.modeling_blip_2 import Blip2VisionEmbeddings as C
        m, x = C(transformers.Blip2VisionConfig(**V)), torch.randn(2, 3, 42, 42)
    elif fam == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed as C
        m, x = C(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40), torch.randn(12, 1176)
    elif fam == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed as C
        m, x = C(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=40), torch.randn(12, 1176)
    else:
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed as C
        m = C(Qwen3VLVisionConfig(hidden_size=40, patch_size=16, num_heads=4, depth=1, out_hidden_size=40))
        x = torch.randn(12, 3 * 2 * 16 * 16)
    return randomize_(m), x


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_modules_vs_original(fam, backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m, x = _module(fam)
    fused = fastvlm.nn.from_module(m)
    assert isinstance(fused, type(m)) and list(fused.state_dict()) == list(m.state_dict())
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
    assert all(r.backend == backend for r in t.records) and t.records, str(t)
    with torch.no_grad():
        ref = m.double()(x.double())
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, x[0].numel() if x.dim() == 2 else 588, roundings=2)


@pytest.mark.parametrize("fam", ["clip", "siglip", "blip_2"])
def test_interpolated_positions(fam, torch_backend):
    m, _ = _module(fam)
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(1, 3, 56, 70)
    with torch.no_grad():
        assert_close(fused(x, interpolate_pos_encoding=True), m(x, interpolate_pos_encoding=True), torch.float32, 588)
        m.position_embedding.weight.add_(1.0) if hasattr(m.position_embedding, "weight") else \
            m.position_embedding.add_(1.0)
        # the cached table follows the update
        assert_close(fused(x, interpolate_pos_encoding=True), m(x, interpolate_pos_encoding=True), torch.float32, 588)


def test_original_errors_are_kept(torch_backend):
    m, _ = _module("clip")
    fused = fastvlm.nn.from_module(m)
    with pytest.raises(ValueError, match="doesn't match model"):
        fused(torch.randn(1, 3, 56, 56))
    with pytest.raises(RuntimeError):
        fused(torch.randn(1, 4, 42, 42))


@pytest.mark.parametrize("fam", ["clip", "siglip", "qwen2_vl"])
def test_gradients(fam, torch_backend):
    m, x = _module(fam)
    m = m.double()
    fused = fastvlm.nn.from_module(m)
    x = x.double().requires_grad_()
    params = [x] + list(m.parameters())
    g = torch.randn_like(m(x))
    ref = torch.autograd.grad(m(x), params, g)
    got = torch.autograd.grad(fused(x), params, g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


def test_opcheck_and_compile(torch_backend):
    m, x = _module("clip")
    T = 9
    args = (x, m.patch_embedding.weight, None, m.position_embedding.weight, m.class_embedding,
            torch.arange(1, T + 1), 0, None, None, 14, True)  # (the trailing norm arguments are optional)
    torch.library.opcheck(torch.ops.fastvlm.patch_embed.default, args)
    fused = fastvlm.nn.from_module(m)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(x), m(x), torch.float32, 588)


def test_bad_inputs():
    w = torch.randn(8, 3, 14, 14)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patch_embed(torch.randn(1, 3, 30, 28), w)
    with pytest.raises(ValueError, match="uint8 pixels need pixel_scale"):
        patch_embed(torch.zeros(1, 3, 28, 28, dtype=torch.uint8), w)
    with pytest.raises(ValueError, match="weight must be a square conv kernel"):
        patch_embed(torch.randn(1, 4, 28, 28), w)


@pytest.mark.parametrize("fam", ["clip-l-336", "siglip-so400m-384", "qwen2-vl-1024"])
def test_full_size_pytorch_path(fam, torch_backend):
    import transformers

    if fam == "clip-l-336":
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings as C
        m = C(transformers.CLIPVisionConfig(hidden_size=1024, image_size=336, patch_size=14, num_attention_heads=16))
        x = torch.randn(1, 3, 336, 336)
    elif fam == "siglip-so400m-384":
        from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings as C
        m = C(transformers.SiglipVisionConfig(hidden_size=1152, image_size=384, patch_size=14, num_attention_heads=16))
        x = torch.randn(1, 3, 384, 384)
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed as C
        m, x = C(embed_dim=1280), torch.randn(1024, 1176)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        out = fastvlm.nn.from_module(m)(x)
        ref = m(x)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(flatten=False), dict(output_fmt="NHWC"), dict(output_fmt="NCL"),
                                dict(norm_layer=torch.nn.LayerNorm), dict(bias=False),
                                dict(strict_img_size=False, dynamic_img_pad=True)], ids=str)
@pytest.mark.parametrize("size", [(32, 32), (40, 24), (36, 30)])
def test_timm_patch_embed_options(kw, size, triton_backend, monkeypatch):
    """timm's PatchEmbed with each option: same output, or the original's own error for sizes it rejects."""
    pytest.importorskip("timm")
    from timm.layers import PatchEmbed

    monkeypatch.setenv("FASTVLM_BACKEND", "auto")  # dynamic padding falls back, with its reason
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=16, **kw)
    fused = fastvlm.nn.from_module(pe)
    x = torch.randn(2, 3, *size)
    try:
        ref = pe(x)
    except AssertionError as err:
        with pytest.raises(AssertionError, match=re.escape(str(err))):
            fused(x)
        return
    with torch.no_grad():
        out = fused(x)
    assert out.shape == ref.shape
    assert_close(out, ref.detach().double(), torch.float32, 192, roundings=2)


def test_timm_vit_patched(torch_backend):
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    report = fastvlm.patch(m, verify=True)
    # the patch embedding, and its pairing with the ViT's _pos_embed (tests/test_patch_embed_prenorm.py)
    assert [e.path for e in report.patched] == ["patch_embed", ""] and all("ok" in e.detail for e in report.patched)
    with torch.no_grad():
        assert rel_err(m(x), ref) < 1e-5
    assert fastvlm.unpatch(m) == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_size_not_a_multiple_of_the_patch(backend, monkeypatch):
    """SigLIP so400m at 384 px is 27 patches of 14 + 6 pixels the "valid" conv drops: the GEMM reads a cropped view."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m, _ = _module("siglip")
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(2, 3, 42 + 5, 42 + 13)
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(x)
        ref = m.double()(x.double())
    assert [r.backend for r in t.records] == [backend]
    assert_close(out, ref, torch.float32, 588, roundings=2)


def _internvl_or_llama4(fam):
    import transformers

    from fastvlm.testing import randomize_

    if fam == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings as C
        cfg = transformers.InternVLVisionConfig(hidden_size=32, image_size=28, patch_size=7, num_attention_heads=4,
                                                num_hidden_layers=1, intermediate_size=32)
        return randomize_(C(cfg)).eval()
    from transformers.models.llama4.modeling_llama4 import Llama4UnfoldConvolution as C
    return randomize_(C(transformers.Llama4VisionConfig(hidden_size=32, patch_size=7, num_channels=3)))


@pytest.mark.parametrize("fam", ["internvl", "llama4"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_internvl_and_llama4_unfold(fam, backend, monkeypatch):
    """InternVL (class token, position Parameter, bicubic table for other sizes) and Llama 4's Unfold + Linear,
    on the native size and on sizes that are not square / not a multiple of the patch."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _internvl_or_llama4(fam)
    fused = fastvlm.nn.from_module(m)
    assert isinstance(fused, type(m)) and list(fused.state_dict()) == list(m.state_dict())
    ref_m = copy.deepcopy(m).double()
    for shape in [(2, 3, 28, 28), (2, 3, 35, 21), (1, 3, 30, 29)]:
        x = torch.randn(shape)
        with torch.no_grad(), fastvlm.trace() as t:
            out = fused(x)
            ref = ref_m(x.double())
        assert [r.backend for r in t.records] == [backend], str(t)
        assert out.shape == ref.shape
        assert_close(out, ref, torch.float32, 147, roundings=2)


def test_internvl_original_paths(torch_backend):
    """bool_masked_pos and active dropout run the original forward (reported); bad channels get its error."""
    import transformers

    from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings as C
    cfg = transformers.InternVLVisionConfig(hidden_size=32, image_size=28, patch_size=7, num_attention_heads=4,
                                            num_hidden_layers=1, intermediate_size=32, use_mask_token=True,
                                            hidden_dropout_prob=0.5)
    m = C(cfg).eval()
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(2, 3, 28, 28)
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[:, ::3] = True
    with torch.no_grad(), fastvlm.trace() as t:
        assert torch.equal(fused(x, masked), m(x, masked))
    assert t.records and t.records[0].backend == "torch" and "bool_masked_pos" in t.records[0].reasons[0]
    with pytest.raises(ValueError, match="channel dimension"):
        fused(torch.randn(1, 4, 28, 28))
    m.train()
    fused.train()
    torch.manual_seed(3)
    ref = m(x)
    torch.manual_seed(3)
    assert torch.equal(fused(x), ref)


@pytest.mark.parametrize("fam", ["internvl", "llama4"])
def test_internvl_and_llama4_gradients(fam, torch_backend):
    m = _internvl_or_llama4(fam).double()
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(2, 3, 35, 21, dtype=torch.float64, requires_grad=True)
    params = [x] + list(m.parameters())
    g = torch.randn_like(m(x))
    ref = torch.autograd.grad(m(x), params, g)
    got = torch.autograd.grad(fused(x), params, g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-12


def test_interpolated_table_keeps_its_gradient(torch_backend):
    """With the table trained, the interpolated table is recomputed under autograd (not taken from the cache)."""
    m, _ = _module("clip")
    m = m.double()
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(1, 3, 56, 70, dtype=torch.float64)
    table = m.position_embedding.weight
    got = torch.autograd.grad(fused(x, interpolate_pos_encoding=True).square().sum(), table)[0]
    ref = torch.autograd.grad(m(x, interpolate_pos_encoding=True).square().sum(), table)[0]
    assert rel_err(got, ref) < 1e-12
