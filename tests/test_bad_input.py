"""Bad and edge-case input to the public ops (issue 14, sections 3-5): both paths (the PyTorch path and the kernels,
in the Triton interpreter here) behave the same and like the reference: an index table out of range is an IndexError
naming it (never a read outside ``x``), autocast is honoured or a named fallback, meta / empty / 0-width input gives
the reference's shape, no internal exception. The drop-in modules' side is tests/test_bad_input_modules.py. Small
shapes: the file runs in seconds."""
import re

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm import FastVLMFallbackError
from fastvlm.ops import _checks
from fastvlm.ops.attention import attention
from fastvlm.ops.feature_map import feature_map_projector
from fastvlm.ops.layout import space_to_depth_rows
from fastvlm.ops.linear_norm import linear_residual_layernorm
from fastvlm.ops.patch_embed import patch_embed
from fastvlm.ops.perceiver import norm_linear
from fastvlm.ops.pool import pool_tokens
from fastvlm.ops.projector import mlp_projector
from fastvlm.ops.rows_embed import rows_embed
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Both paths: the PyTorch path, and the kernels (in the interpreter on CPU)."""
    monkeypatch.setenv("FASTVLM_BACKEND", request.param)
    return request.param


# ------------------------------------------------------------------------------- section 3: silent wrong results


_AUTOCAST_CALLS = {
    "mlp_projector": lambda: mlp_projector(torch.randn(4, 8), torch.randn(6, 8), act="gelu"),
    "mlp_projector_concat": lambda: mlp_projector(torch.randn(16, 8), torch.randn(6, 32), act="gelu",
                                                  rows=space_to_depth_rows(1, 4, 4, 2), a_mode="concat"),
    "feature_map_projector": lambda: feature_map_projector(torch.randn(2, 8, 4, 4), torch.randn(6, 8)),
    "linear_residual_layernorm": lambda: linear_residual_layernorm(torch.randn(3, 8), torch.randn(6, 8),
                                                                   ln_weight=torch.randn(6)),
    "norm_linear": lambda: norm_linear(torch.randn(3, 8), torch.randn(6, 8), norm_weight=torch.randn(8)),
    "rows_embed": lambda: rows_embed(torch.randn(3, 8), torch.randn(6, 8), torch.randn(6)),
    "patch_embed": lambda: patch_embed(torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), torch.randn(6)),
    "attention": lambda: attention(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)),
}


@pytest.mark.parametrize("op", list(_AUTOCAST_CALLS))
def test_autocast_is_honoured_or_a_named_fallback(op, monkeypatch):
    """Under autocast the PyTorch path applies autocast's casts; the kernels do not, so the kernel path refuses with
    a reason (a fallback to the PyTorch path in the default mode) instead of silently returning other values."""
    call = _AUTOCAST_CALLS[op]
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = call()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16), fastvlm.trace() as t:
        again = call()
    assert torch.equal(ref, again) and t.backends() and set(t.backends()) == {"torch"}
    if op.startswith("mlp_projector") or op in ("feature_map_projector", "norm_linear", "rows_embed",
                                                "linear_residual_layernorm"):
        assert ref.dtype == torch.bfloat16  # F.linear under autocast
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(FastVLMFallbackError, match="autocast"):
        call()


# ------------------------------------------------------------------------------- section 4: index tables


def _mlp(rows, mode, x=None):
    x = torch.randn(16, 8) if x is None else x
    q = rows.shape[1]
    width = 8 * q if mode in ("concat", "concat_cm") else 8
    return mlp_projector(x, torch.randn(5, width), act="none", rows=rows, a_mode=mode)


_RANGE = "holds indices {lo}..{hi}, outside the 16 rows of x"


@pytest.mark.parametrize("bad,lo,hi", [(16, 0, 16), (-1, -1, 2), (1 << 40, 0, 1 << 40)])
@pytest.mark.parametrize("mode", ["concat", "concat_cm", "mean", "max"])
def test_mlp_projector_row_table_out_of_range(bad, lo, hi, mode, backend):
    rows = torch.tensor([[0, 1, 2, bad], [0, 1, 2, 1]])
    with pytest.raises(IndexError, match=re.escape("mlp_projector: rows " + _RANGE.format(lo=lo, hi=hi))):
        _mlp(rows, mode)


@pytest.mark.parametrize("bad,lo,hi", [(16, 0, 16), (-3, -3, 2)])
@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pool_tokens_row_table_out_of_range(bad, lo, hi, mode, backend):
    rows = torch.tensor([[0, 1, 2, bad]])
    with pytest.raises(IndexError, match=re.escape("pool_tokens: rows " + _RANGE.format(lo=lo, hi=hi))):
        pool_tokens(torch.randn(16, 8), rows, mode)


def test_layout_tables_are_trusted_by_extent(backend):
    """A table from fastvlm.ops.layout is checked by its known extent (no reduction over it): one for a larger
    grid than x holds is refused, with the same text as a scanned table."""
    rows = space_to_depth_rows(1, 4, 4, 2)
    assert _checks.trusted_extent(rows) == 16
    with pytest.raises(IndexError, match=re.escape("holds indices 0..15, outside the 12 rows of x")):
        _mlp(rows, "concat", x=torch.randn(12, 8))
    with pytest.raises(IndexError, match=re.escape("holds indices 0..15, outside the 12 rows of x")):
        pool_tokens(torch.randn(12, 8), rows, "mean")


def test_an_edited_trusted_table_is_checked_again(backend):
    rows = _checks.trust_table(torch.tensor([[0, 1, 2, 3]]), 4)
    _mlp(rows, "concat")
    rows[0, 3] = -2  # in place: the version counter moves, the trust is withdrawn
    with pytest.raises(IndexError, match=re.escape("holds indices -2..2")):
        _mlp(rows, "concat")


@pytest.mark.parametrize("mode", ["concat", "concat_cm", "mean", "max"])
def test_row_table_layout_and_dtype(mode, backend):
    """Any layout of an int64 table is taken (a transposed view equals its contiguous copy); other dtypes and shapes
    are refused naming the table, identically on both paths."""
    x = torch.randn(16, 8)
    w = torch.randn(5, 8 * 4 if mode.startswith("concat") else 8)
    rows = space_to_depth_rows(1, 4, 4, 2)
    strided = rows.t().contiguous().t()
    assert not strided.is_contiguous()
    with torch.no_grad():
        a = mlp_projector(x, w, act="none", rows=rows, a_mode=mode)
        b = mlp_projector(x, w, act="none", rows=strided, a_mode=mode)
    assert torch.equal(a, b)
    if mode in ("mean", "max"):
        assert torch.equal(pool_tokens(x, rows, mode), pool_tokens(x, strided, mode))
    for bad in (rows.to(torch.int32), rows.double(), rows[0], torch.empty(4, 0, dtype=torch.int64)):
        with pytest.raises(ValueError, match="mlp_projector: rows must"):
            mlp_projector(x, w, act="none", rows=bad, a_mode=mode)
        if mode in ("mean", "max"):
            with pytest.raises(ValueError, match="pool_tokens: rows must"):
                pool_tokens(x, bad, mode)


def test_row_table_checked_under_torch_compile(backend):
    """The values are checked inside the op, so a compiled call (the registered custom op) checks them too."""
    f = torch.compile(lambda x, r: pool_tokens(x, r, "mean"), backend="eager", fullgraph=True)
    x = torch.randn(16, 8)
    assert torch.equal(f(x, space_to_depth_rows(1, 4, 4, 2)), pool_tokens(x, space_to_depth_rows(1, 4, 4, 2)))
    with pytest.raises(IndexError, match=re.escape("pool_tokens: rows " + _RANGE.format(lo=0, hi=99))):
        f(x, torch.tensor([[0, 1, 2, 99]]))


@pytest.mark.parametrize("bad,lo,hi", [(9, 0, 9), (-1, -1, 2)])
def test_patch_embed_position_rows_out_of_range(bad, lo, hi, backend):
    px, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4)
    pos = torch.randn(4, 6)
    with pytest.raises(IndexError, match=re.escape(f"patch_embed: pos_rows holds rows {lo}..{hi} of a 4-row")):
        patch_embed(px, w, pos=pos, pos_rows=torch.tensor([0, 1, 2, bad]))
    with pytest.raises(ValueError, match="patch_embed: pos_rows must be an int64"):
        patch_embed(px, w, pos=pos, pos_rows=torch.tensor([0.0, 1, 2, 3]))
    with pytest.raises(IndexError, match="keep_rows must index the 8 patches"):
        patch_embed(px, w, keep_rows=torch.tensor([0, bad if bad > 0 else 8]))


# ------------------------------------------------------------------------------- section 5: internal exceptions


@pytest.mark.parametrize("mode", ["concat", "concat_cm", "mean", "max"])
@pytest.mark.parametrize("norm", ["none", "layernorm"])
def test_zero_output_rows(mode, norm, backend):
    """An empty row table gives [0, out] on both paths (the PyTorch path's reshape had an ambiguous -1)."""
    if norm != "none" and mode == "max":
        pytest.skip("max pooling takes no norm")
    width = 32 if mode.startswith("concat") else 8
    kw = dict(norm=norm, norm_weight=torch.randn(width), norm_bias=torch.randn(width)) if norm != "none" else {}
    x = torch.randn(16, 8, requires_grad=True)
    y = mlp_projector(x, torch.randn(5, width), act="gelu", rows=torch.empty(0, 4, dtype=torch.int64), a_mode=mode,
                      **kw)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gated_single_linear_backward(backend):
    """``gated=True`` without linear_2: backward needs h, which was never saved (AttributeError before)."""
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    for act in ("none", "silu"):
        y = mlp_projector(x, w, act=act, gated=True)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        up, gate = F.linear(x64, w64).chunk(2, dim=-1)
        ref = (F.silu(gate) if act == "silu" else gate) * up
        assert_close(y, ref, torch.float32, 8, roundings=2)
        rx, rw = torch.autograd.grad(ref, (x64, w64), g.double())
        assert_close(gx, rx, torch.float32, 12, roundings=3, what="x gradient")
        assert_close(gw, rw, torch.float32, 5, roundings=3, what="w gradient")


def test_zero_dim_input_is_named(backend):
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="mlp_projector: x must have a feature dimension"):
        mlp_projector(s, torch.randn(5, 8), act="none")
    with pytest.raises(ValueError, match="linear_residual_layernorm: x and residual need a feature dimension"):
        linear_residual_layernorm(s, torch.randn(6, 8), ln_weight=torch.randn(6))
    with pytest.raises(ValueError, match="norm_linear: x and residual need a feature dimension"):
        norm_linear(s, torch.randn(6, 8))
    with pytest.raises(ValueError, match="mlp_projector: x must be 2-D"):
        mlp_projector(torch.randn(8), torch.randn(5, 32), act="none", rows=space_to_depth_rows(1, 4, 4, 2),
                      a_mode="concat")
    # 1-D input is a single row, as for F.linear
    w = torch.randn(5, 8)
    v = torch.randn(8)
    assert_close(mlp_projector(v, w, act="none"), F.linear(v.double(), w.double()), torch.float32, 8)


