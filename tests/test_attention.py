"""fastvlm::attention: the Triton kernel under the interpreter (ragged shapes, every dtype, masks, poisoned margins,
explicit tiles) against float64 references; the references against transformers' BLIP-2 attention; gradients,
opcheck, torch.compile, dispatch and input errors."""
import warnings

import pytest
import torch

import fastvlm
from fastvlm import _dispatch
from fastvlm.kernels.attention import attention_fwd
from fastvlm.ops.attention import attention
from fastvlm.reference.attention import (
    attention_ref,
    combined_mask,
    eager_attention_ref,
    sdpa_attention_ref,
)
from fastvlm.testing import randomize_
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, H, Lq, Lk, D, masks): ragged everywhere; H = 3 leaves a padding head in the second 2-head group
SHAPES = {
    "qformer_keymask": (2, 3, 32, 100, 64, "key"),  # 2 heads x 32 queries = 64-row tile
    "instructblip_full": (1, 2, 48, 70, 72, "full"),  # 48 queries -> 64-row single-head tile, D padded to 128
    "short_nomask": (2, 1, 16, 50, 32, "none"),
    "300_keys_both": (1, 2, 32, 300, 64, "both"),
}


def _masks(kind, B, H, Lq, Lk, dtype, device):
    key = attn = None
    if kind in ("key", "both"):
        key = torch.ones(B, Lk, dtype=torch.bool, device=device)
        key[-1, Lk - Lk // 3:] = False  # last batch row padded
        key[0, 3] = False
    if kind in ("full", "both"):  # InstructBLIP-style additive bias over queries + text, one batch-broadcast head dim
        attn = torch.zeros(B, 1, Lq, Lk, dtype=dtype, device=device)
        attn[..., Lk - 7:] = torch.finfo(dtype).min
        attn[:, :, : Lq // 2, :5] = -2.5
    return key, attn


def _qkv(B, H, Lq, Lk, D, dtype, device, guarded=False):
    """q/k/v as transformers makes them: ``linear(x).view(B, L, H, D).transpose(1, 2)`` (non-contiguous views),
    optionally inside NaN-poisoned buffers."""
    out = []
    for L in (Lq, Lk, Lk):
        t = torch.randn(B, L, H, D, device=device).to(dtype)
        if guarded:
            g = Guarded((B, L, H, D), dtype, device, fill=t)
            out.append((g, g.tensor.transpose(1, 2)))
        else:
            out.append((None, t.transpose(1, 2)))
    return out


def _ref64(q, k, v, key, attn, scale=None):
    return attention_ref(q.double(), k.double(), v.double(), key, None if attn is None else attn.double(), scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(SHAPES))
def test_kernel_parity(case, dtype, device):
    B, H, Lq, Lk, D, kind = SHAPES[case]
    (gq, q), (gk, k), (gv, v) = _qkv(B, H, Lq, Lk, D, dtype, device, guarded=True)
    key, attn = _masks(kind, B, H, Lq, Lk, dtype, device)
    out = Guarded((B, Lq, H, D), dtype, device)
    lse = Guarded((B, H, Lq), torch.float32, device)
    attention_fwd(q, k, v, key_mask=key, attn_mask=attn, out=out.tensor, lse=lse.tensor)
    o64, lse64 = _ref64(q, k, v, key, attn)
    assert_close(out.tensor, o64, dtype, max(D, Lk), roundings=2, what="output")  # P and O pass through dtype
    assert_close(lse.tensor, lse64, torch.float32, D, what="lse")
    for g, name in ((gq, "q"), (gk, "k"), (gv, "v"), (out, "out"), (lse, "lse")):
        g.check(name)


@pytest.mark.parametrize("config", [(16, 4, 32, 4, 1), (64, 1, 128, 4, 1), (32, 2, 16, 4, 1), (16, 1, 64, 4, 1)])
def test_kernel_explicit_tiles(config, device):
    """Every tile shape the configs and the launcher's heuristics can produce, on a ragged shape."""
    B, H, Lq, Lk, D = 2, 3, 20, 45, 32
    dtype = torch.float16
    (_, q), (_, k), (_, v) = _qkv(B, H, Lq, Lk, D, dtype, device)
    key, _ = _masks("key", B, H, Lq, Lk, dtype, device)
    attn = torch.randn(1, H, 1, Lk, device=device).to(dtype)  # broadcast over batch and queries
    o, lse = attention_fwd(q, k, v, key_mask=key, attn_mask=attn, config=config)
    o64, lse64 = _ref64(q, k, v, key, attn)
    assert_close(o, o64, dtype, Lk, roundings=2)
    assert_close(lse, lse64, torch.float32, D, what="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_default_tile_keeps_an_audited_config(dtype):
    """On the GPU the autotuner prunes configs per tile (the interpreter runs only the first): every tile the launcher
    picks for D in 16..128 keeps at least one config, and every kept (tile, config) is spill-free by the audit's
    rule."""
    from fastvlm.kernels import attention as A

    q = torch.empty(1, dtype=dtype)
    fp32 = dtype == torch.float32
    for D in (16, 32, 64, 72, 80, 96, 128):
        for H in (1, 3, 12):
            for Lq in (1, 16, 32, 48, 100):
                bq, heads = A.default_tile(Lq, H, D, fp32)
                bd = triton_next_pow2(D)
                assert heads * bd <= 256 and bq * heads >= 16 and heads <= triton_next_pow2(H)
                if not (fp32 and bd > 64):
                    assert bq * heads == 64, (D, H, Lq, bq, heads)  # the wgmma tile
                kept = A._prune_configs(A._triton_configs(), {"q_ptr": q}, BLOCK_Q=bq, HEADS=heads, BLOCK_D=bd)
                assert kept and all(A._config_ok(bq * heads, heads * bd, c.kwargs["BLOCK_N"], c.num_warps, fp32)
                                    for c in kept), (D, H, Lq)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


def test_mask_encodings_agree(device):
    """bool, integer (tokenizer) and additive (0 / finfo.min) key masks, and the same mask as a 4-D attn_mask."""
    B, H, Lq, Lk, D = 2, 2, 16, 40, 32
    (_, q), (_, k), (_, v) = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    keep = torch.ones(B, Lk, dtype=torch.bool, device=device)
    keep[1, 25:] = False
    additive = torch.zeros(B, Lk, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)
    ref, _ = _ref64(q, k, v, keep, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTVLM_BACKEND", "triton")
        outs = [attention(q, k, v, key_mask=keep), attention(q, k, v, key_mask=keep.long()),
                attention(q, k, v, key_mask=additive), attention(q, k, v, attn_mask=keep[:, None, None, :]),
                attention(q, k, v, attn_mask=additive[:, None, None, :].expand(B, 1, Lq, Lk))]
    for o in outs:
        assert_close(o, ref, torch.float32, Lk)


def test_fully_masked_rows(device):
    """Keep-flags masking every key of a row give zeros and LSE -inf; transformers' finite finfo.min bias over every
    key averages the values, as eager attention does."""
    B, H, Lq, Lk, D = 2, 2, 16, 24, 32
    (_, q), (_, k), (_, v) = _qkv(B, H, Lq, Lk, D, torch.float32, device)
    keep = torch.ones(B, Lk, dtype=torch.bool, device=device)
    keep[1] = False
    o, lse = attention_fwd(q, k, v, key_mask=keep)
    assert torch.all(o[1] == 0) and torch.all(torch.isneginf(lse[1]))
    assert torch.isfinite(lse[0]).all()
    o_ref, _ = attention_ref(q, k, v, keep)
    assert_close(o, o_ref, torch.float32, Lk)
    bias = torch.zeros(B, 1, Lq, Lk, device=device)
    bias[1] = torch.finfo(torch.float32).min
    o2, _ = attention_fwd(q, k, v, attn_mask=bias)
    eager = eager_attention_ref(q, k, v, attn_mask=bias)
    assert_close(o2, eager, torch.float32, Lk)
    assert_close(o2[1], v[1].mean(dim=1, keepdim=True).transpose(0, 1).expand(Lq, H, D), torch.float32, Lk)


# ------------------------------------------------------------------------------------------------ vs transformers


def _qformer_cross_attention(impl="eager", device="cpu"):
    """A tiny BLIP-2 Q-Former cross-attention (hidden 64, 2 heads of 32, image features 48 wide)."""
    tf = pytest.importorskip("transformers")
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerMultiHeadAttention

    cfg = tf.Blip2QFormerConfig(hidden_size=64, num_attention_heads=2, intermediate_size=128, encoder_hidden_size=48,
                                num_hidden_layers=1)
    cfg._attn_implementation = impl
    m = Blip2QFormerMultiHeadAttention(cfg, is_cross_attention=True).eval()
    randomize_(m, std=0.3)
    return cfg, m.to(device)


def _project(m, hidden, enc):
    B, Lq, _ = hidden.shape
    H, D = m.num_attention_heads, m.attention_head_size
    q = m.query(hidden).view(B, Lq, H, D).transpose(1, 2)
    k = m.key(enc).view(B, enc.shape[1], H, D).transpose(1, 2)
    v = m.value(enc).view(B, enc.shape[1], H, D).transpose(1, 2)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_references_reproduce_transformers(dtype, device):
    """eager_attention_ref / sdpa_attention_ref are bit-identical to transformers' attention functions fed the masks
    transformers builds from a 2-D encoder_attention_mask; attention_ref agrees to rounding."""
    cfg, m = _qformer_cross_attention(device=device)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_bidirectional_mask
    from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

    m = m.to(dtype)
    B, Lq, Lk = 2, 32, 50
    hidden, enc = torch.randn(B, Lq, 64, device=device).to(dtype), torch.randn(B, Lk, 48, device=device).to(dtype)
    mask2d = torch.ones(B, Lk, dtype=torch.long, device=device)
    mask2d[1, 37:] = 0
    with torch.no_grad():
        q, k, v = _project(m, hidden, enc)
        eager_mask = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask2d,
                                               encoder_hidden_states=enc)
        hf_eager, _ = eager_attention_forward(m, q, k, v, eager_mask, scaling=m.scaling)
        assert torch.equal(eager_attention_ref(q, k, v, key_mask=mask2d, scale=m.scaling), hf_eager)
        assert torch.equal(eager_attention_ref(q, k, v, attn_mask=eager_mask, scale=m.scaling), hf_eager)
        cfg._attn_implementation = "sdpa"
        sdpa_mask = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask2d,
                                              encoder_hidden_states=enc)
        hf_sdpa, _ = sdpa_attention_forward(m, q, k, v, sdpa_mask, scaling=m.scaling)
        assert torch.equal(sdpa_attention_ref(q, k, v, key_mask=mask2d, scale=m.scaling), hf_sdpa)
        assert torch.equal(combined_mask(mask2d, None, dtype)[:, :, 0], sdpa_mask[:, :, 0])
        o64, _ = _ref64(q, k, v, mask2d.bool(), None, m.scaling)
    assert_close(hf_eager, o64, dtype, Lk, roundings=3, what="transformers eager")


def test_blip2_qformer_cross_attention_module(triton_backend, device):
    """The kernel (interpreter) in place of Blip2QFormerMultiHeadAttention's core, with the 2-D encoder mask or the
    4-D mask transformers builds from it."""
    cfg, m = _qformer_cross_attention(device=device)
    from transformers.masking_utils import create_bidirectional_mask

    B, Lq, Lk = 2, 32, 57
    hidden, enc = torch.randn(B, Lq, 64, device=device), torch.randn(B, Lk, 48, device=device)
    mask2d = torch.ones(B, Lk, dtype=torch.long, device=device)
    mask2d[0, 40:] = 0
    with torch.no_grad():
        mask4d = create_bidirectional_mask(config=cfg, inputs_embeds=hidden, attention_mask=mask2d,
                                           encoder_hidden_states=enc)
        expected, _ = m(hidden, encoder_hidden_states=enc, encoder_attention_mask=mask4d)
        q, k, v = _project(m, hidden, enc)
        with fastvlm.trace() as t:
            ours = attention(q, k, v, key_mask=mask2d, scale=m.scaling).reshape(B, Lq, -1)
            ours4 = attention(q, k, v, attn_mask=mask4d, scale=m.scaling).reshape(B, Lq, -1)
    assert t.backends() == ["triton", "triton"]
    assert_close(ours, expected, torch.float32, Lk, roundings=2)
    assert_close(ours4, expected, torch.float32, Lk, roundings=2)


# ------------------------------------------------------------------------------------------------ autograd


def _grad_inputs(dtype, B=2, H=2, Lq=20, Lk=60, D=32, device="cpu"):
    g = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()  # noqa: E731
    q, k, v = g(B, H, Lq, D), g(B, H, Lk, D), g(B, H, Lk, D)
    key = torch.ones(B, Lk, dtype=torch.bool, device=device)
    key[-1, Lk - Lk // 4:] = False
    bias = (torch.randn(B, 1, Lq, Lk, device=device) * 0.5).to(dtype).requires_grad_()
    return q, k, v, key, bias


def _grads(fn, q, k, v, key, bias, go):
    out = fn(q, k, v, key, bias)
    return out, torch.autograd.grad(out, (q, k, v, bias), go)


def _ours(q, k, v, key, bias):
    return attention(q, k, v, key_mask=key, attn_mask=bias, scale=0.3)


def _reference(q, k, v, key, bias):
    return attention_ref(q, k, v, key, bias, 0.3)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_triton_path(dtype, triton_backend, device):
    q, k, v, key, bias = _grad_inputs(dtype, device=device)
    go = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device=device).to(dtype)
    out, grads = _grads(_ours, q, k, v, key, bias, go)
    up = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    out64, grads64 = _grads(_reference, up(q), up(k), up(v), key, up(bias), go.double())
    assert_close(out, out64, dtype, k.shape[2], roundings=2)
    for name, a, b in zip(("q", "k", "v", "attn_mask"), grads, grads64):
        assert a.dtype == dtype
        assert_close(a, b, dtype, k.shape[2], roundings=4, what=f"grad {name}")


def test_backward_pytorch_path_float64(torch_backend):
    q, k, v, key, bias = _grad_inputs(torch.float64)
    go = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=torch.float64)
    out, grads = _grads(_ours, q, k, v, key, bias, go)
    out_ref, grads_ref = _grads(_reference, q, k, v, key, bias, go)
    assert rel_err(out, out_ref) < 1e-14
    for a, b in zip(grads, grads_ref):
        assert rel_err(a, b) < 1e-12


def test_gradcheck_float64(torch_backend):
    q, k, v, key, bias = _grad_inputs(torch.float64, B=1, H=2, Lq=3, Lk=5, D=4)
    key = torch.tensor([[True, True, False, True, True]])
    km = torch.zeros(1, 5, dtype=torch.float64).requires_grad_()  # an additive key bias gets a gradient too

    def f(q, k, v, km, bias):
        return attention(q, k, v, key_mask=km, attn_mask=bias.masked_fill(~key[:, None, None, :], -1e4))

    assert torch.autograd.gradcheck(f, (q, k, v, km, bias))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, monkeypatch, device):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    q, k, v, key, bias = _grad_inputs(torch.float32, B=1, H=2, Lq=16, Lk=20, D=16, device=device)
    torch.library.opcheck(torch.ops.fastvlm.attention.default, (q, k, v, key, bias, 0.25))


