"""Cached plans never go stale: a module's plan (fastvlm/nn/_plan.py), the ops' checked shape keys and the launchers'
launch plans (kernels/_launch.py) must follow every change of parameters, children, settings, dtypes and devices.

Each case changes a fused module after a first call and compares the next call with the original class's forward
run on the same (changed) module, so a stale plan (old weights, old activation, old eps) shows as a wrong result.
"""
import copy
import threading

import pytest
import torch
import torch.nn as nn

import fastvlm
from fastvlm import _dispatch
from fastvlm.nn import _plan
from fastvlm.testing import args_for, build
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


def _reference(fused, *args):
    """The original class's forward on the fused module itself: the same (possibly changed) children."""
    with torch.no_grad():
        return fused._fastvlm_base.forward(fused, *args)


def _check(fused, args, dtype=torch.float32, k=64):
    with torch.no_grad():
        out = fused(*args)
    assert_close(out, _reference(fused, *args), dtype, k)
    return out


def _changes():
    """(name, change(fused)) for a LLaVA projector; each changes what the next call must compute."""
    def replace_parameter(f):
        f.linear_1.weight = nn.Parameter(torch.randn_like(f.linear_1.weight))

    def replace_bias_by_none(f):
        f.linear_2.bias = None

    def in_place(f):
        with torch.no_grad():
            f.linear_2.weight.mul_(-3.0)

    def load_state_dict(f):
        f.load_state_dict({k: torch.randn_like(v) for k, v in f.state_dict().items()})

    def load_state_dict_assign(f):
        f.load_state_dict({k: torch.randn_like(v) for k, v in f.state_dict().items()}, assign=True)

    def replace_child(f):
        f.act = nn.SiLU()

    def change_setting(f):
        f.act = nn.GELU()
        with torch.no_grad():
            f(*args_for("llava", f))  # planned with this GELU
        f.act.approximate = "tanh"  # a setting of the same child, changed after the plan read it

    def swap_data(f):  # what .half() / .to() do to each parameter (same Parameter object, new storage)
        f.linear_1.weight.data = torch.randn_like(f.linear_1.weight)

    return [replace_parameter, replace_bias_by_none, in_place, load_state_dict, load_state_dict_assign,
            replace_child, change_setting, swap_data]


@pytest.mark.parametrize("change", _changes(), ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_projector_plan_follows_changes(change, backend, request):
    request.getfixturevalue(f"{backend}_backend")
    fused = fastvlm.nn.from_module(build("llava"))
    args = args_for("llava", fused)
    before = _check(fused, args)
    change(fused)
    after = _check(fused, args)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dtype_conversion_and_device_move(backend, request, monkeypatch):
    """``.to(dtype)`` / ``.half()`` swap each parameter's storage; ``.to(device)`` too (the meta device stands in
    for a second device here: its result must have the new device, which a stale plan would not give)."""
    request.getfixturevalue(f"{backend}_backend")
    fused = fastvlm.nn.from_module(build("internvl"))
    args = args_for("internvl", fused)
    _check(fused, args)
    fused.to(torch.bfloat16)
    args16 = tuple(a.to(torch.bfloat16) for a in args)
    with torch.no_grad():
        out = fused(*args16)
    assert out.dtype == torch.bfloat16
    ref = copy.deepcopy(fused).double()
    assert_close(out, _reference(ref, *(a.double() for a in args)), torch.bfloat16, 64 * 4)
    fused.to(torch.float32)
    _check(fused, args)
    fused.to("meta")
    monkeypatch.setenv("FASTVLM_BACKEND", "auto" if backend == "triton" else backend)  # (no kernel on meta)
    with torch.no_grad():
        out = fused(*(a.to("meta") for a in args))
    assert out.device.type == "meta"


def test_eps_and_training_flag_are_part_of_the_plan(triton_backend):
    fused = fastvlm.nn.from_module(build("internvl"))
    args = args_for("internvl", fused)
    _check(fused, args)
    fused.layer_norm.eps = 0.5  # a large eps changes the output visibly
    _check(fused, args)
    fused.train()  # no dropout in this projector: still fused, same result
    with fastvlm.trace() as t:
        _check(fused, args)
    assert t.backends() == ["triton"], str(t)


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl", "mistral3"])
def test_other_layouts_follow_parameter_replacement(family, triton_backend):
    """Gemma 3's [in, out] weight (transposed per call, never kept), Qwen2-VL's norm, Mistral 3's merger."""
    fused = fastvlm.nn.from_module(build(family))
    args = args_for(family, fused)
    _check(fused, args, k=256)
    for name, p in list(fused.named_parameters()):
        owner, _, attr = name.rpartition(".")
        mod = fused.get_submodule(owner) if owner else fused
        setattr(mod, attr, nn.Parameter(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0)))
    _check(fused, args, k=256)


def test_hooks_added_after_the_first_call_force_the_original(triton_backend):
    fused = fastvlm.nn.from_module(build("llava"))
    args = args_for("llava", fused)
    _check(fused, args)
    seen = []
    fused.linear_2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with fastvlm.trace() as t:
        _check(fused, args)
    assert seen and any("forward hooks" in " ".join(r.reasons) for r in t.records), str(t)


