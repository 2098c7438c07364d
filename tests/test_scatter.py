"""The image-token hand-off op vs transformers' masked_scatter: values, dtype cast, count check, autograd, opcheck;
the backend rule (Triton by default, the CUDA extension's op on request) and its device-side count check; the
benchmark's CPU run."""
import pytest
import torch

import fastvlm
from fastvlm import _cext, _dispatch
from fastvlm.ops import scatter as S
from helpers import Guarded, require_extension


@pytest.fixture(scope="module")
def ext():
    return require_extension()


def _run(backend, embeds, mask, feats, **kw):
    """backend "torch"/"triton": FASTVLM_BACKEND with the default (auto) path; "cuda": the extension's op."""
    if backend == "cuda":
        return fastvlm.scatter_image_features(embeds, mask, feats, backend="cuda", **kw)
    return fastvlm.scatter_image_features(embeds, mask, feats, **kw)


def _case(dtype=torch.float32, B=2, S=13, D=40, feat_dtype=None):
    embeds = torch.randn(B, S, D, dtype=dtype)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 2:7] = True
    mask[1, 9:12] = True
    feats = torch.randn(int(mask.sum()), D, dtype=feat_dtype or dtype)
    return embeds, mask, feats


def _hf(embeds, mask, feats):
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), feats.to(embeds.dtype))


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype,feat_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                              (torch.bfloat16, torch.float32)])
def test_matches_masked_scatter(backend, dtype, feat_dtype, monkeypatch, request):
    if backend == "cuda":
        request.getfixturevalue("ext")
    else:
        monkeypatch.setenv("FASTVLM_BACKEND", backend)
    embeds, mask, feats = _case(dtype, feat_dtype=feat_dtype)
    g = Guarded(tuple(feats.shape), feats.dtype, "cpu", fill=feats)
    out = _run(backend, embeds, mask, g.tensor)
    ref = _hf(embeds, mask, feats)
    assert out.dtype == embeds.dtype
    if backend == "triton" and feat_dtype is not None and not torch.cuda.is_available():
        # the interpreter casts fp32 -> bf16 toward zero (GPUs round to nearest): at most 1 ulp apart
        ulp = torch.finfo(dtype).eps * ref.float().abs()
        assert ((out.float() - ref.float()).abs() <= ulp).all()
    else:
        assert torch.equal(out, ref)
    g.check("features")


