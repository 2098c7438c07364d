"""The triton_op twins (fastvlm.ops.compiled): the path a compiled graph takes, run here with real values.

Under torch.compile a fused op's functional calls its twin ``fastvlm::NAME_launch``, whose body is the op's own
implementation with every launch traced (``kernels._launch.traced``: ``wrap_triton(kernel)[grid](...)`` with the
plan's constexprs, autotuned kernels on their rule config). The Triton interpreter's kernels cannot be traced, but
``wrap_triton`` hands them back for an eager call: with ``torch.compiler.is_compiling`` forced True (and the
interpreter allowed), each fused module runs through the twins eagerly, on the traced launch path, with its
registered autograd; checked against the original module in float64, gradients too. That the compiled graph holds
the kernel calls, with the eager launches' arguments, is tests/test_compiled_launch.py's part (no interpreter).
"""
import copy

import pytest
import torch

import fastvlm
from fastvlm.ops import compiled
from compiled_launch_check import op_cases
from helpers import assert_close, double as _double, first_output as _first, linear_k as _k

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


@pytest.fixture
def twins(monkeypatch, triton_backend):
    """Every fused op's compiled branch, run eagerly through the twins; yields the ops taken."""
    taken = []
    real = compiled.op_for

    def op_for(name, x, named=()):
        op = real(name, x, named)
        taken.append(str(op))
        return op

    monkeypatch.setattr(compiled, "_interpreting", lambda: False)
    monkeypatch.setattr(compiled, "op_for", op_for)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    yield taken


def _cases(family):
    from fastvlm.bench.overhead import family_cases, handoff_case, qformer_case

    if family == "qformer":
        return [qformer_case(layers=2)]
    if family == "handoff":
        return [handoff_case()]
    return family_cases(family)


# projectors (plain, gated, merge + norm, shuffle, pooled), patch embeddings, Q-Former, perceiver, hand-off
FAMILIES = ["llava", "qwen2_vl", "idefics3", "gemma3", "aya_vision", "idefics2", "qformer", "handoff"]


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f == "qwen2_vl" else f
                                    for f in FAMILIES])  # (qwen2_vl: ~30 s, its graph is tests/test_compiled_launch's)
def test_twins_match_the_original(family, twins):
    cases = _cases(family)
    assert cases
    for case in cases:
        with torch.no_grad():
            out = _first(case.fused(*case.args, **case.kwargs))
            ref = _first(copy.deepcopy(case.original).double()(*_double(case.args), **_double(case.kwargs)))
        assert_close(out, ref, torch.float32, _k(case.original), roundings=4, what=case.name)
    assert twins and all(t.endswith("_launch") for t in twins), twins


@pytest.mark.parametrize("family", ["llava", pytest.param("qwen2_vl", marks=pytest.mark.slow),
                                    pytest.param("qformer", marks=pytest.mark.slow)])
def test_twins_backward(family, twins):
    """Training calls take the twins too; their registered autograd (the op's PyTorch backward) gives the original
    module's parameter gradients."""
    for case in _cases(family):
        params = [p for p in case.fused.parameters() if p.requires_grad]
        out = _first(case.fused(*case.args, **case.kwargs))
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, params, g, allow_unused=True)
        ref_mod = copy.deepcopy(case.original).double()
        ref_params = dict(ref_mod.named_parameters())
        ref_out = _first(ref_mod(*_double(case.args), **_double(case.kwargs)))
        names = [n for n, p in case.fused.named_parameters() if p.requires_grad]
        ref_grads = torch.autograd.grad(ref_out, [ref_params[n] for n in names], g.double(), allow_unused=True)
        for n, a, b in zip(names, grads, ref_grads):
            if b is None or n.endswith("key.bias"):  # (a key bias's gradient is 0: softmax ignores a shift per row)
                continue
            assert a is not None, n
            assert_close(a, b, torch.float32, _k(ref_mod), roundings=4, what=f"{case.name}: {n}.grad")
    assert twins and all(t.endswith("_launch") for t in twins), twins


def test_symbolic_shapes_keep_the_opaque_op(monkeypatch, triton_backend):
    """``dynamic=True``: the launchers key their plans on concrete sizes, so a twin given symbolic shapes calls the
    opaque custom op (which runs the kernels at run time): it is in the graph, and the result is right."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from fastvlm.testing import args_for, build

    monkeypatch.setattr(compiled, "_interpreting", lambda: False)
    m = build("llava")
    fused = fastvlm.nn.from_module(m)
    (x,) = args_for("llava", m)
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fused, fullgraph=True, dynamic=True, backend=aot_autograd(fw_compiler=keep))(x)
        assert_close(out, m.double()(x.double()), torch.float32, _k(m))
    calls = {str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"}
    assert "fastvlm.mlp_projector.default" in calls and "triton_kernel_wrapper_functional" not in calls, calls


def _op_reference(name, args):
    a = [t.double() if t.is_floating_point() else t for t in args]
    if name.startswith("pool_tokens"):
        x, rows = a
        return x[rows].mean(1) if "mean" in name else x[rows].amax(1)
    fmap, w1, b1, w2, b2 = a
    tokens = torch.nn.functional.avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(tokens, w1, b1)), w2, b2)


def test_op_twins_pool_and_feature_map(twins):
    for case in op_cases():
        with torch.no_grad():
            out = case.fused(*case.args)
        assert_close(out, _op_reference(case.name, case.args), torch.float32, 64, roundings=2, what=case.name)
    assert {"fastvlm.pool_tokens_launch", "fastvlm.feature_map_projector_launch"} <= set(twins), twins


def test_reasons_for_the_opaque_op(monkeypatch, triton_backend):
    """Why a compiled call keeps the opaque op, read when tracing: the switch, the backend, the interpreter, dtypes."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    assert compiled.reasons(x, (("w", w),)) == ["the Triton interpreter's kernels cannot be traced by wrap_triton"]
    monkeypatch.setattr(compiled, "_interpreting", lambda: False)
    assert compiled.reasons(x, (("w", w),)) == []
    assert "w is torch.float64" in compiled.reasons(x, (("w", w.double()),))[0]
    monkeypatch.setenv("FASTVLM_COMPILE_LAUNCH", "op")
    assert compiled.reasons(x) == ["FASTVLM_COMPILE_LAUNCH=op"]
    assert str(compiled.op_for("fastvlm::mlp_projector", x)) == "fastvlm.mlp_projector"
    monkeypatch.setenv("FASTVLM_COMPILE_LAUNCH", "inductor")
    assert str(compiled.op_for("fastvlm::mlp_projector", x)) == "fastvlm.mlp_projector_launch"
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")
    assert compiled.reasons(x) == ["FASTVLM_BACKEND=torch"]
    monkeypatch.setenv("FASTVLM_COMPILE_LAUNCH", "nonsense")
    with pytest.raises(ValueError, match="FASTVLM_COMPILE_LAUNCH"):
        compiled.reasons(x)