def test_zero_width_inputs_like_f_linear(backend):
    """K = 0 features: F.linear gives the bias (the ops' reshape(-1, 0) was ambiguous); 0 output features; a pool over
    rows of 0 features (a division by zero in the kernel's launcher); a conv with 0 output channels."""
    x0, b = torch.randn(4, 0), torch.randn(5)
    assert torch.equal(mlp_projector(x0, torch.randn(5, 0), b, act="none"), F.linear(x0, torch.randn(5, 0), b))
    assert torch.equal(mlp_projector(torch.randn(2, 3, 0), torch.randn(5, 0), b, act="none"), b.expand(2, 3, 5))
    assert linear_residual_layernorm(x0, torch.randn(6, 0), ln_weight=torch.randn(6)).shape == (4, 6)
    assert torch.equal(norm_linear(x0, torch.randn(6, 0)), torch.zeros(4, 6))
    assert torch.equal(feature_map_projector(torch.randn(2, 0, 4, 4), torch.randn(6, 0), b[:1].expand(6)),
                       b[:1].expand(2, 16, 6))
    assert mlp_projector(torch.randn(4, 8), torch.randn(0, 8), act="gelu").shape == (4, 0)
    assert pool_tokens(torch.randn(4, 0), torch.tensor([[0, 1]]), "max").shape == (1, 0)
    assert pool_tokens(torch.randn(4, 3), torch.empty(0, 2, dtype=torch.int64), "mean").shape == (0, 3)
    assert patch_embed(torch.randn(2, 3, 8, 8), torch.randn(0, 3, 4, 4)).shape == (2, 4, 0)
    with pytest.raises(ValueError, match="head_dim 0"):
        attention(torch.randn(1, 2, 3, 0), torch.randn(1, 2, 5, 0), torch.randn(1, 2, 5, 0))


