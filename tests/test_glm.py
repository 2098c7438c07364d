"""GLM-4V's connector chain (fastvlm/nn/glm.py): the downsample Conv2d as one GEMM over each window's rows, the merger
(proj + LayerNorm, GELU, SwiGLU) as two ops. Reference: the original modules themselves in float64."""
import copy

import pytest
import torch
import torch.nn as nn

import fastvlm
from fastvlm.integrations import structure
from fastvlm.nn.glm import FusedMergeConv2d
from fastvlm.testing import randomize_, rel_err, tolerance

import tester_configs

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


def _merger(cls_path="glm4v.modeling_glm4v.Glm4vVisionPatchMerger", dim=24, context=22, act="silu", seed=0):
    import importlib

    mod, name = cls_path.rsplit(".", 1)
    torch.manual_seed(seed)
    m = getattr(importlib.import_module("transformers.models." + mod), name)(dim, context, act).eval()
    randomize_(m, std=0.3)
    return m


def _fallbacks(t, op):
    """The module-level fallbacks a trace recorded for ``op`` (the fused module ran its original forward)."""
    return [r for r in t.records if r.op == op]


def _grads(module, x):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(y.dtype)
    (y * g).sum().backward()
    return y, x.grad, {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_merger_matches_the_original_in_float64(backend, act, request):
    request.getfixturevalue(backend)
    m = _merger(act=act)
    ref = copy.deepcopy(m).double()
    fused = fastvlm.nn.from_module(m)
    assert type(fused).__name__ == "FusedGlm4vVisionPatchMerger" and not fused._fastvlm_structure()
    assert fused.state_dict().keys() == m.state_dict().keys()
    x = torch.randn(13, 24) * 2 + 0.5
    with fastvlm.trace() as t:
        y, gx, gp = _grads(fused, x)
    assert set(t.backends()) == {"triton" if backend == "triton_backend" else "torch"}, str(t)
    y_ref, gx_ref, gp_ref = _grads(ref, x.double())
    tol = tolerance(torch.float32, 24 + 22, roundings=4)
    assert rel_err(y, y_ref) <= tol
    assert rel_err(gx, gx_ref) <= 4 * tol  # backward: two more GEMMs and the LayerNorm's adjoint
    for name, g in gp.items():
        assert rel_err(g, gp_ref[name]) <= 4 * tol, name


def test_merger_nonfinite_and_unsupported_activation():
    m = _merger()
    fused = fastvlm.nn.from_module(m)
    x = torch.randn(5, 24)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    with torch.no_grad():
        assert torch.equal(fused(x).isnan(), m(x).isnan())
    m.act_fn = nn.Tanh()  # no fused equivalent: the original runs, and says why
    fused = fastvlm.nn.from_module(m)
    assert any("act_fn" in r for r in fused._fastvlm_structure())
    with fastvlm.trace() as t, torch.no_grad():
        assert torch.equal(fused(x[:1]), m(x[:1]))
    assert _fallbacks(t, "FusedGlm4vVisionPatchMerger"), str(t)


@pytest.mark.parametrize("cls_path", ["glm4v_moe.modeling_glm4v_moe.Glm4vMoeVisionPatchMerger",
                                      "glm_ocr.modeling_glm_ocr.GlmOcrVisionPatchMerger"])
def test_merger_copies_are_recognised_by_structure(cls_path, torch_backend):
    m = _merger(cls_path)
    match = structure.recognise(m)
    assert match is not None and match.ok, match and match.detail
    x = torch.randn(6, 24)
    with torch.no_grad():
        assert rel_err(match.fused(x), m(x)) <= tolerance(torch.float32, 46, roundings=4)


def _conv(m, c=12, out=10, seed=1):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, out, kernel_size=m, stride=m)
    randomize_(conv, std=0.3)
    return conv


