"""GPU checks of the new patch-embedding paths at real sizes (skipped without CUDA): CLIP-L/336 embeddings with the
fused pre-norm, timm ViT-B/16 with registers and pre-norm, Idefics2's NaViT embeddings at 980 px, the row-norm
kernel at real widths. Each compares the Triton path with a float64 reference on the same device."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from helpers import Guarded, assert_close

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")  # a fallback is an error here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_row_norm_real_widths(dtype):
    from fastvlm.kernels.row_norm import row_norm_

    for C in (768, 1024, 1152, 1280):
        x = torch.randn(577 * 8 + 3, C, device="cuda") * 2 + 1
        w, b = 1 + 0.2 * torch.randn(C, device="cuda"), 0.2 * torch.randn(C, device="cuda")
        buf = Guarded(tuple(x.shape), dtype, "cuda", fill=x.to(dtype))
        row_norm_(buf.tensor, w.to(dtype), b.to(dtype), 1e-5)
        buf.check()
        ref = F.layer_norm(x.to(dtype).double(), (C,), w.to(dtype).double(), b.to(dtype).double(), 1e-5)
        assert_close(buf.tensor, ref, dtype, C, roundings=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_clip_l_336_pre_norm(dtype):
    import transformers

    cfg = transformers.CLIPVisionConfig(hidden_size=1024, image_size=336, patch_size=14, num_attention_heads=16,
                                        num_hidden_layers=0)
    m = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    ref_model = copy.deepcopy(m).double().cuda()
    m = m.to("cuda", dtype)
    fastvlm.patch(m)
    x = torch.randn(8, 3, 336, 336, device="cuda")
    with torch.no_grad(), fastvlm.trace() as t:
        out = m(x.to(dtype)).last_hidden_state
        ref = ref_model(x.to(dtype).double()).last_hidden_state
    assert [r.backend for r in t.records if r.op == "fastvlm::patch_embed"] == ["triton"]
    assert_close(out, ref, dtype, 588, roundings=4)


def _idefics2_980(dtype):
    """Idefics2's vision embeddings at 980 px (random N(0, 0.02) weights) on the GPU in ``dtype``, and a float64
    copy as the reference."""
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionEmbeddings

    m = Idefics2VisionEmbeddings(Idefics2VisionConfig(hidden_size=1152, image_size=980, patch_size=14))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    ref_model = copy.deepcopy(m).double().cuda()  # before the cast: the reference keeps the fp32 weights
    return m.to("cuda", dtype), ref_model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_idefics2_980_navit(dtype):
    m, ref_model = _idefics2_980(dtype)
    mask = torch.zeros(4, 70, 70, dtype=torch.bool, device="cuda")
    mask[0] = True
    mask[1, :35, :50] = True
    mask[2, :70, :13] = True  # image 3 is all padding
    x = torch.randn(4, 3, 980, 980, device="cuda")
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x.to(dtype), mask)
        ref = ref_model(x.to(dtype).double(), mask)
    assert_close(out, ref, dtype, 588, roundings=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_idefics2_980_uint8_padded(dtype):
    """Raw uint8 images of three sizes padded to 980 px: the normalisation and the zero padding after it happen in
    the GEMM's loads (``image_hw``, the masked A-load with 64-wide N tiles); sizes cut patches in half."""
    from fastvlm.ops.navit_positions import navit_position_ids
    from fastvlm.ops.patch_embed import patch_embed

    m, ref_model = _idefics2_980(dtype)
    hw = torch.tensor([[980, 980], [497, 705], [300, 980]], device="cuda")
    img = torch.randint(0, 256, (3, 3, 980, 980), dtype=torch.uint8, device="cuda")
    keep = torch.zeros(3, 980, 980, dtype=torch.bool, device="cuda")
    for b, (h, w) in enumerate(hw.tolist()):
        keep[b, :h, :w] = True
    mean = torch.tensor([0.5, 0.5, 0.5], device="cuda")
    std = torch.tensor([0.5, 0.5, 0.5], device="cuda")
    norm = ((img.double() / 255 - mean.view(1, 3, 1, 1).double()) / std.view(1, 3, 1, 1).double()) * keep[:, None]
    pmask = keep.unfold(1, 14, 14).unfold(2, 14, 14).sum((-1, -2)) > 0
    ids = navit_position_ids(pmask, 70).reshape(-1)
    conv = m.patch_embedding
    with torch.no_grad(), fastvlm.trace() as t:
        out = patch_embed(img, conv.weight, conv.bias, pos=m.position_embedding.weight, pos_rows=ids,
                          pixel_scale=1 / (255 * std), pixel_shift=-mean / std, image_hw=hw)
        ref = ref_model(norm, pmask)
    assert [r.backend for r in t.records] == ["triton"]
    assert_close(out, ref, dtype, 588, roundings=2)