def _strided(n):
    return torch.randn(n, 2)[:, 0]  # every other element


def _expanded(n):
    return torch.randn(1).expand(n)  # stride 0


_VECTOR_CALLS = {  # (call(make_vector, make_table), ...): biases / norm weights / position tables of any strides
    "mlp_projector": lambda v, t: mlp_projector(
        torch.randn(4, 8), torch.randn(6, 8), v(6), torch.randn(5, 6), v(5), act="gelu", norm="layernorm",
        norm_weight=v(8), norm_bias=v(8)),
    "mlp_projector_concat_rmsnorm": lambda v, t: mlp_projector(
        torch.randn(16, 8), torch.randn(6, 32), v(6), act="gelu", norm="rmsnorm", norm_weight=v(32),
        rows=space_to_depth_rows(1, 4, 4, 2), a_mode="concat"),
    "feature_map_projector": lambda v, t: feature_map_projector(torch.randn(2, 8, 4, 4), torch.randn(6, 8), v(6)),
    "linear_residual_layernorm": lambda v, t: linear_residual_layernorm(torch.randn(3, 8), torch.randn(6, 8), v(6),
                                                                       None, v(6), v(6)),
    "norm_linear": lambda v, t: norm_linear(torch.randn(3, 8), torch.randn(6, 8), norm_weight=v(8)),
    "rows_embed": lambda v, t: rows_embed(torch.randn(3, 8), torch.randn(6, 8), v(6), pos=t(4, 6),
                                          pos_idx=torch.tensor([[0], [1], [3]]), pos_weights=torch.ones(3, 1)),
    "patch_embed": lambda v, t: patch_embed(torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4), v(6), pos=t(5, 6),
                                            pos_rows=torch.arange(4), cls=v(6), norm_weight=v(6), norm_bias=v(6)),
}


