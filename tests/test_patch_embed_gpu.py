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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_idefics2_980_navit(dtype):
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionConfig, Idefics2VisionEmbeddings

    m = Idefics2VisionEmbeddings(Idefics2VisionConfig(hidden_size=1152, image_size=980, patch_size=14))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    ref_model = copy.deepcopy(m).double().cuda()
    m = m.to("cuda", dtype)
    mask = torch.zeros(4, 70, 70, dtype=torch.bool, device="cuda")
    mask[0] = True
    mask[1, :35, :50] = True
    mask[2, :70, :13] = True  # image 3 is all padding
    x = torch.randn(4, 3, 980, 980, device="cuda")
    with torch.no_grad():
        out = fastvlm.nn.from_module(m)(x.to(dtype), mask)
        ref = ref_model(x.to(dtype).double(), mask)
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