def test_timm_vit_b16_registers_pre_norm():
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False, pre_norm=True, dynamic_img_size=True,
                          depth=1).eval()
    ref_model = copy.deepcopy(m).double().cuda()
    m = m.to("cuda", torch.bfloat16)
    fastvlm.patch(m)
    for size in ((256, 256), (224, 320)):
        x = torch.randn(4, 3, *size, device="cuda")
        with torch.no_grad(), fastvlm.trace() as t:
            out = m.forward_features(x.bfloat16())
            ref = ref_model.forward_features(x.bfloat16().double())
        assert [r.detail.endswith("+layernorm") for r in t.records] == [True]
        assert_close(out, ref, torch.bfloat16, 768, roundings=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qwen3_vl_rows_with_interpolated_positions(dtype):
    """Qwen3-VL at real width: 4 images of 32 x 32 patches (K = 1536 -> 1152, bias) plus the 48 x 48 table resampled
    by 4 taps, and the still-image mode on the same rows."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from fastvlm.ops.rows_embed import rows_embed

    N, D, q = 4 * 1024, 1152, 256
    frame = torch.randn(N, 3, 1, q, device="cuda")
    x = frame.expand(N, 3, 2, q).reshape(N, -1).to(dtype)
    w = (torch.randn(D, 3, 2, q, device="cuda") * 0.02).to(dtype)
    b = (torch.randn(D, device="cuda") * 0.02).to(dtype)
    pos = (torch.randn(2304, D, device="cuda") * 0.02).to(dtype)
    grid = torch.tensor([[1, 32, 32]] * 4, device="cuda")
    idx, tw = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=48, mode="bilinear",
                                                           align_corners=True, spatial_merge_size=2)
    ref = x.double() @ w.reshape(D, -1).double().T + b.double() + (pos.double()[idx] * tw.double()[..., None]).sum(1)
    with fastvlm.trace() as t:
        out = rows_embed(x, w.reshape(D, -1), b, pos=pos, pos_idx=idx, pos_weights=tw)
        still = rows_embed(x, w.float().sum(2).to(dtype).reshape(D, -1), b, pos=pos, pos_idx=idx, pos_weights=tw,
                           frames=2, chunk=q, full_weight=w.reshape(D, -1))
    assert [r.backend for r in t.records] == ["triton", "triton"]
    assert_close(out, ref, dtype, 1536 + 4)
    assert_close(still, ref, dtype, 1536 + 4, roundings=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pixtral_patch_conv_rms_pre_norm(dtype):
    """Pixtral-12B's tower width (1024, patch 16) on a ragged batch of two images, patched vs float64 original."""
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionModel

    cfg = PixtralVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=0, num_attention_heads=16,
                              head_dim=64, patch_size=16, image_size=1024)
    m = PixtralVisionModel(cfg).eval()
    with torch.no_grad():
        m.patch_conv.weight.normal_(0, 0.02)
        m.ln_pre.weight.copy_(1 + 0.1 * torch.randn(1024))
    ref_model = copy.deepcopy(m).double().cuda()
    m = m.to("cuda", dtype)
    fastvlm.patch(m)
    x = torch.randn(2, 3, 512, 768, device="cuda")
    x[1, :, 256:] = 0
    sizes = torch.tensor([[512, 768], [256, 400]])
    with torch.no_grad(), fastvlm.trace() as t:
        out = m(x.to(dtype), image_sizes=sizes).last_hidden_state
        ref = ref_model(x.to(dtype).double(), image_sizes=sizes).last_hidden_state
    assert [r.backend for r in t.records if r.op == "fastvlm::patch_embed"] == ["triton"]
    assert_close(out, ref, dtype, 768, roundings=4)