def test_compile_fullgraph(torch_backend):
    """A Q-Former-like cross-attention core (projections, attention, output reshape) compiles with fullgraph=True,
    forward and backward."""
    import torch._dynamo

    cfg, m = _qformer_cross_attention()
    B, Lq, Lk = 2, 32, 30
    hidden, enc = torch.randn(B, Lq, 64), torch.randn(B, Lk, 48)
    mask2d = torch.ones(B, Lk, dtype=torch.long)
    mask2d[1, 20:] = 0

    def core(hidden, enc, mask2d):
        q, k, v = _project(m, hidden, enc)
        return attention(q, k, v, key_mask=mask2d, scale=m.scaling).reshape(B, Lq, -1)

    torch._dynamo.reset()
    compiled = torch.compile(core, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(hidden, enc, mask2d), core(hidden, enc, mask2d), torch.float32, Lk)
    hg = hidden.clone().requires_grad_()
    compiled(hg, enc, mask2d).square().sum().backward()
    hr = hidden.clone().requires_grad_()
    q, k, v = _project(m, hr, enc)
    attention_ref(q, k, v, mask2d, None, m.scaling)[0].reshape(B, Lq, -1).square().sum().backward()
    assert rel_err(hg.grad, hr.grad) < 1e-5


# ------------------------------------------------------------------------------------------------ dispatch, errors