@pytest.mark.parametrize("backend", ["auto", "cuda"])
def test_count_mismatch_raises_like_transformers(backend, request):
    if backend == "cuda":
        request.getfixturevalue("ext")
    embeds, mask, feats = _case()
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 8, features: 7"):
        fastvlm.scatter_image_features(embeds, mask, feats[:-1], backend=backend)
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 8, features: 9"):
        fastvlm.scatter_image_features(embeds, mask, torch.cat([feats, feats[:1]]), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_autograd(backend, monkeypatch, request):
    if backend == "cuda":
        request.getfixturevalue("ext")
    else:
        monkeypatch.setenv("FASTVLM_BACKEND", backend)
    embeds, mask, feats = _case(torch.float32 if backend == "triton" else torch.float64)
    e1, f1 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    e2, f2 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    g = torch.randn_like(embeds)
    _run(backend, e1, mask, f1).backward(g)
    _hf(e2, mask, f2).backward(g)
    assert torch.equal(e1.grad, e2.grad) and torch.equal(f1.grad, f2.grad)


def test_opcheck():
    embeds, mask, feats = _case()
    torch.library.opcheck(torch.ops.fastvlm.scatter_image_features.default,
                          (embeds.reshape(-1, 40).requires_grad_(), mask.reshape(-1), feats.requires_grad_()))


# ---------------------------------------------------------------- the backend rule


def test_backend_rule(monkeypatch):
    """Argument > FASTVLM_SCATTER > auto; FASTVLM_BACKEND=torch wins over the variable, not over the argument."""
    monkeypatch.delenv("FASTVLM_SCATTER", raising=False)
    assert S.requested_backend() == "auto"
    assert S.requested_backend("cuda") == "cuda" and S.requested_backend("EXT") == "cuda"
    monkeypatch.setenv("FASTVLM_SCATTER", "cuda")
    assert S.requested_backend() == "cuda"
    assert S.requested_backend("auto") == "auto"
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    assert S.requested_backend() == "auto" and S.requested_backend("cuda") == "cuda"
    monkeypatch.setenv("FASTVLM_SCATTER", "bogus")
    with pytest.raises(ValueError, match="FASTVLM_SCATTER"):
        S.requested_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        S.requested_backend("triton-ish")


def test_compiles_without_graph_breaks(ext):
    """Once the extension is loaded, the "cuda" path traces as one graph (the count is not read under compile)."""
    embeds, mask, feats = _case()
    fn = lambda e, m, f: fastvlm.scatter_image_features(e, m, f, backend="cuda") * 2  # noqa: E731
    fn(embeds, mask, feats)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(fn)(embeds, mask, feats)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    out = torch.compile(fn, fullgraph=True)(embeds, mask, feats)
    assert torch.equal(out, _hf(embeds, mask, feats) * 2)
    torch._dynamo.reset()


def test_triton_is_the_default_on_cuda(monkeypatch):
    """Without an explicit choice, CUDA tensors go to the fastvlm:: custom op (Triton): the CUDA kernel needs a GPU
    measurement before it may become the default (docs/design-csrc.md)."""
    monkeypatch.delenv("FASTVLM_SCATTER", raising=False)
    calls = []
    monkeypatch.setattr(S, "_ext_op", lambda why: calls.append(why))
    embeds, mask, feats = _case()
    with fastvlm.trace() as t:
        fastvlm.scatter_image_features(embeds, mask, feats)
    assert not calls and t.records[0].op == S.OP_NAME


def test_env_selects_extension(ext, monkeypatch):
    monkeypatch.setenv("FASTVLM_SCATTER", "cuda")
    embeds, mask, feats = _case()
    with fastvlm.trace() as t:
        out = fastvlm.scatter_image_features(embeds, mask, feats)
    assert t.backends() == ["fastvlm_ext"] and t.records[0].op == S.EXT_OP
    assert torch.equal(out, _hf(embeds, mask, feats))


def test_extension_unavailable_is_an_error(monkeypatch):
    """An explicit request for the CUDA kernel never falls back silently."""
    monkeypatch.setattr(_cext, "available", lambda build=True: (False, "no CUDA toolkit found"))
    monkeypatch.setattr(S, "_ext_loaded", False)
    embeds, mask, feats = _case()
    with pytest.raises(_dispatch.FastVLMFallbackError, match="backend='cuda'.*no CUDA toolkit"):
        fastvlm.scatter_image_features(embeds, mask, feats, backend="cuda")
    monkeypatch.setenv("FASTVLM_SCATTER", "cuda")
    with pytest.raises(_dispatch.FastVLMFallbackError, match="FASTVLM_SCATTER=cuda"):
        fastvlm.scatter_image_features(embeds, mask, feats)


@pytest.mark.parametrize("backend", ["auto", "triton", "cuda"])
def test_lazy_check(backend, request, monkeypatch):
    """check="lazy" returns the device count unread; check_token_count raises transformers' error later. The kernels
    (Triton: "triton"; the extension: "cuda") never read past the feature rows: the rows without one are NaN."""
    if backend == "cuda":
        request.getfixturevalue("ext")
    if backend == "triton":
        request.getfixturevalue("triton_backend")
    embeds, mask, feats = _case()
    which = "auto" if backend == "triton" else backend
    out, n = fastvlm.scatter_image_features(embeds, mask, feats, backend=which, check="lazy")
    assert isinstance(n, torch.Tensor) and int(n) == 8 and torch.equal(out, _hf(embeds, mask, feats))
    S.check_token_count(n, feats.shape[0])
    if backend != "auto":  # (the PyTorch path checks before masked_scatter, which needs the count right)
        # 7 rows viewed from 8 finite ones: a read past the 7th would find a number where NaN is expected
        out, n = fastvlm.scatter_image_features(embeds, mask, feats[:-1], backend=which, check="lazy")
        if backend == "cuda":  # the extension marks every image row of a mismatched call
            assert out[mask].isnan().all()
        else:  # the Triton kernel marks the image tokens without a feature row (here the 8th)
            assert out[mask].isnan().all(dim=-1).tolist() == [False] * 7 + [True]
        assert torch.equal(out[~mask], embeds[~mask])
        with pytest.raises(ValueError, match="tokens: 8, features: 7"):
            S.check_token_count(n, feats.shape[0] - 1)
    with pytest.raises(ValueError, match="check must be"):
        fastvlm.scatter_image_features(embeds, mask, feats, check=False)


def test_extension_takes_3d_features_and_mask_with_trailing_dim(ext):
    embeds, mask, feats = _case(torch.bfloat16)
    out = fastvlm.scatter_image_features(embeds, mask[..., None], feats.reshape(2, 4, 40), backend="cuda")
    assert torch.equal(out, _hf(embeds, mask, feats))


@pytest.mark.filterwarnings("ignore::fastvlm._dispatch.FastVLMFallbackWarning")  # api_auto on CPU tensors
def test_bench_runs_on_cpu(ext):
    from fastvlm.bench import scatter as bench

    rows = bench.run(shapes=["2x64x40:30"], providers=bench.ALL_PROVIDERS, reps=2, verbose=False,
                     feat_dtype=torch.float32)
    by = {r["provider"]: r for r in rows}
    assert set(by) == set(bench.ALL_PROVIDERS)
    if not torch.cuda.is_available():
        assert by["triton"]["ms"] is None and "CUDA" in by["triton"]["skipped"]
    for name in ("masked_scatter", "cuda_ext", "api_cuda", "api_auto"):
        assert by[name]["ms"] > 0 and by[name]["exact"], by[name]
    table = bench.format_rows(rows)
    assert "cuda_ext" in table and (torch.cuda.is_available() or "triton           skipped: " in table)


# ---------------------------------------------------------------- CUDA (GPU runs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,feat_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                              (torch.float16, None), (torch.float32, None)])
def test_cuda_backends_agree(ext, dtype, feat_dtype):
    """On CUDA tensors: the extension's kernel, the Triton kernel and masked_scatter give the same bits."""
    embeds, mask, feats = (t.cuda() for t in _case(dtype, B=4, S=700, D=4096, feat_dtype=feat_dtype))
    with fastvlm.trace() as t:
        tri = fastvlm.scatter_image_features(embeds, mask, feats)
        cud = fastvlm.scatter_image_features(embeds, mask, feats, backend="cuda")
    assert t.backends() == ["triton", "fastvlm_ext"]
    ref = _hf(embeds, mask, feats)
    assert torch.equal(cud, ref) and torch.equal(tri, ref)


@pytest.mark.gpu
def test_cuda_lazy_check_does_not_synchronise(ext):
    embeds, mask, feats = (t.cuda() for t in _case(torch.bfloat16, B=2, S=300, D=256))
    fastvlm.scatter_image_features(embeds, mask, feats, backend="cuda")  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, n = fastvlm.scatter_image_features(embeds, mask, feats[:-1], backend="cuda", check="lazy")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match="tokens: 8, features: 7"):
        S.check_token_count(n, feats.shape[0] - 1)
    assert out[mask].isnan().all()


@pytest.mark.gpu
def test_cuda_autograd(ext):
    embeds, mask, feats = (t.cuda() for t in _case(torch.float32, D=64))
    e1, f1 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    e2, f2 = embeds.clone().requires_grad_(), feats.clone().requires_grad_()
    g = torch.randn_like(embeds)
    fastvlm.scatter_image_features(e1, mask, f1, backend="cuda").backward(g)
    _hf(e2, mask, f2).backward(g)
    assert torch.equal(e1.grad, e2.grad) and torch.equal(f1.grad, f2.grad)
