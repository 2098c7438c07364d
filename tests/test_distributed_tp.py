"""Fused projectors under DTensor tensor parallelism (ColwiseParallel linear_1, RowwiseParallel linear_2), on CPU
with gloo in 2 processes.

One fork runs every check: three projector shapes (LLaVA, InternVL with a LayerNorm in front and an input that
needs its gradient, Qwen2-VL's merged rows), patched before and after ``parallelize_module``: the fused op runs on
the local shards (fastvlm.trace shows it, no fallback), the loss and every gradient (gathered from the DTensor
shards) against a float64 single-process reference within the derived tolerance, the unpatched TP model checked the
same way, an SGD step and the next loss. Then the Triton kernels (interpreter) on one small case, and the plans the
fused op does not compute (sequence parallel, a Colwise linear alone): each named in the patch report and, on a
module fused anyway, a fallback with the reason (an error under FASTVLM_STRICT=1) whose result is the original's.
"""
import copy
import os

import torch
import torch.nn as nn

import fastvlm
from dist_helpers import check, full, spawn
from fastvlm import testing

FAMILIES = {"llava": ("linear_1", "linear_2"), "internvl": ("linear_1", "linear_2"), "qwen2_vl": ("mlp.0", "mlp.2")}
LR = 0.05


class Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _plan(family, **layouts):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    l1, l2 = FAMILIES[family]
    return {f"proj.{l1}": ColwiseParallel(**layouts.get("col", {})),
            f"proj.{l2}": RowwiseParallel(**layouts.get("row", {}))}


def _data(family, module, x_grad):
    torch.manual_seed(7)  # the same replicated input and target on every rank
    x = testing.input_for(family, module)
    with torch.no_grad():
        y = module(x)
    target = torch.randn(y.shape, dtype=torch.float64) * 2 * y.abs().mean().double()
    return x.requires_grad_(x_grad), target


def _loss(y, target):
    return (y.to(torch.float64) - target).square().mean()


def _reference(orig, family, x, target):
    ref = Holder(copy.deepcopy(orig)).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    loss = _loss(ref(x64), target)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    if x.requires_grad:
        grads["x"] = x64.grad
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
        after = _loss(ref(x.detach().double()), target)
    return loss, grads, after


def _tp_case(family, orig, mesh, patch_first, failures, dtype=torch.float32, tag_extra=""):
    from torch.distributed.tensor.parallel import parallelize_module

    x_grad = family == "internvl"
    x, target = _data(family, orig, x_grad)
    loss64, grads64, after64 = _reference(orig, family, x, target)
    results = {}
    for patched in (False, True):
        tag = f"{family} TP {'patched ' + ('before' if patch_first else 'after') if patched else 'original'}{tag_extra}"
        model = Holder(copy.deepcopy(orig))
        if patched and patch_first:
            assert fastvlm.patch(model).patched, tag
        parallelize_module(model, mesh, _plan(family))
        if patched and not patch_first:
            report = fastvlm.patch(model)
            if [e.path for e in report.patched] != ["proj"]:
                failures.append(f"{tag}: not patched:\n{report}")
        xi = x.detach().clone().requires_grad_(x_grad)
        with fastvlm.trace() as t:
            y = model(xi)
            loss = _loss(y, target)
            loss.backward()
        if patched and {r.op for r in t.records} != {"fastvlm::mlp_projector"}:
            failures.append(f"{tag}: fused path not taken:\n{t}")
        k = max(x.shape[-1], x.numel() // x.shape[-1])
        check(f"{tag} loss", loss, loss64, dtype, k, 4, failures)
        for name, g64 in grads64.items():
            got = xi.grad if name == "x" else full(model.get_parameter(name).grad)
            check(f"{tag} grad {name}", got, g64, dtype, k, 4, failures)
        torch.optim.SGD(model.parameters(), lr=LR).step()
        with torch.no_grad():
            check(f"{tag} loss after step", _loss(model(x.detach()), target), after64, dtype, k, 6, failures)
        results[patched] = y
    if type(results[True]) is not type(results[False]):
        failures.append(f"{family}: the fused output is {type(results[True]).__name__}, the original's "
                        f"{type(results[False]).__name__} (the plan's own output function makes both)")


def _unsupported(family, orig, mesh, layouts, words, failures):
    """A plan the fused op does not compute: patch leaves the module (reason in the report); a module fused anyway
    falls back with the reason, strictly an error, and its result is the original's."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    def build():
        m = Holder(copy.deepcopy(orig))
        if layouts == "colwise only":
            parallelize_module(m, mesh, {"proj.linear_1": ColwiseParallel(output_layouts=_replicate())})
        else:
            parallelize_module(m, mesh, _plan(family, **layouts))
        return m

    x, _ = _data(family, orig, False)
    if layouts != "colwise only":  # sequence parallel: each rank holds an even slice of the tokens
        x = x[:, : x.shape[1] // 2 * 2].chunk(2, dim=1)[torch.distributed.get_rank()].contiguous()
    model = build()
    report = fastvlm.patch(model)
    entry = [e for e in report.entries if e.path == "proj"]
    if not entry or entry[0].status != "not swapped" or not all(w in entry[0].detail for w in words):
        failures.append(f"{family} {layouts}: expected 'not swapped' naming {words}:\n{report}")
    ref = build()
    fused = build()
    fused.proj = fastvlm.nn.from_module(fused.proj)
    with fastvlm.trace() as t:
        y = fused(x)
    reasons = " ".join(r for rec in t.records for r in rec.reasons)
    if not all(w in reasons for w in words):
        failures.append(f"{family} {layouts}: fallback reasons do not name {words}: {t}")
    if not torch.equal(y, ref(x)):
        failures.append(f"{family} {layouts}: the fallback's result is not the original's")
    os.environ["FASTVLM_STRICT"] = "1"
    fastvlm._dispatch.reset_warnings()
    try:
        fused(x)
        failures.append(f"{family} {layouts}: no error under FASTVLM_STRICT=1")
    except fastvlm.FastVLMFallbackError as exc:
        if "tensor parallel" not in str(exc):
            failures.append(f"{family} {layouts}: strict error does not say why: {exc}")
    finally:
        del os.environ["FASTVLM_STRICT"]


def _replicate():
    from torch.distributed.tensor import Replicate

    return Replicate()


def _tp_worker(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (2,))
    failures = []
    os.environ["FASTVLM_BACKEND"] = "torch"
    for i, family in enumerate(FAMILIES):
        orig = testing.build(family).train()
        _tp_case(family, orig, mesh, patch_first=i % 2 == 0, failures=failures)
    orig = testing.build("llava").train()
    sp = dict(col=dict(input_layouts=Shard(1)), row=dict(output_layouts=Shard(1)))
    _unsupported("llava", orig, mesh, sp, ["tensor parallel", "sequence parallel"], failures)
    _unsupported("llava", orig, mesh, "colwise only", ["tensor parallel", "linear_2 no plan"], failures)
    os.environ["FASTVLM_BACKEND"] = "triton"  # the Triton kernels in the interpreter (TRITON_INTERPRET=1)
    _tp_case("llava", orig, mesh, patch_first=True, failures=failures, tag_extra=" (triton)")
    assert not failures, f"rank {rank}:\n" + "\n".join(failures)


def test_tensor_parallel_local_shards():
    spawn(_tp_worker)
