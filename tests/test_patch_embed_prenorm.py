"""Prefix rows and a fused pre-norm in ``fastvlm::patch_embed``, and the parent-level pairing that uses them:
CLIP's ``pre_layrnorm`` and timm VisionTransformer's ``_pos_embed`` (class / register tokens, no_embed_class,
dynamic_img_size) + ``norm_pre``, against the unpatched models."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastvlm
from fastvlm.ops.patch_embed import im2col_ref, patch_embed
from helpers import Guarded, assert_close, rel_err

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fastvlm.FastVLMFallbackWarning)
        yield


def _ref(x, w, b, pos, rows, cls, cls_pos, nw, nb, eps):
    """float64: im2col + matmul + bias + position rows, prefix rows (+ their positions), then the LayerNorm."""
    B, p, D = x.shape[0], w.shape[-1], w.shape[0]
    y = (im2col_ref(x.double(), p) @ w.double().reshape(D, -1).T).view(B, -1, D)
    if b is not None:
        y = y + b.double()
    if pos is not None:
        y = y + pos.double()[rows]
    if cls is not None:
        c = cls.double().reshape(-1, D)
        if pos is not None and cls_pos >= 0:
            c = c + pos.double()[cls_pos:cls_pos + c.shape[0]]
        y = torch.cat([c.expand(B, -1, -1), y], 1)
    if nw is not None:
        y = F.layer_norm(y, (D,), nw.double(), None if nb is None else nb.double(), eps)
    return y


def _case(dtype, P=3, T_side=(2, 3), C=3, p=7, D=40, cls_pos=0, norm=True, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    T = T_side[0] * T_side[1]
    x = r(B, C, T_side[0] * p, T_side[1] * p).to(dtype)
    w = (r(D, C, p, p) * (C * p * p) ** -0.5).to(dtype)
    b = r(D).to(dtype)
    L = (P if cls_pos >= 0 else 0) + T + 2
    pos = r(L, D).to(dtype)
    first = P if cls_pos >= 0 else 0
    rows = torch.arange(first, first + T)
    cls = r(P, D).to(dtype) if P else None
    nw = (1 + 0.3 * r(D)).to(dtype) if norm else None
    nb = (0.3 * r(D)).to(dtype) if norm else None
    return x, w, b, pos, rows, cls, cls_pos, nw, nb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P,cls_pos,norm", [(3, 0, True), (2, -1, True), (1, 0, False), (0, 0, True)],
                         ids=["cls+reg-pos-norm", "no_embed_class-norm", "cls-pos", "no-prefix-norm"])
def test_op_prefix_rows_and_norm(dtype, P, cls_pos, norm, triton_backend):
    x, w, b, pos, rows, cls, cls_pos, nw, nb = _case(dtype, P=P, cls_pos=cls_pos, norm=norm)
    with fastvlm.trace() as t:
        out = patch_embed(x, w, b, pos=pos, pos_rows=rows, cls=cls, cls_pos=cls_pos, norm_weight=nw, norm_bias=nb,
                          eps=1e-5)
    assert [r.backend for r in t.records] == ["triton"]
    ref = _ref(x, w, b, pos, rows, cls, cls_pos, nw, nb, 1e-5)
    assert out.shape == ref.shape and out.dtype == dtype
    assert_close(out, ref, dtype, 147, roundings=3 if norm else 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("R,C,block_r", [(37, 40, None), (5, 1024, None), (9, 24, 4)])
def test_row_norm_kernel_in_place(dtype, R, C, block_r, triton_backend):
    from fastvlm.kernels.row_norm import row_norm_

    x = torch.randn(R, C) * 3 + 2
    w, b = 1 + 0.3 * torch.randn(C), 0.3 * torch.randn(C)
    buf = Guarded((R, C), dtype, "cpu", fill=x.to(dtype))
    row_norm_(buf.tensor, w.to(dtype), b.to(dtype), 1e-6, block_r=block_r)
    buf.check("rows")
    ref = F.layer_norm(x.to(dtype).double(), (C,), w.to(dtype).double(), b.to(dtype).double(), 1e-6)
    assert_close(buf.tensor, ref, dtype, C, roundings=2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_gradients(backend, monkeypatch):
    """Every input's gradient with prefix rows and the fused norm (the LayerNorm backward recomputes the pre-norm)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    dt = torch.float64 if backend == "torch" else torch.float32
    args = [t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in _case(dt, P=2, cls_pos=0, norm=True, T_side=(2, 2))]
    x, w, b, pos, rows, cls, cls_pos, nw, nb = args
    out = patch_embed(x, w, b, pos=pos, pos_rows=rows, cls=cls, cls_pos=cls_pos, norm_weight=nw, norm_bias=nb)
    g = torch.randn_like(out)
    leaves = [x, w, b, pos, cls, nw, nb]
    got = torch.autograd.grad(out, leaves, g)
    ref = torch.autograd.grad(_ref(x, w, b, pos, rows, cls, cls_pos, nw, nb, 1e-5), leaves, g.double())
    for name, a, r in zip("x w b pos cls nw nb".split(), got, ref):
        assert a.shape == r.shape, name
        if backend == "torch":
            assert rel_err(a, r) < 1e-10, name
        else:
            assert_close(a, r, torch.float32, 147 * 2, roundings=3, what=f"d{name}")


