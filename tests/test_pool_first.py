"""Pool first: past one N tile, a pooled projector ("mean"/"max" A-modes) pools its input in one pass and runs the
plain GEMM on the pooled rows (fewer bytes than re-reading all Q source rows per N tile). The result must equal the
fused-load design's (the pooled value is rounded to the input dtype in both) and the float64 reference, on both
sides of the switch, with gradients."""
import pytest
import torch

from fastvlm.ops import projector as proj
from fastvlm.ops.layout import gather_ref, pool_rows
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.projector import norm_ref
from helpers import assert_close


def _case(mode, N, dtype, B=2, H=4, W=4, D=24):
    x = (torch.randn(B * H * W, D) * 2 + 0.5).to(dtype)
    rows = pool_rows(B, H, W, 2)
    w = (torch.randn(N, D) * D ** -0.5).to(dtype)
    nw = (torch.randn(D) * 0.5).to(dtype)
    return x, rows, w, nw


def _spy(monkeypatch):
    import fastvlm.kernels.pool as kpool

    calls = []
    real = kpool.pool_rows

    def spy(x, rows, mode):
        calls.append(mode)
        return real(x, rows, mode)

    monkeypatch.setattr(kpool, "pool_rows", spy)
    return calls


@pytest.mark.parametrize("N", [proj.POOL_FIRST_MIN_N - 1, proj.POOL_FIRST_MIN_N + 31])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_rmsnorm_1p(triton_backend, monkeypatch, N, dtype):
    """Gemma 3's projector: 2x2 average pool, RMSNorm(1 + w) over the pooled row, matmul."""
    calls = _spy(monkeypatch)
    x, rows, w, nw = _case("mean", N, dtype)
    x.requires_grad_(True)
    out = mlp_projector(x, w, act="none", norm="rmsnorm_1p", norm_weight=nw, rows=rows, a_mode="mean", eps=1e-6)
    assert calls == (["mean"] if N >= proj.POOL_FIRST_MIN_N else [])
    a = gather_ref(x.detach().double(), rows, "mean").to(dtype).double()
    ref = norm_ref(a, "rmsnorm_1p", nw.double(), None, a.shape[1], 1e-6) @ w.double().T
    assert_close(out, ref, dtype, a.shape[1], roundings=3)
    # gradients go through the original x and rows (the backward never sees the pooled copy)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    xr = x.detach().clone().requires_grad_(True)
    out_t = mlp_projector(xr, w, act="none", norm="rmsnorm_1p", norm_weight=nw, rows=rows, a_mode="mean", eps=1e-6)
    (gxr,) = torch.autograd.grad(out_t, xr, g)
    assert_close(gx, gxr.double(), dtype, a.shape[1], roundings=4, what="grad x")


@pytest.mark.parametrize("N", [proj.POOL_FIRST_MIN_N - 1, proj.POOL_FIRST_MIN_N + 31])
def test_max_gelu(triton_backend, monkeypatch, N):
    """LLaVA-NeXT-Video-style max pooling feeding a Linear-GELU."""
    calls = _spy(monkeypatch)
    x, rows, w, _ = _case("max", N, torch.float32)
    b = torch.randn(N)
    out = mlp_projector(x, w, b, act="gelu", rows=rows, a_mode="max")
    assert calls == (["max"] if N >= proj.POOL_FIRST_MIN_N else [])
    a = gather_ref(x.double(), rows, "max")
    assert_close(out, torch.nn.functional.gelu(a @ w.double().T + b.double()), torch.float32, a.shape[1],
                 roundings=2)
