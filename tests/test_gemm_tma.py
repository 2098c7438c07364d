"""The Hopper GEMM core (kernels/gemm_tma.py) under the interpreter (which runs host tensor descriptors, the
persistent loop, the split-K tail's atomics and partials), against float64 references with poisoned margins; its
dispatch from ``fused_linear`` and the wave arithmetic of its schedule."""
import pytest
import torch
import torch.nn.functional as F

from helpers import Guarded, assert_close, guarded_copy
from fastvlm.reference.activations import act_ref
from fastvlm.reference.projector import norm_ref

from fastvlm.kernels import gemm, gemm_tma_plan as tp, gemm_tma_schedule as ts  # noqa: E402
from fastvlm.kernels.norm_stats import row_stats  # noqa: E402

TEST_CFG = (32, 32, 64, 4, 1)  # small tiles, so 70 x 100 makes 12 ragged tiles and K = 200 four ragged K steps


def _rand(shape, dtype, scale=1.0):
    return (torch.randn(shape) * scale).to(dtype)


@pytest.fixture
def tma(monkeypatch):
    """The TMA core forced on (the interpreter), with small tiles; ``sms(n)`` sets the SM count the schedule fills."""
    monkeypatch.setenv("FASTVLM_GEMM_CORE", "tma")
    monkeypatch.setattr(ts, "TMA_CONFIGS", [TEST_CFG])
    monkeypatch.setattr(ts, "NORM_CONFIGS", {TEST_CFG})
    monkeypatch.setattr(ts, "MIN_K_TILES_PER_SPLIT", 1)
    gemm._CALLS.clear()
    yield lambda n: monkeypatch.setattr(ts, "H100_SMS", n)
    gemm._CALLS.clear()


def _core(M, N, K):
    calls = [c for c in gemm._CALLS.values() if isinstance(c, tp.TmaCall) and (c.M, c.N, c.K) == (M, N, K)]
    assert calls, "the TMA core did not take this call"
    return calls[-1]


# sms: 12 tiles on 4 SMs (3 whole waves), on 8 (one wave + 4 tail tiles split 2-way), on 5 (2 waves + 2 tail tiles
# split 2-way) and on 64 (under one wave: every tile split 4-way)
@pytest.mark.parametrize("dtype,sms,split", [(torch.bfloat16, 8, 2), (torch.bfloat16, 64, 4), (torch.float16, 4, 1),
                                             (torch.float16, 5, 2)])
def test_parity_bias_gelu_pre(tma, dtype, sms, split):
    tma(sms)
    M, K, N = 70, 200, 100
    a = guarded_copy(_rand((M, K), dtype))
    w = guarded_copy(_rand((N, K), dtype, K ** -0.5))
    b = _rand((N,), dtype)
    out, pre = Guarded((M, N), dtype, "cpu"), Guarded((M, N), dtype, "cpu")
    with torch.no_grad():
        gemm.fused_linear(a.tensor, w.tensor, b, act="gelu", store_pre=True, out=out.tensor, pre=pre.tensor)
    call = _core(M, N, K)
    assert call.sched[2] == split and call.grid[0] == min(sms, call.sched[1] + (12 - call.sched[1]) * split)
    h64 = a.tensor.double() @ w.tensor.double().T + b.double()
    assert_close(pre.tensor, h64, dtype, K, what="pre-activation")
    assert_close(out.tensor, act_ref(h64, "gelu"), dtype, K)
    for g, name in ((a, "a"), (w, "w"), (out, "out"), (pre, "pre")):
        g.check(name)


@pytest.mark.parametrize("sms", [5, 64])
def test_residual_strided_out(tma, sms):
    tma(sms)
    dtype, M, K, N = torch.bfloat16, 70, 200, 100
    a, w = _rand((M, K), dtype), _rand((N, K), dtype, K ** -0.5)
    res = _rand((M, N), dtype)
    wide = Guarded((M, 2 * N), dtype, "cpu")
    out = wide.tensor[:, 1::2]  # unit-free output strides
    gemm.fused_linear(a, w, None, act="silu", residual=res, out=out)
    _core(M, N, K)
    ref = act_ref(a.double() @ w.double().T, "silu") + res.double()
    assert_close(out, ref, dtype, K, roundings=2)
    assert torch.isnan(wide.tensor[:, 0::2].float()).all()
    wide.check("out")


@pytest.mark.parametrize("norm,group", [("layernorm", 64), ("rmsnorm", 128)])
def test_norm_prologue(tma, norm, group):
    tma(64)
    dtype, M, K, N = torch.bfloat16, 37, 256, 50
    x = guarded_copy(_rand((M, K), dtype) * 3 + 1)
    nw = _rand((group,), dtype)
    nb = _rand((group,), dtype) if norm == "layernorm" else None
    w, b = _rand((N, K), dtype, K ** -0.5), _rand((N,), dtype)
    mean, rstd = row_stats(x.tensor.view(-1, group), 1e-6, norm == "rmsnorm")
    out = gemm.fused_linear(x.tensor, w, b, act="gelu", norm=norm, norm_group=group, mean=mean, rstd=rstd,
                            norm_weight=nw, norm_bias=nb)
    _core(M, N, K)
    xn64 = norm_ref(x.tensor.double(), norm, nw.double(), None if nb is None else nb.double(), group, 1e-6)
    assert_close(out, F.gelu(xn64 @ w.double().T + b.double()), dtype, K, roundings=3)
    x.check("x")


