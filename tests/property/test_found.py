"""Bugs found by the property tests' fuzzing pass that are not in issue 14's list, each as its smallest input. These
are open unless marked xfail (strict, with the reason). conftest.FOUND keeps the property tests away from each region until the fix is merged;
then delete the key there and these tests stay as regression tests."""
import math
import warnings

import pytest
import torch

import fastvlm
from fastvlm.ops.layout import space_to_depth_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.ops.rows_embed import rows_embed
from fastvlm.reference.attention import eager_attention_ref, sdpa_attention_ref
from fastvlm.testing import rel_err, tolerance


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        request.getfixturevalue("triton_backend")
    monkeypatch.setenv("FASTVLM_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pool_tokens_backward_with_no_windows(mode, backend):
    """A 0-row table (no window): the forward gives [0, D]; the backward raised "cannot reshape tensor of 0 elements
    into shape [0, -1]" (fastvlm/ops/pool.py ``_backward``). The original (gather + reduce) gives a zero gradient."""
    x = torch.randn(3, 4, requires_grad=True)
    y = pool_tokens(x, torch.empty(0, 2, dtype=torch.int64), mode)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_rows_embed_still_frames_with_no_rows(backend):
    """Still-frames mode with 0 patch rows: the PyTorch path raised "cannot reshape tensor of 0 elements into shape
    [0, -1, 2, 1]" (fastvlm/ops/rows_embed.py ``first_frame``); the kernel path returns [0, D]."""
    w = torch.randn(5, 3 * 4)
    assert rows_embed(torch.empty(0, 3 * 2 * 4), w, frames=2, chunk=4, full_weight=torch.randn(5, 2 * 3 * 4)).shape \
        == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_embed_still_frames_inf_pixel(dtype, backend):
    """Still-frames mode computes x0 @ (W0 + W1)^T where the original computes x0 W0 + x0 W1: with an Inf pixel and
    weights of opposite signs the original gives Inf - Inf = NaN (channel 0 of row 1), with one frame's weight 0
    Inf * 0 = NaN (channel 1), where the summed kernel gave Inf (both paths; conftest.FOUND "rows_embed_still_inf").
    Fixed: rows that come out non-finite are computed again against ``full_weight`` (kernel path: per tile in the
    GEMM, kernels/gemm_still.py). Finite rows (0, 2) and the -Inf of channel 2 stay as they were."""
    C, T, q, D = 2, 2, 3, 3
    frame = torch.randn(3, C, 1, q)
    frame[1, 0, 0, 1] = math.inf
    x = frame.expand(3, C, T, q).reshape(3, -1).to(dtype)
    full = torch.randn(D, C, T, q) * 0.3
    full[0, 0, :, 1] = torch.tensor([1.0, -0.5])  # opposite signs: Inf - Inf
    full[1, 0, :, 1] = torch.tensor([0.0, 1.0])  # Inf * 0 + Inf * 1
    full[2, 0, :, 1] = torch.tensor([-1.0, -0.25])  # same signs: -Inf
    full = full.to(dtype)
    ref = torch.nn.functional.linear(x.float(), full.reshape(D, -1).float())
    assert torch.isnan(ref[1, :2]).all() and ref[1, 2] == -math.inf
    out = rows_embed(x, full.float().sum(2).to(dtype).reshape(D, -1), frames=T, chunk=q,
                     full_weight=full.reshape(D, -1))
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (out, ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), (out, ref)
    fin = torch.isfinite(ref)
    assert torch.allclose(out[fin].float(), ref[fin], atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("where", ["k", "v"])
def test_attention_nan_in_a_masked_key(where, backend):
    """A NaN in a key that keep-flags mask out: transformers' eager attention (0 / finfo.min mask) and SDPA (-inf mask)
    give NaN for the rows that see it (NaN + mask = NaN); the PyTorch path of fastvlm.attention used to fill masked
    scores (``masked_fill``), fixed: keep-flags add -inf on both paths. Rows without a kept key: tests/test_nonfinite.py
    ``test_attention_row_without_a_kept_key_meets_a_nonfinite_score``. (A NaN in a masked key's value gives NaN on
    every side: kept as a guard.)"""
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    (k if where == "k" else v)[0, 0, 1, 0] = math.nan
    mask = torch.tensor([[True, False, True]])
    eager, sdpa = eager_attention_ref(q, k, v, key_mask=mask), sdpa_attention_ref(q, k, v, key_mask=mask)
    assert torch.equal(torch.isnan(eager), torch.isnan(sdpa))
    out = fastvlm.attention(q, k, v, key_mask=mask)
    assert torch.equal(torch.isnan(out), torch.isnan(eager)), (out, eager)


def test_linear_residual_layernorm_backward_no_rows_warns_nothing(backend):
    """0 rows: the backward's ``h.var(-1, unbiased=False)`` warns "var(): degrees of freedom is <= 0" to the user
    (fastvlm/ops/linear_norm.py ``_backward``); the original (Linear + LayerNorm) is silent."""
    x, w = torch.randn(0, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        fastvlm.linear_residual_layernorm(x, w, ln_weight=torch.ones(3)).sum().backward()
    assert w.grad is not None and not w.grad.any()


def test_attention_fp16_underflowing_probability_meets_inf_value(backend):
    """fp16, no mask: key 1 scores 20 below key 0, so its probability (2e-9) rounds to 0 in fp16 and eager computes
    0 * Inf = NaN for the channel where V holds Inf. The PyTorch path kept P in fp32 (2e-9 * Inf = Inf); fixed: it
    rounds P to the input dtype where eager does. The kernel rounds its unnormalised probabilities to the input dtype
    before P @ V, which gives the same here; where only the normalised one underflows see the next test."""
    q, k, v = torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 2, 16), torch.ones(1, 1, 2, 16)
    q[..., 0], k[0, 0, 1, 0], v[0, 0, 1, 0] = 1.0, -80.0, math.inf  # score: 1 * -80 / sqrt(16) = -20
    q, k, v = q.half(), k.half(), v.half()
    eager = eager_attention_ref(q, k, v)
    assert torch.isnan(eager[0, 0, 0, 0])
    out = fastvlm.attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(eager)), (out, eager)


@pytest.mark.parametrize("dtype, k_low", [(torch.float16, -66.0), (torch.bfloat16, -368.0)])
@pytest.mark.parametrize("heads", [1, 2])
def test_attention_lowp_normalised_probability_underflows_meets_inf_value(dtype, k_low, heads, backend):
    """Eight keys score 0 and key 8 scores k_low / 4 (-16.5 in fp16, -92 in bf16): its probability exp(s) / 8 rounds
    to 0 in the input dtype, so eager computes 0 * Inf = NaN where V holds Inf; its unnormalised probability exp(s)
    (the kernel's online softmax) does not round to 0, so the kernel gave Inf (conftest.FOUND "attention_lowp_v_inf",
    found by a 400-example fuzz run, seed 11). Fixed: a tile that stores a non-finite value in a row with finite
    statistics is recomputed with P normalised before the rounding (kernels/attention_tile.py
    ``_store_eager_rounded``). With two packed heads, the second head's rows stay finite."""
    q, k, v = torch.zeros(1, heads, 1, 16), torch.zeros(1, heads, 9, 16), torch.ones(1, heads, 9, 16)
    q[..., 0], k[0, 0, 8, 0], v[0, 0, 8, 0] = 1.0, k_low, math.inf
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    eager = eager_attention_ref(q, k, v)
    assert torch.isnan(eager[0, 0, 0, 0]) and torch.isfinite(eager[0, 0, 0, 1:]).all()
    out = fastvlm.attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(eager)), (out, eager)
    assert torch.equal(torch.isinf(out), torch.isinf(eager)), (out, eager)
    fin = torch.isfinite(eager)
    assert torch.allclose(out[fin].float(), eager[fin].float(), atol=1e-2)


