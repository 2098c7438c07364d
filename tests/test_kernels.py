"""The Triton kernels themselves, under the interpreter on CPU (or on the GPU when there is one).

Small ragged shapes (no dimension a multiple of the tile, a single row, K not a multiple of BLOCK_K), every dtype,
float64 references, inputs and outputs inside poisoned (NaN) margins, and the interpreter's bounds checker on.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import Guarded, assert_close, guarded_copy, rel_err
from fastvlm.reference.activations import act_ref
from fastvlm.reference.projector import norm_ref, norm_stats_ref

from fastvlm.kernels.gemm import GEMM_CONFIGS, fused_linear  # noqa: E402
from fastvlm.kernels.gemm_configs import FP32_GEMM_CONFIGS  # noqa: E402
from fastvlm.kernels.norm_stats import row_stats  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 40, 24), (37, 80, 50), (70, 200, 72)]  # (M, K, N)
SMALL = (32, 32, 32, 4, 1)  # a tile smaller than the shapes, so every edge is ragged


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, device=device) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ["gelu", "none"])
def test_linear_act_store_pre(device, dtype, shape, act):
    M, K, N = shape
    a = guarded_copy(_rand((M, K), dtype, device))
    w = guarded_copy(_rand((N, K), dtype, device, K ** -0.5))
    b = _rand((N,), dtype, device)
    out = Guarded((M, N), dtype, device)
    pre = Guarded((M, N), dtype, device)
    fused_linear(a.tensor, w.tensor, b, act=act, store_pre=True, out=out.tensor, pre=pre.tensor, config=SMALL)
    h64 = a.tensor.double() @ w.tensor.double().T + b.double()
    assert_close(pre.tensor, h64, dtype, K, what="pre-activation")
    assert_close(out.tensor, act_ref(h64, act), dtype, K, what="output")
    for g, name in ((a, "a"), (w, "w"), (out, "out"), (pre, "pre")):
        g.check(name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu_tanh", "quick_gelu", "silu", "relu"])
def test_activations(device, dtype, act):
    M, K, N = 37, 80, 50
    a, w, b = _rand((M, K), dtype, device), _rand((N, K), dtype, device, K ** -0.5), _rand((N,), dtype, device)
    out = fused_linear(a, w, b, act=act, config=SMALL)
    assert_close(out, act_ref(a.double() @ w.double().T + b.double(), act), dtype, K)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("group", [32, 24, 200])  # 32: one statistic per K tile; 24 and 200 straddle tiles
def test_norm_prologue(device, dtype, norm, group):
    M, K, N = 37, 200 if group == 200 else 120, 50
    if K % group:
        K = group * 5
    x = guarded_copy(_rand((M, K), dtype, device) * 3 + 1)
    nw = _rand((group,), dtype, device)
    nb = _rand((group,), dtype, device) if norm == "layernorm" else None
    w = _rand((N, K), dtype, device, K ** -0.5)
    b = _rand((N,), dtype, device)
    mean, rstd = row_stats(x.tensor.view(-1, group), 1e-6, norm == "rmsnorm")
    ref_mean, ref_rstd = norm_stats_ref(x.tensor, norm, group, 1e-6)
    assert rel_err(rstd, ref_rstd) < 1e-5
    if norm == "layernorm":
        assert (mean - ref_mean).abs().max() < 1e-5 * (1 + ref_mean.abs().max())
    out = Guarded((M, N), dtype, device)
    fused_linear(x.tensor, w, b, act="gelu", norm=norm, norm_group=group, mean=mean, rstd=rstd, norm_weight=nw,
                 norm_bias=nb, out=out.tensor, config=(16, 32, 32, 4, 1))
    xn64 = norm_ref(x.tensor.double(), norm, nw.double(), None if nb is None else nb.double(), group, 1e-6)
    ref = F.gelu(xn64 @ w.double().T + b.double())
    assert_close(out.tensor, ref, dtype, K, roundings=3)
    x.check("x")
    out.check("out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_pair_and_residual(device, dtype):
    M, K, N = 37, 80, 50
    a = _rand((M, K), dtype, device)
    wg, wu = _rand((N, K), dtype, device, K ** -0.5), _rand((N, K), dtype, device, K ** -0.5)
    bg, bu, res = _rand((N,), dtype, device), _rand((N,), dtype, device), _rand((M, N), dtype, device)
    out = Guarded((M, N), dtype, device)
    fused_linear(a, wg, bg, act="silu", up_weight=wu, up_bias=bu, residual=res, out=out.tensor, config=SMALL)
    a64 = a.double()
    ref = F.silu(a64 @ wg.double().T + bg.double()) * (a64 @ wu.double().T + bu.double()) + res.double()
    assert_close(out.tensor, ref, dtype, K, roundings=2)
    out.check("out")


@pytest.mark.parametrize("config", GEMM_CONFIGS + FP32_GEMM_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def test_every_autotune_tile(device, config):
    """Each production tile shape on a ragged problem (the interpreter otherwise only runs the first config): the
    16-bit rows in bf16, the fp32 rows (BLOCK_K 32) in fp32."""
    M, K, N = 130, 72, 136
    dtype = torch.float32 if config in FP32_GEMM_CONFIGS else torch.bfloat16
    a, w, b = _rand((M, K), dtype, device), _rand((N, K), dtype, device, K ** -0.5), _rand((N,), dtype, device)
    out = Guarded((M, N), dtype, device)
    fused_linear(a, w, b, act="gelu", out=out.tensor, config=config)
    assert_close(out.tensor, F.gelu(a.double() @ w.double().T + b.double()), dtype, K)
    out.check("out")


def test_strided_views(device):
    """A transposed weight and a row-strided A (Qwen2-VL's merge view) are read in place."""
    M, K, N = 19, 48, 40
    dtype = torch.float32
    big = _rand((M, 2 * K), dtype, device)
    a = big[:, :K]  # row stride 2K
    w = _rand((K, N), dtype, device, K ** -0.5).t()  # column-major weight
    out = fused_linear(a, w, None, act="none", config=SMALL)
    assert_close(out, a.double() @ w.double().T, dtype, K)


def test_autotuned_launch(device):
    """The autotuner path (first config under the interpreter) agrees with the reference."""
    M, K, N = 33, 96, 70
    a, w = _rand((M, K), torch.float16, device), _rand((N, K), torch.float16, device, K ** -0.5)
    assert_close(fused_linear(a, w, act="gelu"), F.gelu(a.double() @ w.double().T), torch.float16, K)


def test_empty_rows(device):
    a = torch.empty((0, 16), device=device)
    w = torch.randn(8, 16, device=device)
    assert fused_linear(a, w).shape == (0, 8)


def test_launcher_rejects_bad_shapes(device):
    a = torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear(a, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="act must be"):
        fused_linear(a, torch.randn(8, 16, device=device), act="mish")
    with pytest.raises(ValueError, match="norm_group must divide"):
        fused_linear(a, torch.randn(8, 16, device=device), norm="layernorm", norm_group=5)


def test_out_of_bounds_is_caught(device):
    """The bounds checker is live: a kernel that reads past its argument must fail, not read host memory."""
    if device != "cpu":
        pytest.skip("the bounds checker is an interpreter feature")
    import triton
    import triton.language as tl


    @triton.jit
    def _copy16(x_ptr, y_ptr, n, MASKED: tl.constexpr):
        offs = tl.arange(0, 16)
        if MASKED:
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n, other=0.0), mask=offs < n)
        else:
            tl.store(y_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)

    x, y = torch.randn(10), torch.empty(10)
    _copy16[(1,)](x, y, 10, MASKED=True)
    assert torch.equal(x, y)
    with pytest.raises(Exception, match="OutOfBoundsAccess.*load: 6 lane"):  # wrapped in InterpreterError
        _copy16[(1,)](x, y, 10, MASKED=False)
