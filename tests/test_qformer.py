"""Q-Former (issue 4): the linear + residual + LayerNorm kernel and op, and the fused BLIP-2 / InstructBLIP Q-Formers
against the transformers modules (PyTorch path and Triton interpreter path), gradients, compile, fallbacks, patch."""

import pytest
import torch

import fastvlm
from fastvlm.ops.linear_norm import linear_residual_layernorm
from fastvlm.reference.linear_norm import linear_norm_eager, linear_norm_ref
from fastvlm.testing import rel_err
from helpers import Guarded, assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("quiet_fallbacks")  # fallback warnings are asserted through trace()


# ------------------------------------------------------------------------------------------------ kernel


def _ln_inputs(M, K, N, dtype, offset=0.0, bias=True, res=True):
    a = torch.randn(M, K)
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    r = torch.randn(M, N) + offset if res else None
    g = 1 + 0.1 * torch.randn(N)
    beta = 0.1 * torch.randn(N)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return c(a), c(w), c(b), c(r), c(g), c(beta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16, 16), (37, 70, 100), (65, 33, 130)])
def test_linear_norm_kernel_parity(dtype, shape, triton_backend):
    from fastvlm.kernels.linear_norm import linear_norm

    M, K, N = shape
    a, w, b, r, g, beta = _ln_inputs(M, K, N, dtype)
    ga, gw, gr = Guarded((M, K), dtype, "cpu", fill=a), Guarded((N, K), dtype, "cpu", fill=w), \
        Guarded((M, N), dtype, "cpu", fill=r)
    out = Guarded((M, N), dtype, "cpu")
    linear_norm(ga.tensor, gw.tensor, b, gr.tensor, g, beta, 1e-12, out=out.tensor)
    for name, t in (("a", ga), ("w", gw), ("residual", gr), ("out", out)):
        t.check(name)
    ref = linear_norm_ref(a, w, b, r, g, beta, 1e-12)
    assert_close(out.tensor, ref, dtype, K, roundings=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_norm_every_config_strided_and_offset(dtype, triton_backend):
    """Every autotune tile shape, strided views of a and out, no bias / residual, and rows with |mean| >> std."""
    from fastvlm.kernels.linear_norm import LN_CONFIGS, linear_norm

    M, K, N = 20, 40, 72
    a, w, b, r, g, beta = _ln_inputs(M, K, N, dtype, offset=300.0)
    big = torch.randn(M, 2 * K, dtype=dtype)
    big[:, 3:3 + K] = a
    a_view = big[:, 3:3 + K]
    ref = linear_norm_ref(a, w, b, r, g, beta, 1e-6)
    # rounding h ~ 300 to the dtype costs eps * |mean| / std in the output: eager has the same conditioning
    from fastvlm.testing import tolerance

    bound = 2 * rel_err(linear_norm_eager(a.float(), w.float(), b.float(), r.to(dtype).float(), g.float(),
                                          beta.float(), 1e-6), ref) + tolerance(dtype, K, 2)
    if dtype != torch.float32:
        bound += 2 * torch.finfo(dtype).eps * 300 / 1.4
    for cfg in LN_CONFIGS:
        y = linear_norm(a_view, w, b, r, g, beta, 1e-6, config=cfg)
        err = rel_err(y, ref)
        assert err <= bound, (cfg, err, bound)
    store = torch.full((N, M + 3), float("nan"), dtype=dtype)
    y = linear_norm(a, w, None, None, g, None, 1e-5, out=store[:, :M].t())
    assert torch.isnan(store[:, M:]).all()
    assert_close(y, linear_norm_ref(a, w, None, None, g, None, 1e-5), dtype, K, roundings=2)


def test_linear_norm_torch_path_is_transformers_self_output(torch_backend):
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerSelfOutput
    from transformers import Blip2QFormerConfig

    m = Blip2QFormerSelfOutput(Blip2QFormerConfig(hidden_size=48)).eval()
    x, res = torch.randn(2, 7, 48), torch.randn(2, 7, 48)
    with torch.no_grad():
        y = linear_residual_layernorm(x, m.dense.weight, m.dense.bias, res, m.LayerNorm.weight, m.LayerNorm.bias,
                                      m.LayerNorm.eps)
        assert torch.equal(y, m(x, res))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_norm_gradients(backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    ts = [t.requires_grad_() for t in _ln_inputs(9, 24, 40, torch.float32)]
    gy = torch.randn(9, 40)
    linear_residual_layernorm(*ts, eps=1e-5).backward(gy)
    got = [t.grad for t in ts]
    t64 = [t.detach().double().requires_grad_() for t in ts]
    linear_norm_eager(*t64, 1e-5).backward(gy.double())
    for name, g, t in zip(("x", "w", "b", "residual", "ln_w", "ln_b"), got, t64):
        assert_close(g, t.grad, torch.float32, 40, roundings=2, what=f"grad {name}")


def test_linear_norm_opcheck(torch_backend):
    args = _ln_inputs(5, 16, 24, torch.float32)
    args = [t.requires_grad_() for t in args]
    torch.library.opcheck(torch.ops.fastvlm.linear_residual_layernorm.default, (*args, 1e-5, ""))


# ------------------------------------------------------------------------------------------------ Q-Former


def _blip2(heads=2, layers=3, hidden=None, enc=40, freq=2, **kw):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    cfg = Blip2QFormerConfig(hidden_size=hidden or 16 * heads, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=heads, encoder_hidden_size=enc, cross_attention_frequency=freq,
                             initializer_range=0.15, **kw)
    torch.manual_seed(0)
    return Blip2QFormerModel(cfg).eval()


def _instructblip(video=False, **kw):
    import transformers

    name = "InstructBlipVideo" if video else "InstructBlip"
    cfg = getattr(transformers, name + "QFormerConfig")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, encoder_hidden_size=40,
        vocab_size=100, max_position_embeddings=64, initializer_range=0.15, **kw)
    torch.manual_seed(0)
    return getattr(transformers, name + "QFormerModel")(cfg).eval()


def _enc_mask(B, Lk):
    m = torch.ones(B, Lk, dtype=torch.long)
    m[-1, Lk // 2:] = 0
    return m


QF_CASES = [(1, 16, 50, False), (2, 32, 129, True), (3, 48, 300, True)]


@pytest.mark.parametrize("heads,nq,nk,masked", QF_CASES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_blip2_qformer_matches_transformers(heads, nq, nk, masked, backend, monkeypatch):
    if backend == "triton" and nk == 300:
        nk = 100  # interpreter time
    m = _blip2(heads)
    fused = fastvlm.nn.from_module(m)
    assert isinstance(fused, type(m)) and type(fused).__name__ == "FusedBlip2QFormerModel"
    q, e = torch.randn(2, nq, m.config.hidden_size), torch.randn(2, nk, 40)
    em = _enc_mask(2, nk) if masked else None
    with torch.no_grad():
        ref = m(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em)
        m64 = _blip2(heads).double()
        ref64 = m64(query_embeds=q.double(), encoder_hidden_states=e.double(), encoder_attention_mask=em)
        monkeypatch.setenv("FASTVLM_BACKEND", backend)
        with fastvlm.trace() as t:
            out = fused(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em)
    assert set(t.backends()) == {backend}, str(t)
    ops = {r.op for r in t.records}
    assert {"fastvlm::linear_residual_layernorm", "fastvlm::attention", "fastvlm::mlp_projector"} <= ops
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.dtype == torch.float32
    k = max(nk, 64)
    assert_close(out.last_hidden_state, ref64.last_hidden_state, torch.float32, k, roundings=4)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])


@pytest.mark.parametrize("video", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_instructblip_text_path(video, backend, monkeypatch):
    m = _instructblip(video)
    fused = fastvlm.nn.from_module(m)
    ids = torch.randint(3, 100, (2, 5))
    am = torch.ones(2, 21, dtype=torch.long)
    am[1, 18:] = 0  # padded instruction tokens
    q, e = torch.randn(2, 16, 32), torch.randn(2, 50, 40)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=am, query_embeds=q, encoder_hidden_states=e,
                encoder_attention_mask=_enc_mask(2, 50))
        monkeypatch.setenv("FASTVLM_BACKEND", backend)
        with fastvlm.trace() as t:
            out = fused(input_ids=ids, attention_mask=am, query_embeds=q, encoder_hidden_states=e,
                        encoder_attention_mask=_enc_mask(2, 50))
    assert set(t.backends()) == {backend}, str(t)
    assert out.last_hidden_state.shape == (2, 21, 32)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5
    with torch.no_grad():  # text only (no queries): no cross-attention
        assert rel_err(fused(input_ids=ids, attention_mask=am[:, 16:]).last_hidden_state,
                       m(input_ids=ids, attention_mask=am[:, 16:]).last_hidden_state) < 1e-5


def test_full_size_blip2_qformer(torch_backend):
    """BLIP-2's real Q-Former (768 wide, 12 layers, 6 cross-attention layers to 257 x 1408 image tokens)."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    m = Blip2QFormerModel(Blip2QFormerConfig()).eval()
    fused = fastvlm.nn.from_module(m)
    q = torch.randn(1, 32, 768)  # query_tokens (zeros at init in transformers): random here
    e = torch.randn(1, 257, 1408)
    with torch.no_grad():
        out = fused(query_embeds=q, encoder_hidden_states=e).last_hidden_state
        assert fused._fastvlm_weights(torch.float32)["kv"][0].shape == (6 * 2 * 768, 1408)  # one K/V GEMM for all 6 layers
        ref64 = m.double()(query_embeds=q.double(), encoder_hidden_states=e.double()).last_hidden_state
    assert_close(out, ref64, torch.float32, 3072, roundings=4)  # transformers' module evaluated in float64


def test_state_dict_shared_and_cache_invalidated(torch_backend):
    m = _blip2()
    sd = {k: v.data_ptr() for k, v in m.state_dict().items()}
    fused = fastvlm.nn.from_module(m)
    assert {k: v.data_ptr() for k, v in fused.state_dict().items()} == sd
    q, e = torch.randn(2, 16, 32), torch.randn(2, 20, 40)
    with torch.no_grad():
        fused(query_embeds=q, encoder_hidden_states=e)
        key0 = fused._fastvlm_cache.source
        fused(query_embeds=q, encoder_hidden_states=e)
        assert fused._fastvlm_cache.source == key0  # reused
        m.encoder.layer[2].crossattention.attention.value.weight.mul_(2)  # in place: _version changes
        out = fused(query_embeds=q, encoder_hidden_states=e).last_hidden_state
        assert fused._fastvlm_cache.source != key0
        assert rel_err(out, m(query_embeds=q, encoder_hidden_states=e).last_hidden_state) < 1e-5
    loaded = _blip2()
    loaded.load_state_dict(fastvlm.nn.from_module(_blip2()).state_dict(), strict=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_transformers(backend, monkeypatch):
    m = _blip2(2, layers=2, freq=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    fused = fastvlm.nn.from_module(m)
    q = torch.randn(2, 16, 32, requires_grad=True)
    e = torch.randn(2, 30, 40, requires_grad=True)
    em = _enc_mask(2, 30)
    gy = torch.randn(2, 16, 32)
    m(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em).last_hidden_state.backward(gy)
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    ref_q, ref_e = q.grad.clone(), e.grad.clone()
    m.zero_grad()
    q.grad = e.grad = None
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    with fastvlm.trace() as t:
        fused(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em).last_hidden_state.backward(gy)
    assert set(t.backends()) == {backend}, str(t)
    assert rel_err(q.grad, ref_q) < 1e-4 and rel_err(e.grad, ref_e) < 1e-4
    scale = max(g.norm() for g in ref.values())
    for n, p in m.named_parameters():  # key biases have zero gradient (softmax is shift-invariant): absolute bound
        assert p.grad is not None, n
        assert (p.grad - ref[n]).norm() <= 1e-4 * ref[n].norm() + 1e-6 * scale, n
    # a second pass reuses the cached (autograd-recording) concatenations: gradients accumulate correctly
    key = fused._fastvlm_cache.source
    fused(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em).last_hidden_state.backward(gy)
    assert fused._fastvlm_cache.source == key
    for n, p in m.named_parameters():
        assert (p.grad - 2 * ref[n]).norm() <= 2e-4 * ref[n].norm() + 2e-6 * scale, n
    with torch.no_grad():  # an optimizer-like in-place update invalidates the cache
        m.encoder.layer[0].attention.attention.key.weight.add_(0.01)
    fused(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=em)
    assert fused._fastvlm_cache.source != key
    import copy  # the cache (non-leaf tensors) is not part of a copy or a pickle
    assert "_fastvlm_cache" not in copy.deepcopy(fused).__dict__


def test_compile_fullgraph(torch_backend):
    m = _blip2()
    fused = fastvlm.nn.from_module(m)
    q, e = torch.randn(2, 16, 32), torch.randn(2, 20, 40)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=_enc_mask(2, 20))
        ref = m(query_embeds=q, encoder_hidden_states=e, encoder_attention_mask=_enc_mask(2, 20))
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5


def test_fallbacks_are_reported(torch_backend, monkeypatch):
    m = _blip2()
    m.config._attn_implementation = "eager"  # the one that returns attention weights
    fused = fastvlm.nn.from_module(m)
    q, e = torch.randn(2, 16, 32), torch.randn(2, 20, 40)
    monkeypatch.setenv("FASTVLM_BACKEND", "auto")
    fastvlm._dispatch.reset_warnings()
    with torch.no_grad():
        with pytest.warns(fastvlm.FastVLMFallbackWarning, match="output_attentions was requested"):
            out = fused(query_embeds=q, encoder_hidden_states=e, output_attentions=True)
        assert out.attentions is not None
        # transformers' output-capturing hooks stay installed afterwards: they must not disable the fused path
        with fastvlm.trace() as t:
            fused(query_embeds=q, encoder_hidden_states=e)
        assert "fastvlm::linear_residual_layernorm" in {r.op for r in t.records}
    fused.train()
    with pytest.warns(fastvlm.FastVLMFallbackWarning, match="dropout is active"):
        fused(query_embeds=q, encoder_hidden_states=e)
    fused.eval()
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    with pytest.raises(fastvlm.FastVLMFallbackError, match="output_hidden_states"):
        fused(query_embeds=q, encoder_hidden_states=e, output_hidden_states=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_mode_error(backend, monkeypatch):
    """Opt-in bf16 compute (module attribute or FASTVLM_QFORMER_DTYPE): fp32 output, bf16-level error."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _blip2()
    fused = fastvlm.nn.from_module(m)
    q, e = torch.randn(2, 16, 32), torch.randn(2, 50, 40)
    with torch.no_grad():
        ref64 = _blip2().double()(query_embeds=q.double(), encoder_hidden_states=e.double()).last_hidden_state
        fused.fastvlm_compute_dtype = torch.bfloat16
        out = fused(query_embeds=q, encoder_hidden_states=e).last_hidden_state
        fused.fastvlm_compute_dtype = None
        monkeypatch.setenv("FASTVLM_QFORMER_DTYPE", "bf16")
        out_env = fused(query_embeds=q, encoder_hidden_states=e).last_hidden_state
    assert out.dtype == torch.float32 and torch.equal(out, out_env)
    err = rel_err(out, ref64)
    assert 1e-4 < err < 0.05, err


@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_patch_tiny_model(family, torch_backend):
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model(family)
    with torch.no_grad():
        logits = model(**inputs).logits
    report = fastvlm.patch(model, verify=True)
    entry = [e for e in report.entries if e.path == "qformer"]
    assert entry and entry[0].status == "patched" and "ok" in entry[0].detail, str(report)
    with torch.no_grad(), fastvlm.trace() as t:
        logits2 = model(**inputs).logits
    assert "fastvlm::linear_residual_layernorm" in {r.op for r in t.records}
    assert rel_err(logits2, logits) < 1e-5
    fastvlm.unpatch(model)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [32, 2048])