def test_rows_embed_single_weighted_position_tap(backend):
    """One position tap with a weight other than 1: the kernel path took the plain-lookup branch (``POS_TAPS == 1``
    in kernels/gemm.py) and added the row unweighted (3.9157 where the original gives 3.5585). Found by the fuzz pass
    (seed 101). Fixed: the plain lookup is ``POS_TAPS == 0`` (no weights); weighted taps, one or more, take the loop."""
    x = w = pos = torch.tensor([[1.5410]])
    idx, tw = torch.zeros(1, 1, dtype=torch.int64), torch.tensor([[0.7682]])
    out = rows_embed(x, w, pos=pos, pos_idx=idx, pos_weights=tw)
    assert torch.allclose(out, x * w + pos * tw, rtol=1e-6), out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_no_keys_lowp(dtype, backend):
    """Lk = 0 in bf16: the kernel path raised InterpreterError ("'InterpreterBuilder' object has no attribute
    'get_bf16'") from ``tl.full(..., nan, bf16)`` in the keyless-row store, where the PyTorch path gives O = 0 (as
    SDPA; fuzz pass, seed 101). Fixed: the NaN tile is built in fp32 and cast."""
    q, k = torch.randn(1, 1, 1, 16).to(dtype), torch.empty(1, 1, 0, 16, dtype=dtype)
    out = fastvlm.attention(q, k, k)
    assert out.shape == (1, 1, 1, 16) and torch.equal(out.float(), torch.zeros(1, 1, 1, 16))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_patch_embed_keep_rows_drops_a_nan_patch(path, monkeypatch):
    """keep_rows drops the patches holding a NaN and an Inf pixel: they are 0 on both paths (the op's contract:
    dropped patches are zero before the norm, as the kernel skips them). Found by the fuzz pass (seed 101): the
    PyTorch path multiplied by a 0/1 mask, so NaN * 0 leaked into a dropped row. The weight's gradient is the
    original's (Pixtral: the conv over the whole padded image, then the crop), NaN where its GEMM meets the NaN patch."""
    from fastvlm.ops.patch_embed import patch_embed

    monkeypatch.setenv("FASTVLM_BACKEND", path)
    x = torch.randn(1, 2, 4, 4)
    x[0, 0, 0, 0], x[0, 1, 3, 3] = math.nan, math.inf  # patches 0 and 3 of a 2x2 grid of 2x2 patches
    w = torch.randn(5, 2, 2, 2, requires_grad=True)
    keep = torch.tensor([1, 2])
    out = patch_embed(x, w, None, keep_rows=keep)
    assert (out[0, 0] == 0).all() and (out[0, 3] == 0).all(), out
    w64 = w.detach().double().requires_grad_()
    ref = torch.nn.functional.conv2d(x.double(), w64, stride=2).flatten(2).transpose(1, 2)
    tol = tolerance(torch.float32, 8)
    assert rel_err(out[0, 1:3], ref[0, 1:3]) < tol
    g = torch.randn(1, 4, 5)
    out.backward(g)
    ref[0, 1:3].backward(g[0, 1:3].double())
    assert torch.equal(w.grad.isnan(), w64.grad.isnan()) and torch.equal(w.grad.isinf(), w64.grad.isinf())
    fin = w64.grad.isfinite()
    assert rel_err(w.grad[fin], w64.grad[fin]) < tol


def test_mlp_projector_norm_groups_of_a_merged_row(monkeypatch):
    """A norm over groups of a concat row narrower than the row (and no ``norm_src``): the kernels normalise a whole
    merged row or each source row only. The kernel path raised an internal ValueError from the launcher ("rstd must
    be fp32 [2]"; fuzz pass, seed 101); it is now a kernel reason: forced Triton names it, the PyTorch path computes
    it (checked against float64)."""
    from fastvlm._dispatch import FastVLMFallbackError
    from fastvlm.ops.projector import mlp_projector

    x, w1 = torch.randn(3, 4), torch.randn(5, 8)
    rows, nw = torch.tensor([[0, 2], [1, 1]]), torch.randn(2)
    kw = dict(act="none", norm="rmsnorm", eps=1e-5, rows=rows, a_mode="concat", norm_group=2, norm_weight=nw)
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(FastVLMFallbackError, match="2-column groups of a concat row"):
        mlp_projector(x, w1, **kw)
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    y = mlp_projector(x, w1, **kw)
    a = x.double()[rows].reshape(2, 4, 2)  # merged rows in groups of 2 columns
    a = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    assert rel_err(y, a.reshape(2, 8) @ w1.double().T) < tolerance(torch.float32, 8, roundings=2)