def test_opcheck_with_prefix_and_norm(torch_backend):
    x, w, b, pos, rows, cls, cls_pos, nw, nb = _case(torch.float32, P=2, T_side=(2, 2))
    args = (x, w, b, pos, cls, rows, cls_pos, None, None, 7, True, nw, nb, 1e-5)
    torch.library.opcheck(torch.ops.fastvlm.patch_embed.default, args)


# --------------------------------------------------------------------------------------------------------- CLIP


def _clip(layers=2):
    import transformers

    from fastvlm.testing import randomize_

    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                        num_hidden_layers=layers, image_size=42, patch_size=14)
    return randomize_(transformers.CLIPVisionModel(cfg)).eval()


def _records(t):
    return [(r.backend, r.detail) for r in t.records if r.op == "fastvlm::patch_embed"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_clip_pre_layrnorm_fused(backend, monkeypatch):
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    m = _clip()
    ref_model = copy.deepcopy(m).double()
    x = torch.randn(2, 3, 42, 42)
    sd = {k: v.data_ptr() for k, v in m.state_dict().items()}
    report = fastvlm.patch(m, verify=True)
    assert {e.path for e in report.patched} == {"embeddings", "pre_layrnorm"}, str(report)
    assert all("ok" in e.detail for e in report.patched), str(report)
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == sd
    with torch.no_grad(), fastvlm.trace() as t:
        out = m(x, output_hidden_states=True)
        ref = ref_model(x.double(), output_hidden_states=True)
    assert _records(t) == [(backend, "pixels(2, 3, 42, 42) float32 p14 -> 32 +layernorm")]
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip((out.last_hidden_state, out.pooler_output, *out.hidden_states),
                    (ref.last_hidden_state, ref.pooler_output, *ref.hidden_states)):
        assert_close(a, b, torch.float32, 588, roundings=4)
    norm = m.pre_layrnorm
    assert fastvlm.unpatch(m) == 2
    assert type(m.pre_layrnorm) is torch.nn.LayerNorm and m.pre_layrnorm.weight is norm.weight
    assert "forward" not in m.__dict__


def test_clip_modules_keep_their_own_outputs(torch_backend):
    """Called on their own, the paired embedding returns the un-normalised tokens and the pre-norm normalises."""
    m = _clip()
    emb, ln = m.embeddings, m.pre_layrnorm
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        e_ref = emb(x)
        fastvlm.patch(m)
        e = m.embeddings(x)
        assert rel_err(e, e_ref) < 1e-6
        assert rel_err(m.pre_layrnorm(e), ln(e_ref)) < 1e-6


def test_clip_hooks_see_the_original_tensors(torch_backend):
    """A hook on the pre-norm turns the fusion off: hooks see what they saw. Registered before patching, the
    pre-norm is not swapped (its hooks stay with it); registered on the swapped one, the call is not fused."""
    for before in (True, False):
        m = _clip()
        x = torch.randn(1, 3, 42, 42)
        seen = []
        hook = lambda mod, i, o: seen.append((i[0].clone(), o.clone()))  # noqa: E731
        if before:
            m.pre_layrnorm.register_forward_hook(hook)
        with torch.no_grad():
            ref = m(x).last_hidden_state
            report = fastvlm.patch(m)
            if before:
                assert [e.status for e in report.entries if e.path == "pre_layrnorm"] == ["not swapped"], str(report)
            else:
                m.pre_layrnorm.register_forward_hook(hook)
            with fastvlm.trace() as t:
                out = m(x).last_hidden_state
        assert "+layernorm" not in _records(t)[0][1]
        assert rel_err(out, ref) < 1e-6
        assert len(seen) == (2 if before else 1)
        assert rel_err(seen[-1][1], m.pre_layrnorm(seen[-1][0])) < 1e-6
        assert rel_err(seen[-1][0], m.embeddings(x)) < 1e-6  # the un-normalised embedding


def test_clip_gradients(torch_backend):
    m = _clip().double()
    ref_model = copy.deepcopy(m)
    fastvlm.patch(m)
    x = torch.randn(2, 3, 42, 42, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(m(x).last_hidden_state.square().sum(), [x] + list(m.parameters()), allow_unused=True)
    ref = torch.autograd.grad(ref_model(x).last_hidden_state.square().sum(), [x] + list(ref_model.parameters()), allow_unused=True)
    for (name, _), a, b in zip([("pixels", None)] + list(m.named_parameters()), got, ref):
        assert (a is None) == (b is None), name  # (the heads' parameters are unused by both)
        if a is not None:  # (k_proj's bias has a zero true gradient: absolute noise only)
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_pair_dtypes(dtype, triton_backend):
    m = _clip(layers=1).to(dtype)
    ref_model = copy.deepcopy(m).double()
    fastvlm.patch(m)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        out = m(x.to(dtype)).last_hidden_state
        ref = ref_model(x.to(dtype).double()).last_hidden_state
    assert out.dtype == dtype
    assert_close(out, ref, dtype, 588, roundings=8)


def test_clip_compile_fullgraph(torch_backend):
    m = _clip()
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        ref = m(x).last_hidden_state
    fastvlm.patch(m)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch.no_grad():
        assert rel_err(compiled(x).last_hidden_state, ref) < 1e-6
        assert rel_err(compiled(x).last_hidden_state, ref) < 1e-6
    assert len(graphs) == 1  # one graph, no recompilation on the second call
    calls = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    # the pre-norm went into the op call: 2 LayerNorms per layer + post_layernorm remain (eager has one more)
    assert sum("layer_norm" in c for c in calls) == 2 * 2 + 1 and sum("patch_embed" in c for c in calls) == 1


# --------------------------------------------------------------------------------------------------------- timm

TIMM_VARIANTS = [dict(), dict(reg_tokens=4), dict(no_embed_class=True, reg_tokens=2), dict(class_token=False,
                 global_pool="avg"), dict(pre_norm=True, reg_tokens=1), dict(pos_embed="none", reg_tokens=1),
                 dict(dynamic_img_size=True, pre_norm=True, reg_tokens=2), dict(dynamic_img_size=True,
                                                                                 no_embed_class=True)]


def _vit(**kw):
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from fastvlm.testing import randomize_

    assert timm
    return randomize_(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kw)).eval()


def _timm_inputs(kw):
    xs = [torch.randn(2, 3, 32, 32)]
    if kw.get("dynamic_img_size"):
        xs.append(torch.randn(2, 3, 40, 24))  # another grid: the resampled table (cached per grid)
    return xs


@pytest.mark.parametrize("kw", TIMM_VARIANTS, ids=str)
def test_timm_vit_forward_features(kw, torch_backend):
    m = _vit(**kw)
    xs = _timm_inputs(kw)
    with torch.no_grad():
        refs = [m.forward_features(x) for x in xs] + [m(xs[0])]
    sd = {k: v.data_ptr() for k, v in m.state_dict().items()}
    report = fastvlm.patch(m, verify=True)
    assert len(report.patched) == 2 and all("ok" in e.detail for e in report.patched), str(report)
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == sd
    with torch.no_grad(), fastvlm.trace() as t:
        outs = [m.forward_features(x) for x in xs] + [m(xs[0])]
    assert len(_records(t)) == len(outs)
    assert all(d.endswith("+layernorm") == bool(kw.get("pre_norm")) for _, d in _records(t))
    for a, b in zip(outs, refs):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    fastvlm.unpatch(m)
    assert not {"_pos_embed", "forward_features", "forward_intermediates"} & set(m.__dict__)
    assert type(m.norm_pre) in (torch.nn.Identity,) or type(m.norm_pre).__name__ == "LayerNorm"


@pytest.mark.parametrize("kw", [dict(pre_norm=True, reg_tokens=2), dict(dynamic_img_size=True, no_embed_class=True,
                                                                        reg_tokens=1)], ids=str)
def test_timm_vit_interpreter(kw, triton_backend):
    m = _vit(**kw)
    xs = _timm_inputs(kw)
    ref_model = copy.deepcopy(m).double()
    fastvlm.patch(m)
    with torch.no_grad(), fastvlm.trace() as t:
        outs = [m.forward_features(x) for x in xs]
        refs = [ref_model.forward_features(x.double()) for x in xs]
    assert [b for b, _ in _records(t)] == ["triton"] * len(xs)
    for a, b in zip(outs, refs):
        assert_close(a, b, torch.float32, 192, roundings=4)


def test_timm_forward_intermediates(torch_backend):
    m = _vit(pre_norm=True, reg_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_intermediates(x, indices=1, return_prefix_tokens=True)
        fastvlm.patch(m)
        with fastvlm.trace() as t:
            out = m.forward_intermediates(x, indices=1, return_prefix_tokens=True)
    assert _records(t)[0][1].endswith("+layernorm")
    assert rel_err(out[0], ref[0]) < 1e-6
    for a, b in zip(out[1], ref[1]):
        for u, v in zip(a, b):
            assert rel_err(u, v) < 1e-6


def test_timm_training_mode_dropout_is_not_fused(torch_backend):
    """Active position dropout between the embedding and the blocks: the unfused path runs, with the same RNG."""
    m = _vit(pos_drop_rate=0.5, pre_norm=True).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    ref = m.forward_features(x)
    fastvlm.patch(m)
    torch.manual_seed(1)
    with fastvlm.trace() as t:
        out = m.forward_features(x)
    assert not _records(t)[0][1].endswith("+layernorm")
    assert rel_err(out, ref) < 1e-6


def test_timm_gradients(torch_backend):
    m = _vit(pre_norm=True, reg_tokens=2, dynamic_img_size=True).double()
    ref_model = copy.deepcopy(m)
    fastvlm.patch(m)
    x = torch.randn(2, 3, 40, 24, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(m.forward_features(x).square().sum(), [x] + list(m.parameters()), allow_unused=True)
    ref = torch.autograd.grad(ref_model.forward_features(x).square().sum(), [x] + list(ref_model.parameters()), allow_unused=True)
    for (name, _), a, b in zip([("pixels", None)] + list(m.named_parameters()), got, ref):
        assert (a is None) == (b is None), name  # (the heads' parameters are unused by both)
        if a is not None:  # (k_proj's bias has a zero true gradient: absolute noise only)
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)


def test_timm_compile_fullgraph(torch_backend):
    m = _vit(pre_norm=True, reg_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.forward_features(x)
    fastvlm.patch(m)
    compiled = torch.compile(m.forward_features, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), ref) < 1e-6


def test_timm_vit_b16_registers_full_size(torch_backend):
    """timm's ViT-B/16 with 4 registers at 256 px (random weights), PyTorch path: forward_features unchanged."""
    timm = pytest.importorskip("timm")
    m = timm.create_model("vit_base_patch16_reg4_gap_256", pretrained=False).eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        ref = m.forward_features(x)
        report = fastvlm.patch(m)
        assert len(report.patched) == 2, str(report)
        out = m.forward_features(x)
    assert out.shape == ref.shape == (1, 260, 768) and rel_err(out, ref) < 1e-5


def test_deepcopy_and_pickle_of_a_paired_model(torch_backend):
    """The pairing lives in copyable objects: a deep copy runs (and unpatches) its own modules, pickling works."""
    import io

    m = _clip()
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        ref = m(x).last_hidden_state
    fastvlm.patch(m)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.pre_layrnorm.weight.mul_(2)  # only the copy changes
        with fastvlm.trace() as t:
            out = twin(x).last_hidden_state
            assert rel_err(m(x).last_hidden_state, ref) < 1e-6
    assert all(d.endswith("+layernorm") for _, d in _records(t))
    unfused = copy.deepcopy(twin)
    fastvlm.unpatch(unfused)
    with torch.no_grad():
        assert rel_err(out, unfused(x).last_hidden_state) < 1e-6 and rel_err(out, ref) > 1e-3
    assert type(m.pre_layrnorm).__name__ == "FusedPreNormLayerNorm"  # the original model is still patched
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert rel_err(loaded(x).last_hidden_state, ref) < 1e-6


def test_clip_unexpected_consumer_input_raises(torch_backend):
    """After the armed embedding handed over normalised tokens, a pre-norm call on another tensor would normalise
    twice if it ran the LayerNorm: it raises instead (a transformers forward that no longer matches the pairing)."""
    m = _clip()
    fastvlm.patch(m)
    pair = m.pre_layrnorm.__dict__["_fastvlm_pair"]
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        with pair.arm() as call:
            out = m.embeddings(x)
            assert call.out is out
            with pytest.raises(RuntimeError, match="expected the pre-norm to receive"):
                m.pre_layrnorm(out.clone())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_llama4_class_token_last_positions_and_layernorm_pre(backend, monkeypatch):
    """Llama 4's embedding stage (Unfold + Linear, the class token appended *last*, the position table, then
    ``layernorm_pre``) is one ``patch_embed`` call: ``cls_first=False`` with ``cls_pos = T`` and the fused LayerNorm.
    Compared with what ``Llama4VisionModel.forward`` hands its ``layernorm_pre`` output to the encoder (a hook)."""
    monkeypatch.setenv("FASTVLM_BACKEND", backend)
    from transformers.models.llama4.configuration_llama4 import Llama4VisionConfig
    from transformers.models.llama4.modeling_llama4 import Llama4VisionModel

    from fastvlm.testing import randomize_

    cfg = Llama4VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                             image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                             projector_output_dim=64, pixel_shuffle_ratio=0.5)
    m = randomize_(Llama4VisionModel(cfg).float().eval())
    with torch.no_grad():
        m.layernorm_pre.weight.copy_(1 + 0.1 * torch.randn(32))
        m.layernorm_pre.bias.normal_(0, 0.1)
    seen = []
    m.layernorm_pre.register_forward_hook(lambda mod, i, o: seen.append(o.double()))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        m.double()(x.double())
        m.float()
        ref = seen[0].reshape(2, 17, 32)
        lin, ln = m.patch_embedding.linear, m.layernorm_pre
        T = 16
        out = patch_embed(x, lin.weight.view(32, 3, 14, 14), None, pos=m.positional_embedding_vlm,
                          pos_rows=torch.arange(T), cls=m.class_embedding, cls_pos=T, cls_first=False,
                          norm_weight=ln.weight, norm_bias=ln.bias, eps=ln.eps)
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32, 588, roundings=3)