def test_qformer_plan_follows_child_replacement(triton_backend):
    from fastvlm.bench.qformer import QUICK, build_qformer

    m = build_qformer(QUICK, "eager", "cpu", torch.float32)
    fused = fastvlm.nn.from_module(m)
    q, enc = torch.randn(1, 4, 64), torch.randn(1, 9, 48)
    kw = dict(query_embeds=q, encoder_hidden_states=enc)
    with torch.no_grad():
        fused(**kw)
    fused.encoder.layer[0].intermediate_query.intermediate_act_fn = nn.Tanh()  # no kernel: must fall back now
    with fastvlm.trace() as t, torch.no_grad():
        out = fused(**kw).last_hidden_state
    assert any("has no fused kernel" in " ".join(r.reasons) for r in t.records), str(t)
    with torch.no_grad():
        assert_close(out, m(**kw).last_hidden_state, torch.float32, 64)


def test_plans_are_not_pickled_or_adopted():
    import pickle

    fused = fastvlm.nn.from_module(build("llava"))
    with torch.no_grad():
        fused(*args_for("llava", fused))
    assert _plan.PLAN_ATTR in fused.__dict__
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert _plan.PLAN_ATTR not in clone.__dict__
        args = args_for("llava", clone)
        _check(clone, args)
    again = type(fused).from_module(fused)
    assert _plan.PLAN_ATTR not in again.__dict__


def test_checked_shape_keys_still_reject_bad_shapes(triton_backend):
    """A key that passed its checks is trusted; a new key is checked again (the error names the tensor)."""
    from fastvlm.kernels.gemm import fused_linear

    x, w = torch.randn(5, 16), torch.randn(8, 16)
    fastvlm.mlp_projector(x, w, act="none")
    with pytest.raises(ValueError, match="linear_1.weight"):
        fastvlm.mlp_projector(x, torch.randn(8, 12), act="none")
    fused_linear(x, w)
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear(x, w, torch.randn(7))
    out = torch.empty(5, 8)
    fused_linear(x, w, out=out)
    with pytest.raises(ValueError, match="out must be"):
        fused_linear(x, w, out=torch.empty(5, 9))


def test_concurrent_calls_share_plans(torch_backend):
    """Threads calling one module (different shapes, its plan built concurrently) all get correct results. (The
    PyTorch path: the Triton interpreter itself runs one kernel at a time; the launchers' plans are exercised from
    threads by tests/test_launch_path.py on the host-only driver.)"""
    fused = fastvlm.nn.from_module(build("llava"))
    inputs = [torch.randn(1, n, fused.linear_1.in_features) for n in (3, 5, 3, 5, 4, 3, 5, 4)]
    refs = [_reference(fused, x) for x in inputs]
    outs = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                outs[i] = fused(inputs[i])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for out, ref in zip(outs, refs):
        assert_close(out, ref, torch.float32, 64)


def test_trace_details_are_built_only_while_tracing(triton_backend):
    """No trace open: an op's record (and its detail string) is not built at all."""
    calls = []

    def detail():
        calls.append(1)
        return "detail"

    assert _dispatch.choose_backend("fastvlm::test", torch.device("cpu"), (), detail) == "triton"
    assert not calls
    with fastvlm.trace() as t:
        _dispatch.choose_backend("fastvlm::test", torch.device("cpu"), (), detail)
    assert calls == [1] and t.records[0].detail == "detail"


def test_specialisation_key_separates_what_triton_specialises_on():
    """Two launches share a compiled kernel only when Triton would specialise them alike: tensor dtype and 16-byte
    alignment, integers equal to 1, divisible by 16, and their width."""
    from fastvlm.kernels._launch import spec_key

    x = torch.zeros(64)
    keys = [spec_key((x,)), spec_key((x.half(),)), spec_key((x[1:],)), spec_key((None,)),
            spec_key((1,)), spec_key((2,)), spec_key((32,)), spec_key((2 ** 40,)), spec_key((2 ** 63 + 16,)),
            spec_key((1.0,)), spec_key((True,))]
    assert len(set(keys)) == len(keys), keys
    assert spec_key((x, 48)) == spec_key((torch.ones(64), 64))  # same dtype, aligned, both divisible by 16


def test_shared_plans_keep_dtypes_apart(triton_backend):
    """One launch plan (same constexprs) serves calls of several dtypes; each gets its own result."""
    from fastvlm.kernels.norm_stats import row_stats

    x = torch.randn(6, 40)
    for t in (x, x.to(torch.bfloat16), x.double().float()):
        mean, rstd = row_stats(t, 1e-5, False)
        ref = t.float()
        assert torch.allclose(mean, ref.mean(-1), atol=1e-5)
        assert torch.allclose(rstd, torch.rsqrt(ref.var(-1, unbiased=False) + 1e-5), rtol=1e-4)