def test_misaligned_base_and_repeat(tma):
    """A view at an odd element offset is copied to aligned memory for the descriptor; a repeat call of the key
    (same shapes, new data) reuses the call and gives the new result; the trace names the core."""
    import fastvlm

    tma(8)
    dtype, M, K, N = torch.float16, 70, 200, 100
    buf = _rand((M * K + 1,), dtype)
    a = buf[1:].view(M, K)
    assert a.data_ptr() % 16
    w = _rand((N, K), dtype, K ** -0.5)
    padded = _rand((M * 208 + 1,), dtype)[1:].view(M, 208)[:, :K]  # and rows padded to 208 (416 bytes)
    assert_close(gemm.fused_linear(padded, w, None), padded.double() @ w.double().T, dtype, K)
    assert [type(c) for c in gemm._CALLS.values()] == [tp.TmaCall]  # the padded rows on the TMA core
    out = gemm.fused_linear(a, w, None)
    assert_close(out, a.double() @ w.double().T, dtype, K)
    a2 = _rand((M, K), dtype)
    memo = [None]
    gemm.fused_linear(a2, w, None, memo=memo)
    assert isinstance(memo[0], tp.TmaCall)
    a3 = _rand((M, K), dtype)
    with fastvlm.trace() as t:
        t.records.append(fastvlm._dispatch.OpRecord("op", "triton"))
        out3 = gemm.fused_linear(a3, w, None, memo=memo)
    assert_close(out3, a3.double() @ w.double().T, dtype, K)
    assert "gemm core: TMA 32x32" in t.records[-1].note and "split 2-way" in t.records[-1].note


def test_dispatch_reasons(monkeypatch):
    bf = torch.bfloat16
    a, w = torch.zeros(8, 64, dtype=bf), torch.zeros(16, 64, dtype=bf)
    flags = (False, False, False, 0, False, "strided", "none", False, False, True, "gelu", False, False, False, "ieee", 0)
    monkeypatch.setenv("FASTVLM_GEMM_CORE", "auto")
    assert tp.tma_core_reason(a, w, flags, bf, 64) == "not an sm_90 device"  # the CPU, the interpreter
    monkeypatch.setenv("FASTVLM_GEMM_CORE", "tma")
    assert tp.tma_core_reason(a, w, flags, bf, 64) == ""
    assert "gathers rows" in tp.tma_core_reason(a, w, flags[:5] + ("concat",) + flags[6:], bf, 64)
    assert "gated" in tp.tma_core_reason(a, w, flags[:11] + (True,) + flags[12:], bf, 64)
    assert "bf16/fp16" in tp.tma_core_reason(a.float(), w.float(), flags, torch.float32, 64)
    odd = torch.zeros(8, 60, dtype=bf)  # 120-byte rows
    assert "16 bytes" in tp.tma_core_reason(odd, torch.zeros(16, 60, dtype=bf), flags, bf, 60)
    assert "inner stride" in tp.tma_core_reason(torch.zeros(64, 8, dtype=bf).T, w, flags, bf, 64)
    assert "overlap" in tp.tma_core_reason(torch.zeros(1, 64, dtype=bf).expand(8, 64), w, flags, bf, 64)
    from fastvlm.kernels import _launch

    with _launch.traced():  # a triton_op's body under torch.compile: wrap_triton gets the pointer kernel
        assert "torch.compile" in tp.tma_core_reason(a, w, flags, bf, 64)
    monkeypatch.setenv("FASTVLM_GEMM_CORE", "pointer")
    assert tp.tma_core_reason(a, w, flags, bf, 64) == "FASTVLM_GEMM_CORE=pointer"


def test_schedule_llava_waves():
    """Wave arithmetic on 132 SMs: LLaVA-1.5 B=1 (M = 576) fills the SMs through the split tail."""
    for K in (1024, 4096):
        cfg, (programs, dp, split, kps, tiles, _) = ts.choose(576, 4096, K, "none")
        units = dp + (tiles - dp) * split
        assert programs == min(132, units)
        fill = (tiles * 1.0) / (132 * (dp // 132 + (tiles - dp) * split / 132 / split
                                       if split > 1 else -(-tiles // 132)))
        assert split > 1 and units >= 0.85 * 132, (cfg, tiles, split)
        assert fill > 0.7
    cfg, (_, dp, split, _, tiles, _) = ts.choose(576 * 64, 4096, 4096, "none")  # B=64: many waves
    assert cfg[:2] in ((128, 256), (256, 128))


@pytest.mark.parametrize("sms", [8])
def test_epilogue_halves(tma, monkeypatch, sms):
    """The epilogue over two column halves (tiles above 128x128 on the GPU), in the whole-tile and split paths (8
    SMs: one data-parallel wave, 4 tail tiles split 2-way)."""
    tma(sms)
    monkeypatch.setattr(ts, "epi_split", lambda cfg: 2)
    dtype, M, K, N = torch.bfloat16, 70, 200, 100
    a, w, b = _rand((M, K), dtype), _rand((N, K), dtype, K ** -0.5), _rand((N,), dtype)
    res = _rand((M, N), dtype)
    out, pre = Guarded((M, N), dtype, "cpu"), Guarded((M, N), dtype, "cpu")
    gemm.fused_linear(a, w, b, act="gelu", residual=res, store_pre=True, out=out.tensor, pre=pre.tensor)
    assert _core(M, N, K).plan.consts["EPI_SPLIT"] == 2
    h64 = a.double() @ w.double().T + b.double()
    assert_close(pre.tensor, h64, dtype, K, what="pre-activation")
    assert_close(out.tensor, act_ref(h64, "gelu") + res.double(), dtype, K, roundings=2)
    out.check("out")
    pre.check("pre")
