"""``torch.compile(mode="reduce-overhead")`` (Inductor, CUDA graphs on a GPU) compiles and runs every fused module
and whole patched tiny models correctly on the CPU (the PyTorch path; Inductor skips CUDA graphs for CPU tensors).
On a GPU the capture itself is checked by tests/test_gpu_smoke.py::test_compiled_connector_cuda_graph. One projector
and the hand-off run in the default suite; the sweep over every fused module and the whole models are slow-marked (Inductor compiles
C++ for each graph: seconds each on 2 cores)."""
import copy

import pytest
import torch

import fastvlm
from fastvlm.testing import FAMILIES, args_for, build
from helpers import assert_close, double as _double, first_output as _first, linear_k as _k

pytestmark = pytest.mark.usefixtures("quiet_fallbacks")
MODE = "reduce-overhead"


def _check_module(original, fused, args, kwargs=None, fullgraph=True, train=False):
    kwargs = kwargs or {}
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=fullgraph, mode=MODE)
    ref_mod = copy.deepcopy(original).double()
    with torch.no_grad():
        ref = _first(ref_mod(*_double(args), **_double(kwargs)))
        for _ in range(2):  # (a second call: CUDA graphs record, then replay, on a GPU)
            out = _first(compiled(*args, **kwargs))
            assert_close(out, ref, torch.float32, _k(original), roundings=4)
    if train:  # forward and backward through the compiled graph: the ops' registered autograd
        out = _first(compiled(*args, **kwargs))
        g = torch.randn_like(out)
        params = [p for p in fused.parameters() if p.requires_grad]
        grads = torch.autograd.grad(out, params, g)
        names = [n for n, p in fused.named_parameters() if p.requires_grad]
        ref_params = dict(ref_mod.named_parameters())
        ref_out = _first(ref_mod(*_double(args), **_double(kwargs)))
        ref_grads = torch.autograd.grad(ref_out, [ref_params[n] for n in names], g.double())
        for n, a, b in zip(names, grads, ref_grads):
            assert_close(a, b, torch.float32, _k(original), roundings=4, what=f"{n}.grad")


def test_reduce_overhead_projector(torch_backend):
    m = build("llava")
    _check_module(m, fastvlm.nn.from_module(m), args_for("llava", m))


@pytest.mark.slow  # ~1 min on 2 cores (Inductor compiles the forward and the backward graph)
def test_reduce_overhead_merger_training(torch_backend):
    m = build("qwen2_vl")
    _check_module(m, fastvlm.nn.from_module(m), args_for("qwen2_vl", m), train=True)


@pytest.mark.slow  # ~2 min on 2 cores
@pytest.mark.parametrize("family", FAMILIES)
def test_reduce_overhead_every_projector(family, torch_backend):
    m = build(family)
    _check_module(m, fastvlm.nn.from_module(m), args_for(family, m), fullgraph=family != "mistral3")  # tolist()


@pytest.mark.slow  # ~1 min each on 2 cores
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "blip2", "idefics2", "llama4", "fast_vlm"])
def test_reduce_overhead_every_fused_module_of(family, torch_backend):
    """Patch embeddings, Q-Former, perceiver, unfold convolution, feature maps: each fused module of the tiny model
    on the inputs of one forward of it."""
    from fastvlm.bench.overhead import family_cases

    for case in family_cases(family):
        _check_module(case.original, case.fused, case.args, case.kwargs)


@pytest.mark.slow  # ~1 min each on 2 cores
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "blip2", "idefics2"])
def test_reduce_overhead_whole_patched_model(family, torch_backend):
    from fastvlm.testing import rel_err
    from fastvlm.tiny_models import build_tiny_model

    model, inputs = build_tiny_model(family)
    with torch.no_grad():
        ref = model(**inputs).logits
    fastvlm.patch(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=MODE)
    with torch.no_grad():
        for _ in range(2):
            assert rel_err(compiled(**inputs).logits, ref) < 1e-5


def test_reduce_overhead_hand_off(torch_backend):
    from fastvlm.bench.overhead import handoff_case

    case = handoff_case()
    torch._dynamo.reset()
    compiled = torch.compile(case.fused, fullgraph=True, mode=MODE)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(compiled(*case.args), case.original(*case.args))