def test_dispatch_and_fallback_reasons(monkeypatch):
    q, k, v, _, _ = _grad_inputs(torch.float64, B=1, H=1, Lq=4, Lk=5, D=16)
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="float64 is not one of"):
        attention(q, k, v)
    small = torch.randn(1, 1, 4, 8)
    with pytest.raises(fastvlm.FastVLMFallbackError, match="head dim 8 is outside"):
        attention(small, small, small)
    monkeypatch.setenv("FASTVLM_BACKEND", "auto")
    _dispatch.reset_warnings()
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="fastvlm::attention ran its PyTorch path"):
        with fastvlm.trace() as t:
            attention(q.detach(), k.detach(), v.detach())
    assert t.records[0].backend == "torch" and t.records[0].op == "fastvlm::attention"


def test_bad_inputs_name_the_tensor():
    q, k, v = torch.randn(2, 2, 8, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        with pytest.raises(ValueError, match="q must be a 4-D"):
            attention(q[0], k, v)
        with pytest.raises(ValueError, match=r"k must be \[2, 2, keys, 16\]"):
            attention(q, k[..., :8], v)
        with pytest.raises(ValueError, match="v must have k's shape"):
            attention(q, k, v[:, :, :9])
        with pytest.raises(ValueError, match="share one floating dtype"):
            attention(q, k.half(), v)
        with pytest.raises(ValueError, match=r"key_mask must be \[2, 10\]"):
            attention(q, k, v, key_mask=torch.ones(2, 9, dtype=torch.bool))
        with pytest.raises(ValueError, match="attn_mask must be"):
            attention(q, k, v, attn_mask=torch.zeros(2, 3, 8, 10))
    with pytest.raises(ValueError, match=r"attention_fwd: key_mask must be \[2, 10\]"):
        attention_fwd(q, k, v, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_fwd: v is torch.float16 but q is torch.float32"):
        attention_fwd(q, k, v.half())
    with pytest.raises(ValueError, match="attention_fwd: scale must be positive"):
        attention_fwd(q, k, v, scale=0.0)
    with pytest.raises(ValueError, match="attention_fwd: config"):
        attention_fwd(q, k, v, config=(16, 1, 8, 4, 1))
    with pytest.raises(ValueError, match="attention_fwd: precision must be"):
        attention_fwd(q, k, v, precision="ieee")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_heads_as_transformers(backend, monkeypatch, request):
    """q/k/v with 0 heads: transformers' eager attention (and SDPA) return an empty [B, Lq, 0, D]; the op and the
    references used to raise (ValueError "kv_heads dividing 0", ZeroDivisionError in ``full_kv``). k with heads
    while q has none is still an error naming k."""
    from transformers.models.blip_2.modeling_blip_2 import eager_attention_forward

    if backend == "triton":
        request.getfixturevalue("triton_backend")
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    q = torch.randn(2, 0, 3, 16, requires_grad=True)
    k, v = torch.randn(2, 0, 5, 16), torch.randn(2, 0, 5, 16)
    want = eager_attention_forward(torch.nn.Module().eval(), q, k, v, None, scaling=0.25)[0]
    for ref in (eager_attention_ref, sdpa_attention_ref):
        assert ref(q, k, v, scale=0.25).shape == want.shape == (2, 3, 0, 16)
    out = fastvlm.attention(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool), scale=0.25)
    assert out.shape == want.shape and out.dtype == want.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape
    with pytest.raises(ValueError, match="k must be"):
        fastvlm.attention(q, torch.randn(2, 1, 5, 16), torch.randn(2, 1, 5, 16))
