"""Issue 14's known bugs, each as the smallest input that shows it, now regression
tests: the fixes are merged, so the property tests cover these regions again.
Each test states the rule: the original's (or the reference's) result, dtype and error."""
import copy
import math
import os

import pytest
import torch

import fastvlm
from fastvlm.ops.layout import space_to_depth_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.reference.attention import eager_attention_ref
from fastvlm.reference.projector import mlp_projector_ref
from fastvlm.testing import build
from prop_rule import check


def _same_nan(out, ref):
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"NaN at {torch.isnan(out).sum()} places, " \
                                                            f"the original at {torch.isnan(ref).sum()}"


def test_kernel_relu_keeps_nan(triton_backend):
    x = torch.randn(5, 16)
    x[2, 3] = math.nan
    w = torch.randn(8, 16)
    _same_nan(fastvlm.mlp_projector(x, w, act="relu"), mlp_projector_ref(x, w, act="relu"))


def test_kernel_max_pool_keeps_nan(triton_backend):
    x = torch.randn(16, 8)
    x[5, 2] = math.nan
    rows = space_to_depth_rows(1, 4, 4, 2)
    ref = x[rows].amax(1)
    _same_nan(pool_tokens(x, rows, "max"), ref)
    w = torch.randn(4, 8)
    _same_nan(fastvlm.mlp_projector(x, w, act="none", rows=rows, a_mode="max"), ref @ w.T)



def test_kernel_attention_nan_bias(triton_backend):
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    bias = torch.zeros(1, 5)
    bias[0, 1] = math.nan
    _same_nan(fastvlm.attention(q, k, v, key_mask=bias), eager_attention_ref(q, k, v, key_mask=bias))


def test_kernel_attention_nan_key_stays_in_its_head(triton_backend):
    q, k, v = torch.randn(1, 4, 3, 16), torch.randn(1, 4, 5, 16), torch.randn(1, 4, 5, 16)
    k[0, 1, 2, 0] = math.nan
    _same_nan(fastvlm.attention(q, k, v), eager_attention_ref(q, k, v))


def test_kernel_attention_all_neg_inf_row(triton_backend):
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    bias = torch.full((1, 1), -math.inf)
    _same_nan(fastvlm.attention(q, k, v, key_mask=bias), eager_attention_ref(q, k, v, key_mask=bias))


def test_cpu_attention_finite_min_row_is_eager_mean(torch_backend):
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    bias = torch.full((1, 6), torch.finfo(torch.float32).min)
    ref = eager_attention_ref(q, k, v, key_mask=bias)
    assert torch.allclose(fastvlm.attention(q, k, v, key_mask=bias), ref, atol=1e-5)


def test_kernel_concat_cm_norm_statistics(triton_backend):
    torch.manual_seed(0)
    args = (torch.randn(16, 8), torch.randn(5, 32))
    kw = dict(act="none", norm="rmsnorm", norm_weight=torch.ones(32), rows=space_to_depth_rows(1, 4, 4, 2),
              a_mode="concat_cm")
    check(fastvlm.mlp_projector, mlp_projector_ref, args, kwargs=kw, original64=mlp_projector_ref,
          args64=tuple(a.double() for a in args), kwargs64=dict(kw, norm_weight=kw["norm_weight"].double()),
          k=64, roundings=3)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_merger_rejects_wrong_width(family, torch_backend):
    m = build(family)
    x = torch.randn(12, 40)  # the mergers take rows of width 24: 480 elements are 5 merged rows of 96
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            m(x)
        with pytest.raises((RuntimeError, ValueError)):
            fastvlm.nn.from_module(m)(x)


