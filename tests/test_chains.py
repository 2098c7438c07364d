"""A module's repeat path (fastvlm/ops/_fast.py: the chain of plain GEMM launches a module keeps) never goes stale and
steps aside whenever a call needs more than a launch.

Each case calls a fused module twice (the second call takes the chain), changes the module, its input or the
process state, and compares the next call with the original class's forward run on the same module (or the plain
linear), so a stale chain (old dtype, old strides, old parameter, old backend) shows as a wrong result. Kernels run in
the Triton interpreter (the ``triton_backend`` fixture); the launch itself is compared with the op's on the host-only
driver in tests/test_launch_path.py.
"""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvlm
from fastvlm.nn.linear import FusedLinear
from fastvlm.ops import _fast
from fastvlm.testing import args_for, build
from helpers import assert_close

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")


def _call(module, *args, expect_chain=None):
    """``module(*args)`` without autograd; with ``expect_chain``, asserts whether a chain answered the call."""
    taken = []
    run = _fast.Chain.run

    def spy(self, x, params):
        y = run(self, x, params)
        taken.append(isinstance(y, torch.Tensor))
        return y

    _fast.Chain.run = spy
    try:
        with torch.no_grad():
            out = module(*args)
    finally:
        _fast.Chain.run = run
    if expect_chain is not None:
        assert any(taken) == expect_chain, taken
    return out


def _ref(module, *args):
    with torch.no_grad():
        if isinstance(module, FusedLinear):
            return F.linear(args[0], module.weight, module.bias)
        return module._fastvlm_base.forward(module, *args)


