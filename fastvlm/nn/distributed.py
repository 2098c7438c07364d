"""Distributed training: tensor parallelism (DTensor) for the fused projectors, and DeepSpeed ZeRO-3 detection.

DeepSpeed ZeRO-3 partitions every parameter (an empty placeholder carrying ``ds_id`` / ``ds_status``) and gathers a
module's own parameters in hooks around that module's forward. A fused module reads its children's parameters
without calling the children's forwards, so their hooks would not gather them: ``zero3_reason`` names such
parameters, and ``fastvlm.patch`` leaves those modules unswapped with that reason (a fused class built under
``deepspeed.zero.Init`` runs its original forward, with the same reason).

Tensor parallelism for the fused two-linear projectors: the fused op on the local shards.

``parallelize_module(projector, mesh, {"linear_1": ColwiseParallel(), "linear_2": RowwiseParallel()})`` turns the
two Linears' weights into DTensor parameters (Shard(0) and Shard(1)) and puts hooks on them: linear_1's input is
wrapped as a replicated DTensor, linear_2's partial-sum output is all-reduced (Partial -> Replicate) and unwrapped.
Between them the hidden activation stays sharded on its last dimension, so no collective runs there.

The fused forward keeps that plan: it runs the fused kernel on the local shards (first GEMM + activation on the
column shard of linear_1, second GEMM on the row shard of linear_2: a partial sum of the output), wraps the result
as a ``Partial`` DTensor, adds linear_2's replicated bias the way DTensor does it, and hands it to the output
function the plan registered on linear_2, which runs the plan's own collective (the same redistribute, the same
``use_local_output``). Gradients follow DTensor's rules: the weight shards' gradients are the local ones, and a
replicated input that needs a gradient (x, a norm's weight and bias) is marked ``Partial`` in backward and
all-reduced, as the Colwise input hook would. Why local shards and not DTensor sharding rules:
docs/design-distributed.md.

Only the plan above is recognised: the hooks of exactly one ColwiseParallel on linear_1 and one RowwiseParallel on
linear_2, default layouts (replicated input, hidden sharded on the last dimension, replicated output), a 1-D mesh.
Anything else with DTensor weights (sequence parallel, other placements, a mesh of more dimensions) runs the
original forward with the reason (FastVLMFallbackWarning, or an error under FASTVLM_STRICT=1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=None)
def _dtensor():
    """torch.distributed.tensor's names, or None where torch has no distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return DTensor, Partial, Replicate, Shard, ColwiseParallel, RowwiseParallel


def is_dtensor(t) -> bool:
    names = _dtensor()
    return names is not None and isinstance(t, names[0])


@dataclass(frozen=True)
class Style:
    """What ``parallelize_module`` installed on one Linear, read back from its two hooks."""

    kind: str  # "colwise" | "rowwise"
    mesh: object
    input_layouts: tuple
    output_layouts: tuple
    use_local_output: bool
    output_fn: object  # the plan's output function (a functools.partial of the style's _prepare_output_fn)
    hooks: tuple  # (pre hooks, forward hooks) as found: compared per call


