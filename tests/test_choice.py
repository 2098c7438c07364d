"""Per-shape choice between the kernel and the unfused PyTorch formulation (fastvlm.choice; issue 12, item 1).

No GPU here: the choice is switched on for CPU tensors (``choice.applies``), the kernel runs in the Triton
interpreter (``environment_reasons`` emptied with FASTVLM_BACKEND=auto), and a scripted timer says which candidate
is faster. The CUDA-event timer itself runs in tests/test_gpu_smoke.py."""
import json
import os
import warnings

import pytest
import torch

from fastvlm import _dispatch, choice, trace
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.projector import mlp_projector_ref
from fastvlm.testing import rel_err, tolerance

HAS_CUDA = torch.cuda.is_available()


class ScriptedTimer:
    """Times in the order the candidates are timed (kernel first, then eager); runs each candidate once."""

    def __init__(self, *times):
        self.times, self.calls = list(times), 0

    def __call__(self, fn, device):
        fn()
        self.calls += 1
        return self.times.pop(0)


@pytest.fixture
def on_cpu(monkeypatch, tmp_path):
    if HAS_CUDA:
        pytest.skip("the CPU stand-in for the GPU choice; the GPU smoke test covers CUDA")
    monkeypatch.setenv("FASTVLM_BACKEND", "auto")
    monkeypatch.delenv("FASTVLM_STRICT", raising=False)
    monkeypatch.delenv("FASTVLM_CHOICE", raising=False)
    monkeypatch.setenv("FASTVLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice, "applies", lambda device: choice.enabled())
    monkeypatch.setattr(_dispatch, "environment_reasons", lambda device: [])  # the interpreter stands in for CUDA
    choice.forget()
    yield tmp_path
    choice.forget()


def _inputs(M=12, K=24, N=40, O=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).float()  # noqa: E731
    return r(M, K), r(N, K, scale=K ** -0.5), r(N), r(O, N, scale=N ** -0.5), r(O)


def _check(y, args):
    ref = mlp_projector_ref(*(a.double() for a in args), act="gelu")
    assert rel_err(y, ref) < tolerance(torch.float32, args[0].shape[1], roundings=2)


@pytest.mark.parametrize("times, backend, note", [((2.0, 1.0), "torch", "eager ops 2.00x faster"),
                                                   ((1.0, 3.0), "triton", "kernel 3.00x faster")])
def test_the_faster_candidate_runs_and_trace_says_why(on_cpu, monkeypatch, times, backend, note):
    timer = ScriptedTimer(*times)
    monkeypatch.setattr(choice, "timer", timer)
    args = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a performance choice is not a fallback: no warning
        with trace() as t:
            y = mlp_projector(*args, act="gelu")
            y2 = mlp_projector(*args, act="gelu")
    assert timer.calls == 2  # both candidates timed once, on the first call of the shape only
    assert t.backends() == [backend, backend]
    assert note in t.records[0].note and note in str(t)
    _check(y, args)
    assert torch.equal(y, y2)


def test_winner_is_kept_on_disk_as_json_and_read_back(on_cpu, monkeypatch):
    monkeypatch.setattr(choice, "timer", ScriptedTimer(2.0, 1.0))
    args = _inputs()
    mlp_projector(*args, act="gelu")
    path = os.path.join(on_cpu, "choices.json")
    with open(path) as f:
        data = json.load(f)
    assert data["version"] == choice.FILE_VERSION
    (dev, ops), = data["entries"].items()
    (shape, entry), = ops["fastvlm::mlp_projector"].items()
    assert entry["winner"] == "torch" and entry["ms"] == {"triton": 2.0, "torch": 1.0}
    assert "x(12, 24)" in shape and "torch" in dev

    choice.forget()  # a new process: nothing in memory, the file decides without timing
    monkeypatch.setattr(choice, "timer", ScriptedTimer())  # popping from an empty list fails if it is called
    with trace() as t:
        mlp_projector(*args, act="gelu")
    assert t.backends() == ["torch"]

    # another shape is timed on its own
    monkeypatch.setattr(choice, "timer", ScriptedTimer(1.0, 2.0))
    with trace() as t:
        mlp_projector(*_inputs(M=5), act="gelu")
    assert t.backends() == ["triton"]


def test_unreadable_cache_file_is_ignored_with_a_warning(on_cpu, monkeypatch):
    with open(os.path.join(on_cpu, "choices.json"), "w") as f:
        f.write("{not json")
    timer = ScriptedTimer(1.0, 2.0)
    monkeypatch.setattr(choice, "timer", timer)
    with pytest.warns(UserWarning, match="ignoring the per-shape choice cache"):
        mlp_projector(*_inputs(), act="gelu")
    assert timer.calls == 2
    with open(os.path.join(on_cpu, "choices.json")) as f:
        assert json.load(f)["version"] == choice.FILE_VERSION  # rewritten whole


@pytest.mark.parametrize("env", [{"FASTVLM_BACKEND": "triton"}, {"FASTVLM_STRICT": "1"}, {"FASTVLM_CHOICE": "0"}])
def test_forced_kernel_never_times(on_cpu, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(choice, "timer", ScriptedTimer())
    args = _inputs()
    with trace() as t:
        y = mlp_projector(*args, act="gelu")
    assert t.backends() == ["triton"] and t.records[0].note == ""
    assert not os.path.exists(os.path.join(on_cpu, "choices.json"))
    _check(y, args)


def test_training_path_has_its_own_key_and_same_gradients(on_cpu, monkeypatch):
    """The saving forward (autograd) is a separate shape key; the eager winner's gradients are the reference's."""
    monkeypatch.setattr(choice, "timer", ScriptedTimer(2.0, 1.0))
    args = [a.double().float().requires_grad_() for a in _inputs()]
    with trace() as t:
        y = mlp_projector(*args, act="gelu")
    assert t.backends() == ["torch"]
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, args, gy)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    ref_grads = torch.autograd.grad(mlp_projector_ref(*ref_args, act="gelu"), ref_args, gy.double())
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < tolerance(torch.float32, 40, roundings=2)


def test_cpu_tensors_do_not_consult_the_choice(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTVLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(choice, "timer", ScriptedTimer())
    assert not choice.applies(torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU fallback's own warning
        mlp_projector(*_inputs(), act="gelu")
    assert not os.path.exists(os.path.join(tmp_path, "choices.json"))


def test_no_timing_while_compiling_or_capturing(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not choice.can_time(torch.device("cpu"))
    assert choice.decide("op", "k", torch.device("cpu"), {}) == {"winner": choice.KERNEL, "ms": {}}


def test_other_ops_take_the_choice_too(on_cpu, monkeypatch):
    """Attention and the Q-Former's linear + residual + LayerNorm consult the same choice (one key per op)."""
    from fastvlm.ops.attention import attention
    from fastvlm.ops.linear_norm import linear_residual_layernorm

    timer = ScriptedTimer(2.0, 1.0, 1.0, 2.0)
    monkeypatch.setattr(choice, "timer", timer)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 2, 16, generator=g) for _ in range(3))
    x, w, res = torch.randn(6, 16, generator=g), torch.randn(8, 16, generator=g) * 0.25, torch.randn(6, 8, generator=g)
    with trace() as t:
        attention(q, k, v)
        linear_residual_layernorm(x, w, None, res, torch.ones(8), torch.zeros(8))
    assert t.backends() == ["torch", "triton"] and timer.calls == 4
    assert "eager ops 2.00x" in t.records[0].note and "kernel 2.00x" in t.records[1].note