def _linear_changes():
    def half(m, x):
        m.half()
        return (x.half(),)

    def replace_parameter(m, x):
        m.weight = nn.Parameter(torch.randn_like(m.weight))
        return (x,)

    def in_place(m, x):
        with torch.no_grad():
            m.weight.mul_(-3.0)
        return (x,)

    def load_state_dict(m, x):
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()})
        return (x,)

    def load_state_dict_assign(m, x):
        m.load_state_dict({k: torch.randn_like(v) for k, v in m.state_dict().items()}, assign=True)
        return (x,)

    def bias_removed(m, x):
        m.bias = None
        return (x,)

    def transposed_data(m, x):  # same Parameter, same storage, same shape: only the strides tell
        m.weight.data = m.weight.data.t()
        return (x,)

    def input_strides(m, x):  # same shape, columns strided: the launch was planned for unit column stride
        return (torch.randn(x.shape[-1], x.numel() // x.shape[-1]).t().reshape(x.shape),)

    def input_transposed_rows(m, x):
        return (torch.randn(x.shape[-1], 7).t(),)

    def input_sliced(m, x):  # rows with no 2-D view (a class token dropped): copied per call, as the op does
        return (torch.randn(x.shape[0], x.shape[1] + 1, x.shape[2])[:, 1:],)

    return [half, replace_parameter, in_place, load_state_dict, load_state_dict_assign, bias_removed,
            transposed_data, input_strides, input_transposed_rows, input_sliced]


@pytest.mark.parametrize("change", _linear_changes(), ids=lambda c: c.__name__)
def test_fused_linear_chain_follows_changes(change, triton_backend):
    torch.manual_seed(0)
    m = FusedLinear.from_module(nn.Linear(24, 24))
    x = torch.randn(2, 5, 24)
    _call(m, x)
    out = _call(m, x, expect_chain=True)
    assert_close(out, _ref(m, x), torch.float32, 24)
    args = change(m, x)
    dtype = args[0].dtype
    for i in range(2):  # the call after the change, then the chain rebuilt from it
        out = _call(m, *args, expect_chain=True if i and change.__name__ == "input_sliced" else None)
        assert out.dtype == dtype and out.shape == _ref(m, *args).shape
        assert_close(out, _ref(m, *args), dtype, 24)


@pytest.mark.parametrize("family", ["llava", "paligemma", "idefics3", "fast_vlm", "idefics2:mlp", "vipllava",
                                    "internvl"])
def test_projector_chains_follow_parameter_and_dtype_changes(family, triton_backend):
    torch.manual_seed(0)
    fused = fastvlm.nn.from_module(build(family))
    args = args_for(family, fused)
    if family == "fast_vlm":  # one feature map's token view (channel-strided), read in place
        x = args[0]
        args = (torch.randn(1, x.shape[2], x.shape[1]).transpose(1, 2),)
    _call(fused, *args)
    out = _call(fused, *args, expect_chain=True)
    assert_close(out, _ref(fused, *args), torch.float32, 64)
    for name, p in list(fused.named_parameters()):
        owner, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(owner) if owner else fused, attr, nn.Parameter(torch.randn_like(p)))
    assert_close(_call(fused, *args), _ref(fused, *args), torch.float32, 64)
    fused.half()
    args16 = tuple(a.half() for a in args)
    _call(fused, *args16)
    out = _call(fused, *args16, expect_chain=True)
    assert out.dtype == torch.float16
    assert_close(out, _ref(copy.deepcopy(fused).double(), *(a.double() for a in args16)), torch.float16, 64 * 4)


def test_chain_steps_aside_for_trace_autocast_grad_and_backend(triton_backend, monkeypatch):
    torch.manual_seed(0)
    m = FusedLinear.from_module(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    _call(m, x)
    _call(m, x, expect_chain=True)
    with fastvlm.trace() as t:  # a trace records every call
        _call(m, x)
    assert t.backends() == ["triton"], str(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: nn.Linear's own forward applies its casts
        with fastvlm.trace() as t:
            out = m(x)
    assert out.dtype == torch.bfloat16 and t.backends() == ["torch"], str(t)
    out = m(x)  # grad enabled, the weight needs a gradient: the autograd path
    out.sum().backward()
    assert m.weight.grad is not None
    monkeypatch.setenv("FASTVLM_BACKEND", "torch")  # read at every call, the chain's included
    with fastvlm.trace() as t:
        assert_close(_call(m, x), _ref(m, x), torch.float32, 16)
    assert t.backends() == ["torch"], str(t)
    monkeypatch.setenv("FASTVLM_STRICT", "1")
    monkeypatch.setenv("FASTVLM_BACKEND", "triton")
    assert_close(_call(m, x), _ref(m, x), torch.float32, 16)


def test_chains_are_not_copied(triton_backend):
    m = FusedLinear.from_module(nn.Linear(16, 8))
    x = torch.randn(3, 16)
    _call(m, x)
    assert any(k.startswith("_fastvlm_module_plan") for k in m.__dict__)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert not any(k.startswith("_fastvlm_module_plan") for k in clone.__dict__)
        with torch.no_grad():
            clone.weight.mul_(2.0)
        assert_close(_call(clone, x), _ref(clone, x), torch.float32, 16)
        assert_close(_call(m, x), _ref(m, x), torch.float32, 16)


def test_index_tables_are_checked_again_after_an_edit():
    """check_indices keeps what it found on the table (bounds, version, memory): an unedited table is not read again,
    an edited, moved or swapped one is."""
    from fastvlm.ops import _checks

    t = torch.tensor([0, 3, 2])
    _checks.check_indices("op", "rows", t, 4)
    assert t._fastvlm_checked[:2] == (0, 3)
    _checks.check_indices("op", "rows", t, 4)  # the mark answers
    with pytest.raises(IndexError, match=r"holds indices 0\.\.3, outside the 3 rows"):  # fewer rows than checked
        _checks.check_indices("op", "rows", t, 3)
    t[1] = 9  # in place: the version counter moves
    with pytest.raises(IndexError, match=r"holds indices 0\.\.9"):
        _checks.check_indices("op", "rows", t, 4)
    t.data = torch.tensor([0, 7, 1])  # same object, other memory
    with pytest.raises(IndexError, match=r"holds indices 0\.\.7"):
        _checks.check_indices("op", "rows", t, 4)