@pytest.mark.parametrize("op", list(_VECTOR_CALLS))
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_vectors_of_any_strides(op, layout, backend):
    """A strided bias was read as a dense one by the kernels (a silently wrong result), an expanded one past its
    storage; position tables with a column stride were refused by the kernel path only. Both paths now take them."""
    v = _strided if layout == "strided" else _expanded
    call = _VECTOR_CALLS[op]
    torch.manual_seed(1)
    out = call(v, lambda a, b: torch.randn(b, a).t())
    torch.manual_seed(1)
    ref = call(lambda n: v(n).contiguous(), lambda a, b: torch.randn(b, a).t().contiguous())
    assert torch.equal(out, ref)


def test_patch_embed_checks_devices_before_the_kernel(monkeypatch):
    """Weights on another device than the pixels: a reason naming them (the launch failed inside Triton before)."""
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(FastVLMFallbackError, match="weight is on meta but the pixels on cpu"):
        patch_embed(torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4, device="meta"))


_META_CALLS = {
    "mlp_projector": (lambda d: mlp_projector(torch.randn(16, 8, device=d), torch.randn(6, 32, device=d),
                                              rows=space_to_depth_rows(1, 4, 4, 2, d), a_mode="concat"), (4, 6)),
    "pool_tokens": (lambda d: pool_tokens(torch.randn(16, 8, device=d), space_to_depth_rows(1, 4, 4, 2, d)), (4, 8)),
    "feature_map_projector": (lambda d: feature_map_projector(torch.randn(2, 8, 4, 4, device=d),
                                                              torch.randn(6, 8, device=d), pool=2), (2, 4, 6)),
    "linear_residual_layernorm": (lambda d: linear_residual_layernorm(
        torch.randn(3, 8, device=d), torch.randn(6, 8, device=d), ln_weight=torch.randn(6, device=d)), (3, 6)),
    "norm_linear": (lambda d: norm_linear(torch.randn(3, 8, device=d), torch.randn(6, 8, device=d),
                                          norm_weight=torch.randn(8, device=d)), (3, 6)),
    "rows_embed": (lambda d: rows_embed(torch.randn(3, 8, device=d), torch.randn(6, 8, device=d)), (3, 6)),
    "patch_embed": (lambda d: patch_embed(torch.randn(2, 3, 8, 8, device=d), torch.randn(6, 3, 4, 4, device=d),
                                          cls=torch.randn(6, device=d)), (2, 5, 6)),
    "attention": (lambda d: attention(torch.randn(1, 2, 3, 16, device=d), torch.randn(1, 2, 5, 16, device=d),
                                      torch.randn(1, 2, 5, 16, device=d)), (1, 3, 2, 16)),
}