def _glm_layout(n, m, c):
    """Rows viewed as GLM's forward views them: [N * m * m, C] -> [N, m, m, C] -> NCHW."""
    return torch.randn(n * m * m, c).view(n, m, m, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("layout", ["glm", "nchw"])
def test_merge_conv_matches_conv2d_in_float64(backend, m, layout, request):
    request.getfixturevalue(backend)
    conv = _conv(m)
    ref = copy.deepcopy(conv).double()
    fused = FusedMergeConv2d.from_module(conv)
    x = _glm_layout(7, m, 12) if layout == "glm" else torch.randn(7, 12, m, m)
    with fastvlm.trace() as t:
        y, gx, gp = _grads(fused, x)
    assert not _fallbacks(t, "FusedMergeConv2d"), str(t)
    assert set(t.backends()) == {"triton" if backend == "triton_backend" else "torch"}, str(t)
    y_ref, gx_ref, gp_ref = _grads(ref, x.double())
    assert y.shape == y_ref.shape == (7, 10, 1, 1) and y.is_contiguous()
    tol = tolerance(torch.float32, 12 * m * m)
    assert rel_err(y, y_ref) <= tol
    assert rel_err(gx, gx_ref) <= 2 * tol
    for name, g in gp.items():
        assert rel_err(g, gp_ref[name]) <= 2 * tol, name


def test_merge_conv_other_inputs_run_conv2d_and_say_so():
    conv = _conv(2)
    fused = FusedMergeConv2d.from_module(conv)
    x = torch.randn(2, 12, 6, 4)  # several windows per item: the original convolution
    with fastvlm.trace() as t, torch.no_grad():
        assert torch.equal(fused(x), conv(x))
    assert _fallbacks(t, "FusedMergeConv2d"), str(t)
    with pytest.raises(RuntimeError):  # the original's own error for a wrong channel count
        fused(torch.randn(2, 5, 2, 2))


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ["glm4v", "glm4v_merge1"])
def test_glm4v_patched_on_the_kernels(name, triton_backend):
    """transformers' small GLM-4V with the Triton kernels (the interpreter): verify clean, logits and greedy
    generate unchanged, and the merger chain runs on the kernels."""
    model, inputs = tester_configs.build(name)
    ref = _logits(model, inputs)
    ref_gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    report = fastvlm.patch(model, verify=True)
    paths = {e.path for e in report.patched}
    assert {"model.visual.merger", "model.visual.downsample", "model.visual.patch_embed"} <= paths, str(report)
    assert all(e.detail.endswith("ok") for e in report.patched if e.fused != "hand-off"), str(report)
    with fastvlm.trace() as t:
        out = _logits(model, inputs)
    assert "triton" in t.backends(), str(t)
    assert rel_err(out, ref) <= tolerance(torch.float32, 4 * 32, roundings=3)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_gen)


def test_glm4v_backward_through_the_patched_model(torch_backend):
    """Gradients of the vision tower's parameters through the patched chain equal the unpatched model's."""
    model, inputs = tester_configs.build("glm4v")
    visual = model.model.visual

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).logits.square().mean().backward()
        return {n: p.grad.clone() for n, p in visual.named_parameters()
                if n.startswith(("merger.", "downsample.", "post_layernorm."))}

    ref = grads()
    fastvlm.patch(model)
    out = grads()
    assert out.keys() == ref.keys() and len(out) == 9  # proj, LayerNorm (2), gate, up, down, conv (2), RMSNorm
    for n in ref:
        assert rel_err(out[n], ref[n]) <= 4 * tolerance(torch.float32, 4 * 32, roundings=3), n


@pytest.mark.slow
def test_chain_under_torch_compile_fullgraph(torch_backend):
    """The downsample and merger as GLM's forward calls them, compiled with fullgraph=True (about a minute)."""
    m, conv = _merger(dim=24), _conv(2, c=12, out=24)
    fm, fc = fastvlm.nn.from_module(m), FusedMergeConv2d.from_module(conv)

    def chain(merger, down, x):
        return merger(down(x.view(-1, 2, 2, 12).permute(0, 3, 1, 2)).view(-1, 24))

    x = torch.randn(20, 12)
    out = torch.compile(lambda t: chain(fm, fc, t), fullgraph=True)(x)
    ref = chain(copy.deepcopy(m).double(), copy.deepcopy(conv).double(), x.double())
    assert rel_err(out, ref) <= tolerance(torch.float32, 48 + 22, roundings=4)
