"""Run by tests/test_launch_path.py in a child process without TRITON_INTERPRET: fused modules on the host-only
Triton driver (fastvlm.bench.fake_driver: kernels compiled for sm_90, the real Python launch path, no GPU).

Prints one JSON line: per case, launches per call, whether a repeat call went through Triton's JITFunction.run /
the autotuner / the heuristics wrapper, and the synchronising calls made by a repeat call (which must be none).
"""
import json
import sys
import threading
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvlm.bench import fake_driver

SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "masked_select", "is_nonzero", "equal", "allclose",
            "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave")
TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


class _SyncOps(TorchDispatchMode):
    """Records the aten ops that read a tensor's value on the host (or need it to size their output)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def no_sync_allowed(seen):
    """Record host reads of tensor values: aten ops that need them and Python conversions of tensors."""
    saved = {n: getattr(torch.Tensor, n) for n in TENSOR_READS}

    def wrap(name, fn):
        def reader(self, *a, **k):
            seen.append(f"Tensor.{name}")
            return fn(self, *a, **k)
        return reader

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        with _SyncOps(seen):
            yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


@contextmanager
def count_slow_path(counts):
    """Count calls of Triton's JITFunction.run, Autotuner.run and Heuristics.run (the path a plan skips), and on
    triton 3.8 of CudaLauncher.__call__ (the direct launch calls the driver's launch function itself)."""
    import triton.runtime.autotuner as at
    import triton.runtime.jit as jit

    from fastvlm.kernels import _launch

    targets = [(jit.JITFunction, "run"), (at.Autotuner, "run"), (at.Heuristics, "run")]
    if ".".join(triton_version().split(".")[:2]) in _launch._DIRECT_TRITON:
        from triton.backends.nvidia.driver import CudaLauncher

        targets.append((CudaLauncher, "__call__"))
    saved = [(cls, name, getattr(cls, name)) for cls, name in targets]

    def wrap(key, fn):
        def counted(self, *a, **k):
            counts[key] = counts.get(key, 0) + 1
            return fn(self, *a, **k)
        return counted

    for cls, name, fn in saved:
        setattr(cls, name, wrap(cls.__name__, fn))
    try:
        yield
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def triton_version():
    import triton

    return triton.__version__


def _normalised(record):
    """A launch's arguments with tensors as what the driver reads from them, comparable between two calls: the
    pointer (dtype, the memory it points into: storage size and element offset, alignment). A module's repeat path
    may hand the launch its input ``x`` [B, T, K] where the op handed the row view [B*T, K]: the same pointer."""
    out = []
    for entry in record:
        *head, args = entry
        args = tuple((a.dtype, a.untyped_storage().nbytes(), a.storage_offset(), a.data_ptr() % 16)
                     if isinstance(a, torch.Tensor) else a for a in args)
        out.append((*head, args))
    return out


def compare_launch_paths(drv, calls):
    """The driver-level arguments of each case's repeat call through the direct launch, and again with every
    kernel launched through CompiledKernel.run (the direct entries and hot kernels dropped): they must be equal."""
    import gc

    from fastvlm.kernels import _launch

    for call in calls.values():  # plans and kernels built (a first call may compile)
        call()
    objs = [o for o in gc.get_objects() if isinstance(o, (_launch.Plan, _launch.Call))]
    paths = sorted({p for o in objs if isinstance(o, _launch.Plan) for p in o.paths.values()})
    direct = {}
    for name, call in calls.items():
        drv.utils.record = direct[name] = []
        call()
    saved = [(o, dict(o.direct)) for o in objs if isinstance(o, _launch.Plan)]
    hots = [(o, o.hot) for o in objs if isinstance(o, _launch.Call)]
    for o, _ in saved:
        o.direct.update({k: None for k in o.direct})
    for o, _ in hots:
        o.hot = None
    mismatched = []
    try:
        for name, call in calls.items():
            drv.utils.record = through_run = []
            call()
            if _normalised(through_run) != _normalised(direct[name]) or not direct[name]:
                mismatched.append(name)
    finally:
        drv.utils.record = None
        for o, d in saved:
            o.direct.update(d)
        for o, h in hots:
            o.hot = h
    return dict(paths=paths, mismatched=mismatched)


def compiled_launches(drv):
    """A fused LLaVA projector under torch.compile(fullgraph=True) (AOT autograd, graph kept, no Inductor: Inductor
    has no CPU Triton backend): the graph's calls, the launches per compiled call and whether they pass the driver
    what the eager direct launches pass; again with FASTVLM_COMPILE_LAUNCH=op (the opaque custom op)."""
    import os

    import fastvlm
    from fastvlm.testing import args_for, build
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    out = {}
    for mode in ("inductor", "op"):
        os.environ["FASTVLM_COMPILE_LAUNCH"] = mode
        torch._dynamo.reset()
        fused = fastvlm.nn.from_module(build("llava")).half()
        args = tuple(a.half() for a in args_for("llava", fused))
        graphs = []

        def keep(gm, inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        compiled = torch.compile(fused, fullgraph=True, backend=aot_autograd(fw_compiler=keep))
        fused(*args)
        drv.utils.record = eager = []
        fused(*args)
        drv.utils.record = None
        compiled(*args)  # (traces and compiles)
        drv.utils.record = traced = []
        n0 = drv.launches
        compiled(*args)
        drv.utils.record = None
        calls = sorted({str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"})
        out[mode] = dict(calls=calls, launches=drv.launches - n0, same_args=_normalised(eager) == _normalised(traced))
    del os.environ["FASTVLM_COMPILE_LAUNCH"]
    return out


def cases():
    import fastvlm
    from fastvlm.ops.scatter import scatter_image_features
    from fastvlm.testing import args_for, build

    out = {}
    for family in ("llava", "qwen2_vl"):
        fused = fastvlm.nn.from_module(build(family)).half()
        args = tuple(a.half() for a in args_for(family, fused))
        out[family] = lambda f=fused, a=args: f(*a)
    embeds = torch.randn(1, 24, 64, dtype=torch.float16)
    mask = torch.zeros(1, 24, dtype=torch.bool)
    mask[0, 2:18] = True
    feats = torch.randn(16, 64, dtype=torch.float16)
    out["handoff"] = lambda: scatter_image_features(embeds, mask, feats, check="lazy")
    q = torch.randn(1, 2, 4, 32, dtype=torch.float16)
    kv = torch.randn(1, 2, 9, 32, dtype=torch.float16)
    km = torch.ones(1, 9, dtype=torch.bool)
    out["attention"] = lambda: fastvlm.attention(q, kv, kv, key_mask=km)
    x, w, b, g = (torch.randn(6, 32, dtype=torch.float16), torch.randn(32, 32, dtype=torch.float16),
                  torch.randn(32, dtype=torch.float16), torch.randn(32, dtype=torch.float16))
    out["linear_residual_layernorm"] = lambda: fastvlm.linear_residual_layernorm(x, w, b, x, g, b)
    from fastvlm.bench.overhead import qformer_case

    qf = qformer_case(layers=2)  # BLIP-2 layout: cross-attention in layer 0
    qf.fused.half()
    kw = {k: v.half() for k, v in qf.kwargs.items()}
    out["qformer"] = lambda: qf.fused(**kw)
    out.update({name: (lambda m=m, a=a: m(*a)) for name, (m, a) in chain_modules().items()})
    return out


def chain_modules():
    """Modules whose repeat call launches a chain (fastvlm.ops._fast): name -> (fused module, args)."""
    import fastvlm
    from fastvlm.nn.linear import FusedLinear
    from fastvlm.testing import args_for, build

    lin = FusedLinear.from_module(torch.nn.Linear(32, 48)).half()
    fast_vlm = fastvlm.nn.from_module(build("fast_vlm")).half()
    width = fast_vlm.linear_1.in_features
    tokens = torch.randn(1, width, 3, 3, dtype=torch.float16).flatten(2).transpose(1, 2)  # one feature map's view
    idefics3 = fastvlm.nn.from_module(build("idefics3")).half()
    mlp = fastvlm.nn.from_module(build("idefics2:mlp")).half()
    vip = fastvlm.nn.from_module(build("vipllava")).half()  # a LayerNorm first: statistics, then the two GEMMs
    return {"fused_linear": (lin, (torch.randn(2, 5, 32, dtype=torch.float16),)),
            "fast_vlm_map": (fast_vlm, (tokens,)),
            "idefics3": (idefics3, tuple(a.half() for a in args_for("idefics3", idefics3))),
            "idefics2_mlp": (mlp, tuple(a.half() for a in args_for("idefics2:mlp", mlp))),
            "vipllava": (vip, tuple(a.half() for a in args_for("vipllava", vip)))}


def compare_chain_paths(drv):
    """For each chain module: whether its repeat call took the chain, and whether that call passed the driver what
    the op's path passes (the same call right after the module's plans were dropped)."""
    from fastvlm.nn._plan import fastvlm_clear_plan
    from fastvlm.ops import _fast

    taken = []
    run = _fast.Chain.run

    def spy(self, x, params):
        y = run(self, x, params)
        taken.append(isinstance(y, torch.Tensor))
        return y

    out = {}
    for name, (module, args) in chain_modules().items():
        module(*args)
        module(*args)
        _fast.Chain.run = spy
        try:
            drv.utils.record = chained = []
            taken.clear()
            module(*args)
            took = taken == [True]
            fastvlm_clear_plan(module)
            drv.utils.record = through_op = []
            module(*args)
        finally:
            _fast.Chain.run = run
            drv.utils.record = None
        out[name] = dict(chain=took, same_args=bool(chained) and _normalised(chained) == _normalised(through_op))
    return out


def main():
    drv = fake_driver.install(run_configs=False)  # the first config of each tuner fits in fp16
    torch.set_num_threads(1)
    report = {}
    with torch.no_grad():
        for name, call in cases().items():
            call()  # plans, compiles
            n0 = drv.launches
            call()
            launches = drv.launches - n0
            counts, seen = {}, []
            with count_slow_path(counts), no_sync_allowed(seen):
                call()
            report[name] = dict(launches=launches, slow_path=counts, syncs=sorted(set(seen)))
        # fresh shapes from several threads at once: every plan built concurrently, each call launches its kernels
        import fastvlm
        from fastvlm.testing import build

        fused = fastvlm.nn.from_module(build("llava")).half()
        width = fused.linear_1.in_features
        errors = []
        n0 = drv.launches

        def work(n):
            try:
                for _ in range(3):
                    fused(torch.randn(1, n, width, dtype=torch.float16))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=work, args=(n,)) for n in (7, 9, 11, 13)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report["threads"] = dict(errors=errors, launches=drv.launches - n0)
        # a launch hook (a profiler) sees every launch: the direct path steps aside while one is installed
        import triton

        hooked = []
        hook = lambda metadata: hooked.append(1)  # noqa: E731
        triton.knobs.runtime.launch_enter_hook.add(hook)
        try:
            cases()["llava"]()
        finally:
            triton.knobs.runtime.launch_enter_hook.remove(hook)
        report["hooked_launches"] = len(hooked)
        # one plan (same constexprs) for two dtypes: each launch gets the kernel compiled for its own dtype
        from fastvlm.kernels import _launch
        from fastvlm.kernels.norm_stats import row_stats

        x = torch.randn(6, 40)
        for t in (x, x.half(), x):
            row_stats(t, 1e-5, False)
        plans = [p for p in _launch._SIMPLE.values() if p.fn.__name__ == "_row_stats_kernel"]
        report["launch_paths"] = compare_launch_paths(drv, cases())
        report["compiled"] = compiled_launches(drv)
        report["chains"] = compare_chain_paths(drv)
        report["row_stats_x_types"] = sorted({str(k.src.signature["x_ptr"]) for p in plans for k in p.kernels.values()})
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