@pytest.mark.parametrize("op", list(_META_CALLS))
def test_meta_tensors_answered_by_the_fake(op, backend):
    """Meta input (shape tracing) runs no backend: the op's fake answers on both paths, with the CPU result's shape."""
    call, shape = _META_CALLS[op]
    with fastvlm.trace() as t:
        y = call("meta")
    assert y.device.type == "meta" and tuple(y.shape) == shape and not t.records, str(t)
    assert tuple(call("cpu").shape) == shape


@pytest.mark.parametrize("scale", [0.0, -0.5, float("inf")])
def test_attention_scale_outside_the_kernel_range(scale, monkeypatch):
    """Eager attention takes any scale; so does the op: the PyTorch path computes it, the kernel path names the reason
    (a fallback in the default mode) instead of raising its own ValueError."""
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    out = attention(q, k, v, scale=scale)
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, -1) @ v.double()
    assert torch.allclose(out, ref.transpose(1, 2).float(), atol=1e-5, equal_nan=True)
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(FastVLMFallbackError, match="is not positive and finite"):
        attention(q, k, v, scale=scale)


def test_feature_map_without_rows_like_the_glue(backend):
    """A 0 x W map flattens to 0 tokens (the eager glue accepts it; the op refused it)."""
    x, w = torch.randn(2, 8, 0, 4), torch.randn(6, 8)
    y = feature_map_projector(x, w)
    assert y.shape == F.linear(x.flatten(2).transpose(1, 2), w).shape == (2, 0, 6)
    with pytest.raises(ValueError, match="pool window 2x2 does not fit"):
        feature_map_projector(x, w, pool=2)


# ------------------------------------------------------------------------------- on a GPU: no host synchronisation


@pytest.mark.gpu
def test_device_tables_are_checked_without_a_host_synchronisation():
    """A user table on the GPU is checked by a device-side assert; a layout table by its extent. Neither syncs."""
    x = torch.randn(16, 8, device="cuda")
    user = torch.tensor([[0, 1, 2, 3]], device="cuda")
    trusted = space_to_depth_rows(1, 4, 4, 2, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in (user, trusted):
            _checks.check_indices("mlp_projector", "rows", _checks.row_table("mlp_projector", rows, x), 16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(IndexError, match=re.escape("holds indices 0..15, outside the 12 rows of x")):
        _checks.check_indices("mlp_projector", "rows", trusted, 12)


@pytest.mark.gpu
def test_device_table_out_of_range_trips_the_device_assert():
    """An out-of-range GPU table stops the op with a device-side assert (in a child process: it ends the context)."""
    import subprocess
    import sys

    code = ("import torch\nfrom fastvlm.ops.pool import pool_tokens\n"
            "pool_tokens(torch.randn(16, 8, device='cuda'), torch.tensor([[0, 1, 2, 16]], device='cuda'), 'mean')\n"
            "torch.cuda.synchronize()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "assert" in r.stderr.lower(), r.stderr[-2000:]
