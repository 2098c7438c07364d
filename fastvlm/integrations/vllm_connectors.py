"""vLLM's connector modules, read as fastvlm projector plans, and the fused forward that replaces theirs.

vLLM builds its connectors from tensor-parallel linears: the first is a ``ColumnParallelLinear`` (each rank holds
``out / tp`` rows of W1 and of b1), the second a ``RowParallelLinear`` (each rank holds ``in / tp`` columns of W2; b2
is whole, added by rank 0 only) whose partial sums vLLM all-reduces. The activation works elementwise, so

    y = all_reduce( act(x @ W1_r^T + b1_r) @ W2_r^T + [b2 on rank 0] )

is the same computation: ``fastvlm.mlp_projector`` runs the part in brackets on the local shards (one fused op:
norm, first GEMM, activation, second GEMM) and vLLM's own ``tensor_model_parallel_all_reduce`` runs after it, where
``RowParallelLinear.forward`` runs it.

``read_plan(module)`` returns a ``Plan`` or the reasons the module is left to vLLM: a quantized linear (its
``quant_method`` is not ``UnquantizedLinearMethod``: vLLM's quantized GEMM stays), a weight vLLM repacked (its CPU
GEMM dispatch keeps a packed copy and leaves an empty ``weight``), a linear wrapped by LoRA, batch-invariant mode,
an activation or norm without a fused equivalent. ``run(plan, x)`` computes the connector from a plan. Imports
vLLM on first use only.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from fastvlm.reference.activations import activation_name


@dataclass(frozen=True)
class Family:
    """One vLLM connector class: where it lives and how its children map onto the fused op."""

    name: str
    module: str  # vLLM module defining the class
    cls: str
    input_name: str  # the forward's argument (callers may pass it by keyword)
    linear_1: str  # attribute paths of the children
    act: str
    linear_2: str
    norm: Optional[str] = None  # a norm over each token row before the merge (Qwen-VL's ln_q)
    merged_width: Optional[str] = None  # attribute with the merged row width: x viewed as (-1, width)


_M = "vllm.model_executor.models."
FAMILIES = (
    # LLaVA, and the models that reuse its projector (LLaVA-NeXT, Phi-4 SigLIP, ...)
    Family("llava", _M + "llava", "LlavaMultiModalProjector", "image_features", "linear_1", "act", "linear_2"),
    # Qwen2-VL (LayerNorm) and Qwen2.5-VL (vLLM RMSNorm): ln_q on each patch, 2x2 merge as a view, then the MLP
    Family("qwen2_vl", _M + "qwen2_vl", "Qwen2VisionPatchMerger", "x", "mlp.0", "mlp.1", "mlp.2", norm="ln_q",
           merged_width="hidden_size"),
    Family("qwen2_5_vl", _M + "qwen2_5_vl", "Qwen2_5_VisionPatchMerger", "x", "mlp.0", "mlp.1", "mlp.2", norm="ln_q",
           merged_width="hidden_size"),
)


@dataclass(frozen=True)
class Plan:
    """What the fused forward reads; ``key`` identifies the objects it was read from (re-read when one changes)."""

    key: tuple
    fc1: nn.Module
    fc2: nn.Module
    act: str
    norm: Optional[tuple]  # (kind, weight, bias, eps) or None
    width: Optional[int]  # merged row width (Qwen-VL) or None
    in_features: int  # the width x must end in
    description: str


@functools.lru_cache(maxsize=None)
def _vllm():
    """vLLM's classes the plans compare against (imported on first use)."""
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.model_executor.layers import activation as A
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear, UnquantizedLinearMethod

    # vLLM's activation CustomOps and the fused activation of the same formula (checked in vLLM 0.33/0.34's
    # activation.py: GELU is F.gelu; GELUTanh is F.gelu(approximate="tanh"); NewGELU and FastGELU write the same
    # tanh formula out; QuickGELU is x * sigmoid(1.702 x))
    acts = {A.GELU: "gelu", A.QuickGELU: "quick_gelu"}
    for name in ("GELUTanh", "NewGELU", "FastGELU"):
        if hasattr(A, name):
            acts[getattr(A, name)] = "gelu_tanh"
    return dict(column=ColumnParallelLinear, row=RowParallelLinear, unquantized=UnquantizedLinearMethod,
                rmsnorm=RMSNorm, acts=acts, all_reduce=tensor_model_parallel_all_reduce)


def batch_invariant() -> bool:
    import vllm.envs as envs

    return bool(getattr(envs, "VLLM_BATCH_INVARIANT", False))


def _act_name(mod):
    return _vllm()["acts"].get(type(mod)) or activation_name(mod)


def _norm_of(mod):
    """(kind, weight, bias, eps) of a norm whose math the fused op reproduces, or a reason string."""
    if type(mod) is nn.LayerNorm:
        if len(mod.normalized_shape) != 1 or mod.weight is None:
            return f"{type(mod).__name__} over {tuple(mod.normalized_shape)} without a 1-D affine weight"
        return "layernorm", mod.weight, mod.bias, float(mod.eps)
    if type(mod) is _vllm()["rmsnorm"]:
        # vLLM's rms_norm: fp32 statistics, x * rstd cast to the weight's dtype, times the weight (transformers'
        # Qwen2RMSNorm cast points when the weight has x's dtype; checked per call)
        if not getattr(mod, "has_weight", True) or getattr(mod, "variance_size_override", None) is not None:
            return "RMSNorm without a weight or with a variance size override has no fused kernel"
        return "rmsnorm", mod.weight, None, float(mod.variance_epsilon)
    return f"norm {type(mod).__name__} has no fused kernel"