def test_gpu_linear_norm_real_sizes(M, dtype):
    """BLIP-2's SelfOutput (K = 768) and Output (K = 3072) at batch 1 and 64, both variants, every precision."""
    from fastvlm.kernels.linear_norm import linear_norm

    for K in (768, 3072):
        a, w, b, r, g, beta = (None if t is None else t.cuda() for t in _ln_inputs(M, K, 768, dtype))
        ref = linear_norm_ref(a, w, b, r, g, beta, 1e-12)
        for split in (None, False, True):
            assert_close(linear_norm(a, w, b, r, g, beta, 1e-12, split=split), ref, dtype, K, roundings=2)
        if dtype == torch.float32:
            assert_close(linear_norm(a, w, b, r, g, beta, 1e-12, precision="ieee"), ref, dtype, K, roundings=2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_gpu_full_size(mode):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    m = Blip2QFormerModel(Blip2QFormerConfig()).eval().cuda()
    fused = fastvlm.nn.from_module(m)
    fused.fastvlm_compute_dtype = torch.bfloat16 if mode == "bf16" else None
    q, e = torch.randn(8, 32, 768, device="cuda"), torch.randn(8, 257, 1408, device="cuda")
    with torch.no_grad(), fastvlm.trace() as t:
        out = fused(query_embeds=q, encoder_hidden_states=e).last_hidden_state
    assert set(t.backends()) == {"triton"}, str(t)
    with torch.no_grad():
        ref = m.double()(query_embeds=q.double(), encoder_hidden_states=e.double()).last_hidden_state
    if mode == "fp32":
        assert_close(out, ref, torch.float32, 3072, roundings=4)
    else:
        assert rel_err(out, ref) < 0.05


def test_bench_quick_runs(tmp_path):
    from fastvlm.bench.qformer import run

    rows = run(suites=("qformer", "attention"), batches=[1], providers=["hf_sdpa", "fastvlm", "sdpa"],
               dtypes=[torch.float32], quick=True, reps=1, out=str(tmp_path / "q.jsonl"),
               csv_path=str(tmp_path / "q.csv"), verbose=False)
    assert {(r["suite"], r["provider"]) for r in rows} == {("qformer", "hf_sdpa"), ("qformer", "fastvlm"),
                                                          ("attention", "sdpa"), ("attention", "fastvlm")}
    assert all(r["rel_err"] < 1e-5 for r in rows)
    assert (tmp_path / "q.csv").read_text().count("\n") == 5


def test_class_level_apply(torch_backend):
    from transformers.models.blip_2 import modeling_blip_2

    from fastvlm.tiny_models import build_tiny_model

    ref_model, inputs = build_tiny_model("blip2")
    with torch.no_grad():
        ref = ref_model(**inputs).logits
    before = modeling_blip_2.Blip2QFormerModel
    try:
        assert "Blip2QFormerModel" in fastvlm.apply_to_transformers(ops={"blip2"})
        model, inputs = build_tiny_model("blip2")
        assert type(model.qformer).__name__ == "FusedBlip2QFormerModel"
        with torch.no_grad(), fastvlm.trace() as t:
            logits = model(**inputs).logits
        assert "fastvlm::linear_residual_layernorm" in {r.op for r in t.records}
        assert rel_err(logits, ref) < 1e-5
    finally:
        fastvlm.revert_transformers()
    assert modeling_blip_2.Blip2QFormerModel is before