def _closure(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None or name not in code.co_freevars:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def style_of(mod):
    """The ``Style`` of a module carrying exactly the forward pre-hook and forward hook that a ColwiseParallel or
    RowwiseParallel plan registers (torch.distributed.tensor.distribute_module), else None."""
    names = _dtensor()
    pre, post = tuple(mod._forward_pre_hooks.values()), tuple(mod._forward_hooks.values())
    if names is None or len(pre) != 1 or len(post) != 1:
        return None
    fin, fout = _closure(pre[0], "input_fn"), _closure(post[0], "output_fn")
    mesh, mesh2 = _closure(pre[0], "device_mesh"), _closure(post[0], "device_mesh")
    if not (isinstance(fin, functools.partial) and isinstance(fout, functools.partial)) or mesh is None:
        return None
    for cls, kind in ((names[4], "colwise"), (names[5], "rowwise")):
        if fin.func is cls._prepare_input_fn and fout.func is cls._prepare_output_fn and mesh2 is mesh:
            if len(fin.args) != 2 or len(fout.args) != 2 or fin.keywords or fout.keywords:
                return None
            return Style(kind, mesh, tuple(fin.args[0]), tuple(fout.args[0]), bool(fout.args[1]), fout, (pre, post))
    return None


def hooks_unchanged(mod, style) -> bool:
    """Per call: ``mod`` still carries exactly the hooks its style was read from."""
    pre, post = style.hooks
    return tuple(mod._forward_pre_hooks.values()) == pre and tuple(mod._forward_hooks.values()) == post


@dataclass(frozen=True)
class TPPlan:
    """A recognised Colwise -> Rowwise pair (see the module docstring)."""

    mesh: object
    lin1: object
    lin2: object
    style1: Style
    style2: Style


def _placements(t):
    return tuple(t.placements) if is_dtensor(t) else None


def read(recipe, lin1, lin2, params):
    """(TPPlan or None, reasons) for a projector whose Linears are ``lin1``/``lin2`` and whose other parameters
    (norm, up, merger: name -> tensor or None) are ``params``. (None, []) when nothing is tensor-parallel: the
    caller's usual rules apply (a hook that is not a recognised plan is reported as a hook)."""
    names = _dtensor()
    if names is None:
        return None, []
    _, _, Replicate, Shard, _, _ = names
    weights = {"linear_1.weight": lin1.weight, "linear_1.bias": lin1.bias}
    if lin2 is not None:
        weights.update({"linear_2.weight": lin2.weight, "linear_2.bias": lin2.bias})
    styles = (style_of(lin1), style_of(lin2) if lin2 is not None else None)
    distributed = [n for n, t in (*weights.items(), *params.items()) if is_dtensor(t)]
    if not distributed and styles == (None, None):
        return None, []
    why = "tensor parallel: the fused op computes only a ColwiseParallel linear_1 and RowwiseParallel linear_2"
    style1, style2 = styles
    if style1 is None or style1.kind != "colwise" or style2 is None or style2.kind != "rowwise":
        found = ", ".join(f"{n} {s.kind if s else 'no plan'}" for n, s in zip(("linear_1", "linear_2"), styles))
        return None, [f"{why} ({found}; DTensor parameters: {', '.join(distributed) or 'none'})"]
    unsupported = []
    if recipe.merger or recipe.up or recipe.weight_in_out or recipe.gated:
        unsupported.append("the projector has a merging linear, an up projection, a transposed weight or a gated "
                           "pair (only plain linear_1 -> act -> linear_2 pairs are sharded)")
    if recipe.act2:
        unsupported.append("an activation after linear_2 would act on a partial sum")
    mesh = style1.mesh
    if style2.mesh is not mesh or mesh.ndim != 1:
        unsupported.append(f"the two linears must share one 1-D device mesh (got {mesh} and {style2.mesh})")
    if style1.input_layouts != (Replicate(),):
        unsupported.append(f"linear_1's input_layouts {style1.input_layouts} (sequence parallel) are not replicated")
    if style1.output_layouts != (Shard(-1),) or style2.input_layouts != (Shard(-1),):
        unsupported.append(f"the hidden activation's layouts {style1.output_layouts} -> {style2.input_layouts} are "
                           f"not Shard(-1) (the plan would run a collective between the linears)")
    if style2.output_layouts != (Replicate(),):
        unsupported.append(f"linear_2's output_layouts {style2.output_layouts} (sequence parallel) are not "
                           f"replicated")
    expect = {"linear_1.weight": (Shard(0),), "linear_1.bias": (Shard(0),), "linear_2.weight": (Shard(1),),
              "linear_2.bias": (Replicate(),)}
    for n, t in weights.items():
        if t is not None and _placements(t) != expect[n]:
            unsupported.append(f"{n} has placements {_placements(t)}, not {expect[n]}")
        elif t is not None and t.device_mesh is not mesh:
            unsupported.append(f"{n} lives on another device mesh than the plan's")
    for n, t in params.items():
        if is_dtensor(t):
            unsupported.append(f"{n} is a DTensor (placements {_placements(t)}); only the two linears are sharded")
    if unsupported:
        return None, [f"tensor parallel: {u}" for u in unsupported]
    return TPPlan(mesh, lin1, lin2, style1, style2), []


def _replicated_local(t, mesh):
    """``t`` (the same values on every rank) for a local computation whose gradient is a partial sum: the
    gradient is all-reduced in backward, as the ColwiseParallel input hook's DTensor would be."""
    if t is None or not t.requires_grad or not torch.is_grad_enabled():
        return t
    DTensor, Partial, Replicate = _dtensor()[:3]
    return DTensor.from_local(t, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))


def plan_hooks(tp: TPPlan, mod) -> bool:
    """Per call: ``mod`` is one of the plan's linears and carries exactly the plan's hooks (which the fused forward
    reproduces), nothing added or removed since the plan was read."""
    if mod is tp.lin1:
        return hooks_unchanged(mod, tp.style1)
    return mod is tp.lin2 and hooks_unchanged(mod, tp.style2)


def forward(tp: TPPlan, fn, x, w1, b1, w2, b2, **kw):
    """``fn`` (fastvlm.ops.mlp_projector) on the local shards of a recognised plan, the output reduced by the plan's
    own output function. ``kw``: fn's keywords (rows, act, norm weights...)."""
    DTensor, Partial = _dtensor()[:2]
    mesh = tp.mesh
    x = _replicated_local(x, mesh)
    for key in ("norm_weight", "norm_bias"):
        if kw.get(key) is not None:
            kw[key] = _replicated_local(kw[key], mesh)
    y = fn(x, w1.to_local(), None if b1 is None else b1.to_local(), w2.to_local(), None, **kw)
    y = DTensor.from_local(y, mesh, (Partial(),), run_check=False)
    if b2 is not None:
        y = y + b2  # DTensor's own rule for a replicated bias on a partial sum (as linear_2's F.linear adds it)
    return tp.style2.output_fn(tp.lin2, y, mesh)


ZERO3_ATTRS = ("ds_id", "ds_status")


def zero3_reason(module):
    """Why ``module`` cannot be fused under DeepSpeed ZeRO-3 (its parameters are partitioned), or None."""
    names = [n for n, p in module.named_parameters() if any(hasattr(p, a) for a in ZERO3_ATTRS)]
    if not names:
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (f"parameters partitioned by DeepSpeed ZeRO-3 ({shown} carry ds_id/ds_status): ZeRO-3 gathers them in "
            f"hooks around each child's forward, which the fused forward does not call")
