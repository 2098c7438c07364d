"""linear_norm's two variants (kernels/linear_norm.py single pass, kernels/linear_norm_split.py split-N) against the
float64 reference, the variant heuristic, and the fp32 dot precision the GEMM-shaped kernels pick (issue 12)."""
import pytest
import torch

from fastvlm.reference.linear_norm import linear_norm_eager, linear_norm_ref
from fastvlm.testing import rel_err, tolerance
from helpers import Guarded, assert_close


def _inputs(M, K, N, dtype, offset=0.0):
    a = torch.randn(M, K)
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N)
    r = torch.randn(M, N) + offset
    g = 1 + 0.1 * torch.randn(N)
    beta = 0.1 * torch.randn(N)
    return tuple(t.to(dtype) for t in (a, w, b, r, g, beta))


@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 70, 100), (130, 24, 72)])  # (M, K, N): ragged tiles; 3 row tiles
def test_variants_match_float64(split, dtype, shape, triton_backend):
    from fastvlm.kernels.linear_norm import linear_norm

    M, K, N = shape
    a, w, b, r, g, beta = _inputs(M, K, N, dtype)
    ga, gw, gr = (Guarded(t.shape, dtype, "cpu", fill=t) for t in (a, w, r))
    out = Guarded((M, N), dtype, "cpu")
    linear_norm(ga.tensor, gw.tensor, b, gr.tensor, g, beta, 1e-12, split=split, out=out.tensor)
    for name, t in (("a", ga), ("w", gw), ("residual", gr), ("out", out)):
        t.check(name)  # nothing read or written outside the tensors
    assert_close(out.tensor, linear_norm_ref(a, w, b, r, g, beta, 1e-12), dtype, K, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_every_config_strided_and_offset(dtype, triton_backend):
    """Every split tile shape, a strided view of a, a transposed out with NaN margins, and rows with |mean| >> std
    (the tiles' statistics merged by Chan's formula: no sum-of-squares cancellation)."""
    from fastvlm.kernels.linear_norm import linear_norm
    from fastvlm.kernels.linear_norm_split import SPLIT_CONFIGS

    M, K, N = 20, 40, 72
    a, w, b, r, g, beta = _inputs(M, K, N, dtype, offset=300.0)
    big = torch.randn(M, 2 * K, dtype=dtype)
    big[:, 3:3 + K] = a
    ref = linear_norm_ref(a, w, b, r, g, beta, 1e-6)
    bound = 2 * rel_err(linear_norm_eager(a.float(), w.float(), b.float(), r.float(), g.float(), beta.float(), 1e-6),
                        ref) + tolerance(dtype, K, 2)
    if dtype != torch.float32:  # rounding h ~ 300 to the dtype costs eps * |mean| / std (eager has it too)
        bound += 2 * torch.finfo(dtype).eps * 300 / 1.4
    for cfg in SPLIT_CONFIGS:
        store = torch.full((N, M + 3), float("nan"), dtype=dtype)
        y = linear_norm(big[:, 3:3 + K], w, b, r, g, beta, 1e-6, config=cfg, split=True, out=store[:, :M].t())
        assert torch.isnan(store[:, M:]).all(), cfg
        assert rel_err(y, ref) <= bound, (cfg, rel_err(y, ref), bound)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf, on purpose
@pytest.mark.parametrize("split", [False, True], ids=["single", "split"])
def test_nonfinite_rows_as_eager(split, triton_backend):
    """NaN in a row of a, +Inf and -Inf in the residual, +Inf in a: those rows are NaN (the mean or the deviations are
    not finite), as in eager; every other row finite. Bias absent, no LayerNorm bias."""
    from fastvlm.kernels.linear_norm import linear_norm

    M, K, N = 70, 16, 40
    a, w, _, r, g, _ = _inputs(M, K, N, torch.float32)
    a[3, 5] = float("nan")
    a[66, 0] = float("inf")
    r[10, 7] = float("inf")
    r[40, 39] = -float("inf")
    y = linear_norm(a, w, None, r, g, None, 1e-5, split=split)
    ref = linear_norm_eager(a.double(), w.double(), None, r.double(), g.double(), None, 1e-5)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    assert torch.isnan(y[[3, 10, 40, 66]]).all() and torch.isfinite(ref).sum() == (M - 4) * N
    keep = torch.isfinite(ref)
    assert_close(y[keep], ref[keep].float(), torch.float32, K, roundings=2)


def test_variant_heuristic():
    """The single pass runs where its cdiv(M, 64) programs fill >= 85% of the SMs' waves; otherwise the split."""
    from fastvlm.kernels import linear_norm as LN

    assert LN.single_pass_fill(32, 132) == 1 / 132  # BLIP-2 B=1
    assert LN.single_pass_fill(256, 132) == 4 / 132  # B=8
    assert LN.single_pass_fill(64 * 132, 132) == 1.0
    assert LN.single_pass_fill(64 * 133, 132) == 133 / 264
    assert LN.single_pass_fill(64 * 250, 132) == 250 / 264
    x = torch.empty(1)
    assert LN.num_sms(x) == LN.H100_SMS
    for M, split in ((256, True), (64 * 132, False), (64 * 133, True), (64 * 250, False)):
        assert (LN.single_pass_fill(M, LN.num_sms(x)) < LN.SINGLE_PASS_MIN_FILL) == split


def test_default_picks_the_variant(triton_backend, monkeypatch):
    """split=None: the heuristic's variant (forced to the single pass by a 1-SM device)."""
    from fastvlm.kernels import linear_norm as LN

    a, w, b, r, g, beta = _inputs(9, 16, 24, torch.float32)
    ref = linear_norm_ref(a, w, b, r, g, beta, 1e-5)
    LN._CALLS.clear()
    assert_close(LN.linear_norm(a, w, b, r, g, beta, 1e-5), ref, torch.float32, 16, roundings=2)
    assert [type(c).__name__ for c in LN._CALLS.values()] == ["_SplitCall"]
    monkeypatch.setattr(LN, "H100_SMS", 1)
    LN._CALLS.clear()
    assert_close(LN.linear_norm(a, w, b, r, g, beta, 1e-5), ref, torch.float32, 16, roundings=2)
    assert [type(c).__name__ for c in LN._CALLS.values()] == ["Call"]


# ------------------------------------------------------------------------------------------------ fp32 precision


@pytest.fixture
def tf32_state():
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.fp32_precision = "none"  # (torch >= 2.9; undoes the new API before the legacy flag)
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_precision_rule(tf32_state, monkeypatch):
    from fastvlm import _hot

    monkeypatch.delenv("FASTVLM_FP32_PRECISION", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    assert _hot.fp32_precision() == "tf32x3"
    torch.backends.cuda.matmul.allow_tf32 = True
    assert _hot.fp32_precision() == "tf32"
    for value in ("ieee", "tf32x3", "tf32"):  # the variable, when set, decides
        monkeypatch.setenv("FASTVLM_FP32_PRECISION", value)
        assert _hot.fp32_precision() == value
    monkeypatch.setenv("FASTVLM_FP32_PRECISION", "fp64")
    with pytest.raises(ValueError, match="FASTVLM_FP32_PRECISION must be one of"):
        _hot.fp32_precision()
    monkeypatch.delenv("FASTVLM_FP32_PRECISION")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # torch's new API: the legacy reader raises on the mix
    assert _hot.allow_tf32() is True and _hot.fp32_precision() == "tf32"


def test_gemm_and_linear_norm_default_to_tf32x3(tf32_state, monkeypatch, triton_backend):
    """The precision the launchers key and launch with: tf32x3 unless TF32 is allowed or ieee requested; 16-bit
    inputs ignore it. (The interpreter computes every precision exactly: the numbers are the GPU's to check.)"""
    from fastvlm.kernels import gemm, linear_norm as LN

    seen = []
    real = gemm._prepare
    monkeypatch.setattr(gemm, "_prepare", lambda *a, **k: seen.append(k["precision"]) or real(*a, **k))
    monkeypatch.delenv("FASTVLM_FP32_PRECISION", raising=False)
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    gemm._CALLS.clear()
    assert_close(gemm.fused_linear(x, w), (x.double() @ w.double().t()), torch.float32, 16)
    gemm.fused_linear(x.bfloat16(), w.bfloat16())
    monkeypatch.setenv("FASTVLM_FP32_PRECISION", "ieee")
    gemm.fused_linear(x, w)
    assert seen == ["tf32x3", "ieee", "ieee"]
    LN._CALLS.clear()
    g = torch.ones(8)
    LN.linear_norm(x, w, ln_weight=g)
    monkeypatch.delenv("FASTVLM_FP32_PRECISION")
    LN.linear_norm(x, w, ln_weight=g)
    torch.backends.cuda.matmul.allow_tf32 = True
    LN.linear_norm(x, w, ln_weight=g)
    assert [k[1] for k in LN._CALLS] == ["ieee", "tf32x3", "tf32"]
