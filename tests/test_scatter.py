"""The image-token hand-off op vs transformers' masked_scatter: values, dtype cast, count check, autograd, opcheck."""
import pytest
import torch

import fastvlm
from helpers import Guarded


def _case(dtype=torch.float32, B=2, S=13, D=40, feat_dtype=None):
    embeds = torch.randn(B, S, D, dtype=dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 9:12] = True
    feats = torch.randn(int(mask.sum()), D, dtype=feat_dtype or dtype)
    return embeds, mask, feats


def _hf(embeds, mask, feats):
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype,feat_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                              (torch.bfloat16, torch.float32)])
def test_matches_masked_scatter(backend, dtype, feat_dtype, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    embeds, mask, feats = _case(dtype, feat_dtype=feat_dtype)
    g = Guarded(tuple(feats.shape), feats.dtype, "cpu", fill=feats)
    out = fastvlm.scatter_image_features(embeds, mask, g.tensor)
    ref = _hf(embeds, mask, feats)
    assert out.dtype == embeds.dtype
    if backend == "triton" and feat_dtype is not None and not torch.cuda.is_available():
        # the interpreter casts fp32 -> bf16 toward zero (GPUs round to nearest): at most 1 ulp apart
        ulp = torch.finfo(dtype).eps * ref.float().abs()
        assert ((out.float() - ref.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, ref)
    g.check("features")


def test_count_mismatch_raises_like_transformers():
    embeds, mask, feats = _case()
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 8, features: 7"):
        fastvlm.scatter_image_features(embeds, mask, feats[:-1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autograd(backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    embeds, mask, feats = _case(torch.float64 if backend == "torch" else torch.float32)
    e1, f1 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    e2, f2 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    g = torch.randn_like(embeds)
    fastvlm.scatter_image_features(e1, mask, f1).backward(g)
    _hf(e2, mask, f2).backward(g)
    assert torch.equal(e1.grad, e2.grad) and torch.equal(f1.grad, f2.grad)


def test_opcheck():
    embeds, mask, feats = _case()
    torch.library.opcheck(torch.ops.fastvlm.scatter_image_features.default,
                          (embeds.reshape(-1, 40).requires_grad_(), mask.reshape(-1), feats.requires_grad_()))