def _linear_reasons(name, lin, kind):
    """Why the fused op cannot stand in for ``lin`` (a column- or row-parallel linear), [] when it can."""
    v = _vllm()
    cls = v[kind]
    if not isinstance(lin, cls) or type(lin).forward is not cls.forward:
        return [f"{name} is {type(lin).__name__}, not vLLM's {cls.__name__} (a LoRA or other wrapper)"]
    qm = getattr(lin, "quant_method", None)
    if type(qm) is not v["unquantized"]:
        return [f"{name} is quantized ({type(qm).__name__}): vLLM's quantized GEMM is kept"]
    w = getattr(lin, "weight", None)
    shape = (lin.output_size_per_partition, lin.input_size_per_partition)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
        return [f"{name}.weight is {None if w is None else tuple(w.shape)}, not {shape}: vLLM repacked it for its "
                f"own GEMM (CPU weight packing)"]
    if kind == "column" and lin.gather_output and lin.tp_size > 1:
        return [f"{name} gathers its output across ranks (gather_output=True)"]
    if kind == "row" and not lin.input_is_parallel and lin.tp_size > 1:
        return [f"{name} splits a whole input itself (input_is_parallel=False)"]
    return []


def _key(mod, fam: Family):
    """The objects a plan is read from: a plan is re-read when any of them is replaced (weights loaded, repacked)."""
    fc1, fc2 = mod.get_submodule(fam.linear_1), mod.get_submodule(fam.linear_2)
    norm = mod.get_submodule(fam.norm) if fam.norm else None
    return (id(fc1), id(fc2), id(mod.get_submodule(fam.act)), id(norm),
            *(id(getattr(m, a, None)) for m in (fc1, fc2) for a in ("weight", "bias", "quant_method")),
            id(getattr(norm, "weight", None)), id(getattr(norm, "bias", None)))


def read_plan(mod, fam: Family):
    """(Plan, []) when the fused op can compute ``mod``'s forward, else (None, reasons)."""
    fc1, fc2 = mod.get_submodule(fam.linear_1), mod.get_submodule(fam.linear_2)
    reasons = _linear_reasons(fam.linear_1, fc1, "column") + _linear_reasons(fam.linear_2, fc2, "row")
    if batch_invariant():
        reasons.append("VLLM_BATCH_INVARIANT=1 (vLLM's batch-invariant GEMMs are kept)")
    act = _act_name(mod.get_submodule(fam.act))
    if act is None:
        reasons.append(f"activation {type(mod.get_submodule(fam.act)).__name__} has no fused kernel")
    norm = None
    if fam.norm:
        norm = _norm_of(mod.get_submodule(fam.norm))
        if isinstance(norm, str):
            reasons.append(norm)
    if not reasons and fc1.tp_size != fc2.tp_size:
        reasons.append(f"{fam.linear_1} and {fam.linear_2} are split over {fc1.tp_size} and {fc2.tp_size} ranks")
    if reasons:
        return None, reasons
    width = getattr(mod, fam.merged_width) if fam.merged_width else None
    in_features = norm[1].shape[0] if norm else fc1.input_size_per_partition
    if (width or in_features) != fc1.input_size_per_partition or (width and width % in_features):
        return None, [f"the merged width {width} does not match {fam.linear_1}'s input width "
                      f"{fc1.input_size_per_partition}"]
    tp = fc2.tp_size
    where = (f"on local shards, tensor-parallel rank {fc2.tp_rank} of {tp}, vLLM's all-reduce kept" if tp > 1 else
             "tensor-parallel size 1")
    desc = f"{(norm[0] + ' -> ') if norm else ''}{fam.linear_1} -> {act} -> {fam.linear_2} fused ({where})"
    return Plan(_key(mod, fam), fc1, fc2, act, norm, width, in_features, desc), []


def defer_reason(plan: Plan, x) -> Optional[str]:
    """Why this call goes to vLLM's forward (input the original treats its own way or rejects), None when fused."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != plan.in_features:
        return f"input of shape {tuple(getattr(x, 'shape', ()))} does not end in {plan.in_features} features"
    if plan.width is not None and x.numel() % plan.width:
        return f"input of shape {tuple(x.shape)} is not whole rows of the merged width {plan.width}"
    if plan.norm is not None and plan.norm[0] == "rmsnorm" and plan.norm[1].dtype != x.dtype:
        return f"RMSNorm weight is {plan.norm[1].dtype} but x is {x.dtype} (vLLM casts through the weight's dtype)"
    return None


def run(plan: Plan, x):
    """The connector's output, computed by ``fastvlm.mlp_projector`` on this rank's shards, then vLLM's all-reduce
    exactly where ``RowParallelLinear`` runs it."""
    import fastvlm

    fc1, fc2 = plan.fc1, plan.fc2
    b1 = None if fc1.skip_bias_add else fc1.bias  # skip_bias_add: vLLM returns the bias instead of adding it
    b2 = None if (fc2.tp_rank > 0 or fc2.skip_bias_add) else fc2.bias  # b2 is whole: rank 0 adds it once
    kw = {}
    if plan.norm is not None:
        kind, nw, nb, eps = plan.norm
        kw = dict(norm=kind, norm_weight=nw, norm_bias=nb, eps=eps, norm_group=nw.shape[0])
    if plan.width is not None:  # Qwen-VL: norm(x).view(-1, width); the norm's groups are the patches of a row
        x = x.reshape(-1, plan.width)
    y = fastvlm.mlp_projector(x, fc1.weight, b1, fc2.weight, b2, act=plan.act, **kw)
    if fc2.reduce_results and fc2.tp_size > 1:
        y = _vllm()["all_reduce"](y)
    return y
