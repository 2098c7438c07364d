"""Run by tests/test_compiled_launch.py in a child process without TRITON_INTERPRET: every fused module of the tiny
models (fastvlm.bench.overhead's cases: projectors, mergers, pooled / shuffle connectors, patch embeddings, Q-Former,
perceiver, the hand-off) under ``torch.compile(fullgraph=True)`` on the host-only Triton driver
(fastvlm.bench.fake_driver: kernels compiled for sm_90, no GPU).

AOT autograd keeps the forward graph (Inductor has no CPU Triton backend): per case, the fastvlm ops left in the
graph (none when every launch is traced: the graph holds ``triton_kernel_wrapper_functional`` calls), the launches
per compiled call and whether the driver receives what the eager launches pass (same compiled kernel, grid and
arguments). With ``--grad``: the same for a training call (inputs needing gradients: the twin's registered autograd),
its backward run. Prints one JSON line.
"""
import json
import os
import sys
import traceback
import warnings

import torch

from fastvlm.bench import fake_driver


_BINARIES = {}  # function handle -> (kernel name, sha1 of its binary)


def _remember_binaries(drv):
    """Name each loaded kernel by its binary: a compiled graph's launch may load its own copy of a kernel (Triton's
    cache key differs when options are spelled out at their defaults), the same binary under another handle."""
    import hashlib

    load = drv.utils.load_binary

    def loading(name, kernel, shared, device):
        out = load(name, kernel, shared, device)
        _BINARIES[out[1]] = (name, hashlib.sha1(bytes(kernel)).hexdigest(), shared)
        return out

    drv.utils.load_binary = loading


def _normalised(record):
    """A launch's driver arguments (launch_path_check's), the function handle replaced by the kernel's binary, the
    launcher's annotation objects by their kinds."""
    from launch_path_check import _normalised as norm

    out = []
    for entry in norm(record):
        entry = list(entry)
        entry[4] = _BINARIES.get(entry[4], entry[4])
        entry[10] = tuple((a.kind, a.nested) for a in entry[10])
        out.append(tuple(entry))
    return out


def _graph_calls(graphs):
    return sorted({str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"})


def _half(obj):
    if isinstance(obj, torch.Tensor):
        return obj.half() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_half(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _half(v) for k, v in obj.items()}
    return obj


class _OpCase:
    """A functional as a module case (token pooling and the feature-map projector have no tiny-model module)."""

    def __init__(self, name, fn, args):
        self.name, self.fused, self.args, self.kwargs = name, fn, args, {}


def op_cases():
    from fastvlm.ops.feature_map import feature_map_projector
    from fastvlm.ops.layout import space_to_depth_rows
    from fastvlm.ops.pool import pool_tokens

    x = torch.randn(2 * 16, 24)
    rows = space_to_depth_rows(2, 4, 4, 2)
    fmap = torch.randn(2, 24, 4, 6)
    w1, b1, w2, b2 = torch.randn(40, 24) / 5, torch.randn(40), torch.randn(32, 40) / 6, torch.randn(32)
    return [_OpCase("pool_tokens (mean)", lambda t, r: pool_tokens(t, r, "mean"), (x, rows)),
            _OpCase("pool_tokens (max)", lambda t, r: pool_tokens(t, r, "max"), (x, rows)),
            _OpCase("feature_map_projector (pool 2)", lambda m, *w: feature_map_projector(
                m, *w, act="gelu", pool=2), (fmap, w1, b1, w2, b2))]


def compiled_case(drv, case, mode="inductor"):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    os.environ["FASTVLM_COMPILE_LAUNCH"] = mode
    torch._dynamo.reset()
    fused = case.fused.half() if isinstance(case.fused, torch.nn.Module) else case.fused
    args, kwargs = _half(case.args), _half(case.kwargs)
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    # Mistral3's projector reads image_sizes.tolist() (as the original does): a graph break before the fused op
    full = not case.name.startswith("mistral3")
    compiled = torch.compile(fused, fullgraph=full, backend=aot_autograd(fw_compiler=keep))
    with torch.no_grad():
        fused(*args, **kwargs)
        drv.utils.record = eager = []
        fused(*args, **kwargs)
        drv.utils.record = None
        TAKEN.clear()
        compiled(*args, **kwargs)  # traces and compiles
        taken = sorted(set(TAKEN))
        drv.utils.record = traced = []
        n0 = drv.launches
        compiled(*args, **kwargs)
        drv.utils.record = None
    calls = _graph_calls(graphs)
    return dict(taken=taken, fastvlm_ops=[c for c in calls if c.startswith("fastvlm.")],
                kernels=sum(c == "triton_kernel_wrapper_functional" for c in calls), launches=drv.launches - n0,
                eager_launches=len(eager), same_args=_normalised(eager) == _normalised(traced))


TAKEN = []  # the ops compiled calls took (fastvlm.ops.compiled.op_for), while tracing


def _record_taken():
    from fastvlm.ops import compiled

    real = compiled.op_for

    def op_for(name, x, named=()):
        op = real(name, x, named)
        TAKEN.append(str(op))
        return op

    compiled.op_for = op_for


def training_case(drv, case):
    """A training call (parameters need gradients) compiled the same way: the forward graph launches the kernels
    (the twin, its saved tensors included), the backward graph (the twin's registered autograd, PyTorch ops) runs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    fused = case.fused.half()
    args, kwargs = _half(case.args), _half(case.kwargs)
    fw, bw = [], []

    def keep(into):
        def compiler(gm, inputs):
            into.append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    compiled = torch.compile(fused, fullgraph=True, backend=aot_autograd(fw_compiler=keep(fw), bw_compiler=keep(bw)))
    TAKEN.clear()
    out = compiled(*args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    n0 = drv.launches
    out.float().sum().backward()
    grads = [p.grad is not None for p in fused.parameters() if p.requires_grad]
    calls = _graph_calls(fw)
    return dict(taken=sorted(set(TAKEN)), fastvlm_ops=[c for c in calls if c.startswith("fastvlm.")],
                kernels=sum(c == "triton_kernel_wrapper_functional" for c in calls), backward_graphs=len(bw),
                backward_launches=drv.launches - n0, grads=all(grads) and bool(grads))


TRAIN = ("LlavaMultiModalProjector", "PatchMerger", "Q-Former")


def main():
    sys.path.insert(0, os.path.dirname(__file__))
    drv = fake_driver.install(run_configs=False)
    _remember_binaries(drv)
    _record_taken()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from fastvlm.bench.overhead import all_cases

    names = sys.argv[1:]  # family names (all when none), "qformer": the 2-layer Q-Former case (always with all)
    families = [n for n in names if n != "qformer"] or (None if not names else ["none"])
    report = {}
    for case in [*all_cases(families, qformer_layers=2 if (not names or "qformer" in names) else 0), *op_cases()]:
        if case.name.startswith("one fused GEMM"):
            continue
        try:
            report[case.name] = compiled_case(drv, case)
            if any(t in case.name for t in TRAIN):
                report[case.name]["train"] = training_case(drv, case)
        except Exception as exc:  # reported per case
            report[case.name] = dict(error=f"{type(exc).__name__}: {exc}"[:600], tb=traceback.format_exc()[-1500:])
    os.environ.pop("FASTVLM_COMPILE_LAUNCH", None)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