def test_kernel_functional_projector_follows_autocast(triton_backend, monkeypatch):
    """Autocast is a fallback reason of every op (the kernels ignore it): the PyTorch path answers in autocast's dtype,
    and a forced kernel backend refuses, naming autocast, instead of answering in fp32."""
    x, w1, w2 = torch.randn(6, 16), torch.randn(12, 16), torch.randn(8, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = mlp_projector_ref(x, w1, None, w2)
        with pytest.raises(fastvlm.FastVLMFallbackError, match="autocast"):
            fastvlm.mlp_projector(x, w1, None, w2)
        monkeypatch.setenv("FASTVLM_BACKEND", "auto")
        out = fastvlm.mlp_projector(x, w1, None, w2)
    assert out.dtype == ref.dtype == torch.bfloat16


@pytest.mark.parametrize("backend,bad", [("torch", -1), ("triton", -1), ("triton", 16), ("triton", 1000)])
def test_row_tables_are_range_checked(backend, bad, monkeypatch):
    """The PyTorch path wraps negative indices (and raises on positive ones); the kernels read outside x."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    x = torch.randn(16, 8)
    rows = space_to_depth_rows(1, 4, 4, 2).clone()
    rows[1, 2] = bad
    with pytest.raises((IndexError, ValueError), match="rows|index"):
        pool_tokens(x, rows, "mean")
    with pytest.raises((IndexError, ValueError), match="rows|index"):
        fastvlm.mlp_projector(x, torch.randn(4, 32), rows=rows, a_mode="concat")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_meta_inputs_trace_like_the_original(family, torch_backend):
    from fastvlm.testing import args_for

    m = build(family)
    args = tuple(a.to("meta") for a in args_for(family, m))
    mm = copy.deepcopy(m).to("meta")
    with torch.no_grad():
        ref = mm(*args)
        out = fastvlm.nn.from_module(mm)(*args)
    assert out.shape == ref.shape and out.device.type == "meta"


def test_kernel_patch_embed_checks_devices(triton_backend):
    from fastvlm.ops.patch_embed import patch_embed

    with pytest.raises((ValueError, RuntimeError)) as info:
        patch_embed(torch.randn(1, 3, 28, 28), torch.randn(8, 3, 14, 14, device="meta"))
    # today: NotImplementedError("Cannot copy out of meta tensor") from inside the launch
    assert not isinstance(info.value, NotImplementedError) and "meta" in str(info.value), repr(info.value)


@pytest.mark.parametrize("family", ["idefics3", "gemma3", "aya_vision", "llama4_adapter"])
def test_zero_images(family, torch_backend):
    from fastvlm.testing import args_for

    m = build(family)
    x = args_for(family, m)[0][:0]
    fused = fastvlm.nn.from_module(m)
    with torch.no_grad():
        try:  # Llama 4's and Aya's reshape(..., -1) reject zero images: the fused module raises the same
            ref = m(x)
        except RuntimeError as exc:
            with pytest.raises(type(exc)):
                fused(x)
            return
        assert fused(x).shape == ref.shape


@pytest.mark.parametrize("mode", ["concat", "concat_cm"])
def test_zero_rows_with_concat(mode, torch_backend):
    x, rows = torch.randn(16, 8), torch.empty(0, 4, dtype=torch.int64)
    assert fastvlm.mlp_projector(x, torch.randn(5, 32), rows=rows, a_mode=mode).shape == (0, 5)


def test_gated_backward_without_second_linear(torch_backend):
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(10, 6, requires_grad=True)
    y = fastvlm.mlp_projector(x, w, act="none", gated=True)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_zero_dim_input(torch_backend):
    with pytest.raises((ValueError, RuntimeError), match="x|input|shape"):
        try:
            fastvlm.mlp_projector(torch.tensor(1.0), torch.randn(3, 1))
        except IndexError as exc:
            pytest.fail(f"internal IndexError: {exc}")


_PATHS_REASON = "issue 14: scale<=0 / non-contiguous rows disagreement between paths, fixed on branch validate"


def _both(fn):
    out = {}
    for b in ("torch", "triton"):
        os.environ["FASTVLM_BACKEND"] = b
        try:
            out[b] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001
            out[b] = ("err", type(exc).__name__)
    return out


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_paths_agree_on_attention_scale(scale, triton_backend):
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 3, 16)
    r = _both(lambda: fastvlm.attention(q, k, k, scale=scale))
    # eager attention accepts any scale: the PyTorch path computes it, the kernel (which assumes a positive scale)
    # is refused with the reason under a forced kernel backend, and falls back otherwise
    assert r["torch"][0] == "ok" and r["triton"] == ("err", "FastVLMFallbackError"), r


def test_paths_agree_on_non_contiguous_rows(triton_backend):
    x = torch.randn(16, 8)
    rows = space_to_depth_rows(1, 4, 4, 2).t().contiguous().t()
    r = _both(lambda: pool_tokens(x, rows, "mean"))
    r2 = _both(lambda: fastvlm.mlp_projector(x, torch.randn(4, 32), rows=rows, a_mode="concat"))
    assert r["torch"][0] == r["triton"][0] and r2["torch"][0] == r2["triton"][0], (r, r2)
