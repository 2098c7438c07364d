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
import math
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
    linear_1: str  # attribute paths of the children ("" with weight_in_out)
    act: Optional[str] = None
    linear_2: Optional[str] = None
    norm: Optional[str] = None  # a norm over each token row before the merge (Qwen-VL's ln_q) or after the pooling
    merged_width: Optional[str] = None  # attribute with the merged row width: x viewed as (-1, width)
    merge: Optional[str] = None  # "pixel_shuffle" (Idefics3) or "avg_pool" (Gemma 3) of a square token grid
    scale: Optional[str] = None  # attribute with the pixel shuffle's scale
    weight_in_out: Optional[str] = None  # a Parameter [in, out] in place of linear_1 (Gemma 3)


_M = "vllm.model_executor.models."
FAMILIES = (
    # LLaVA, and the models that reuse its projector (LLaVA-NeXT, Phi-4 SigLIP, ...)
    Family("llava", _M + "llava", "LlavaMultiModalProjector", "image_features", "linear_1", "act", "linear_2"),
    # Qwen2-VL (LayerNorm) and Qwen2.5-VL (vLLM RMSNorm): ln_q on each patch, 2x2 merge as a view, then the MLP
    Family("qwen2_vl", _M + "qwen2_vl", "Qwen2VisionPatchMerger", "x", "mlp.0", "mlp.1", "mlp.2", norm="ln_q",
           merged_width="hidden_size"),
    Family("qwen2_5_vl", _M + "qwen2_5_vl", "Qwen2_5_VisionPatchMerger", "x", "mlp.0", "mlp.1", "mlp.2", norm="ln_q",
           merged_width="hidden_size"),
    # Idefics3 and SmolVLM: pixel shuffle of the square patch grid (read by the GEMM's A loads), one linear
    Family("idefics3", _M + "idefics3", "Idefics3Connector", "image_hidden_states", "modality_projection.proj",
           merge="pixel_shuffle", scale="scale_factor"),
    # Gemma 3: k x k average pooling, GemmaRMSNorm (1 + w, fp32), x @ W with W stored [in, out]
    Family("gemma3", _M + "gemma3_mm", "Gemma3MultiModalProjector", "vision_outputs", "", norm="mm_soft_emb_norm",
           merge="avg_pool", weight_in_out="mm_input_projection_weight"),
)


@dataclass(frozen=True)
class Plan:
    """What the fused forward reads; ``key`` identifies the objects it was read from (re-read when one changes)."""

    key: tuple
    fc1: Optional[nn.Module]  # None with weight_in_out
    fc2: Optional[nn.Module]
    act: str
    norm: Optional[tuple]  # (kind, weight, bias, eps) or None
    width: Optional[int]  # merged row width (Qwen-VL) or None
    in_features: int  # the width x must end in
    description: str
    merge: Optional[str] = None
    window: int = 1  # the pixel shuffle's scale / the pooling kernel
    side: Optional[int] = None  # the pooled grid's side (Gemma 3's patches_per_image)
    w_in_out: Optional[torch.Tensor] = None


@functools.lru_cache(maxsize=None)
def _vllm():
    """vLLM's classes the plans compare against (imported on first use)."""
    from vllm.distributed import tensor_model_parallel_all_reduce
    from vllm.model_executor.layers import activation as A
    from vllm.model_executor.layers.layernorm import GemmaRMSNorm, RMSNorm
    from vllm.model_executor.layers.linear import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear,
                                                   UnquantizedLinearMethod)

    # vLLM's activation CustomOps and the fused activation of the same formula (checked in vLLM 0.33/0.34's
    # activation.py: GELU is F.gelu; GELUTanh is F.gelu(approximate="tanh"); NewGELU and FastGELU write the same
    # tanh formula out; QuickGELU is x * sigmoid(1.702 x))
    acts = {A.GELU: "gelu", A.QuickGELU: "quick_gelu"}
    for name in ("GELUTanh", "NewGELU", "FastGELU"):
        if hasattr(A, name):
            acts[getattr(A, name)] = "gelu_tanh"
    return dict(column=ColumnParallelLinear, row=RowParallelLinear, replicated=ReplicatedLinear,
                unquantized=UnquantizedLinearMethod, rmsnorm=RMSNorm, gemma_rmsnorm=GemmaRMSNorm, acts=acts,
                all_reduce=tensor_model_parallel_all_reduce)


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
    if type(mod) is _vllm()["gemma_rmsnorm"]:  # rms_norm with the fp32 weight 1 + w: all in fp32, then x's dtype
        return "rmsnorm_1p", mod.weight, None, float(mod.variance_epsilon)
    return f"norm {type(mod).__name__} has no fused kernel"


def _linear_reasons(name, lin, kind):
    """Why the fused op cannot stand in for ``lin`` (a column-parallel, row-parallel or replicated linear), [] when
    it can."""
    v = _vllm()
    cls = v[kind]
    if not isinstance(lin, cls) or type(lin).forward is not cls.forward:
        return [f"{name} is {type(lin).__name__}, not vLLM's {cls.__name__} (a LoRA or other wrapper)"]
    qm = getattr(lin, "quant_method", None)
    if type(qm) is not v["unquantized"]:
        return [f"{name} is quantized ({type(qm).__name__}): vLLM's quantized GEMM is kept"]
    w = getattr(lin, "weight", None)
    shape = ((lin.output_size, lin.input_size) if kind == "replicated" else
             (lin.output_size_per_partition, lin.input_size_per_partition))
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != shape:
        return [f"{name}.weight is {None if w is None else tuple(w.shape)}, not {shape}: vLLM repacked it for its "
                f"own GEMM (CPU weight packing)"]
    if kind == "column" and lin.gather_output and lin.tp_size > 1:
        return [f"{name} gathers its output across ranks (gather_output=True)"]
    if kind == "row" and not lin.input_is_parallel and lin.tp_size > 1:
        return [f"{name} splits a whole input itself (input_is_parallel=False)"]
    return []


def _children(mod, fam: Family):
    get = mod.get_submodule
    return (get(fam.linear_1) if fam.linear_1 else None, get(fam.linear_2) if fam.linear_2 else None,
            get(fam.act) if fam.act else None, get(fam.norm) if fam.norm else None)


def _key(mod, fam: Family):
    """The objects a plan is read from: a plan is re-read when any of them is replaced (weights loaded, repacked)."""
    fc1, fc2, act, norm = _children(mod, fam)
    return (id(fc1), id(fc2), id(act), id(norm), id(getattr(mod, fam.weight_in_out, None) if fam.weight_in_out else 0),
            *(id(getattr(m, a, None)) for m in (fc1, fc2) for a in ("weight", "bias", "quant_method")),
            id(getattr(norm, "weight", None)), id(getattr(norm, "bias", None)))


def read_plan(mod, fam: Family):
    """(Plan, []) when the fused op can compute ``mod``'s forward, else (None, reasons)."""
    fc1, fc2, act_mod, norm_mod = _children(mod, fam)
    reasons = []
    if fc1 is not None:
        kind1 = "column" if fc2 is not None else "replicated"
        reasons += _linear_reasons(fam.linear_1, fc1, kind1)
    if fc2 is not None:
        reasons += _linear_reasons(fam.linear_2, fc2, "row")
    if batch_invariant():
        reasons.append("VLLM_BATCH_INVARIANT=1 (vLLM's batch-invariant GEMMs are kept)")
    act = "none" if act_mod is None else _act_name(act_mod)
    if act is None:
        reasons.append(f"activation {type(act_mod).__name__} has no fused kernel")
    norm = None
    if norm_mod is not None:
        norm = _norm_of(norm_mod)
        if isinstance(norm, str):
            reasons.append(norm)
    if not reasons and fc2 is not None and fc1.tp_size != fc2.tp_size:
        reasons.append(f"{fam.linear_1} and {fam.linear_2} are split over {fc1.tp_size} and {fc2.tp_size} ranks")
    if reasons:
        return None, reasons
    w_in_out = getattr(mod, fam.weight_in_out) if fam.weight_in_out else None
    k1 = w_in_out.shape[0] if w_in_out is not None else (
        fc1.input_size if fc2 is None else fc1.input_size_per_partition)
    width = getattr(mod, fam.merged_width) if fam.merged_width else None
    window, side = 1, None
    norm_width = norm[1].shape[0] if norm else None
    if fam.merge == "pixel_shuffle":  # k1 = features * scale^2
        window = int(getattr(mod, fam.scale))
        in_features, ok = k1 // (window * window), k1 % (window * window) == 0
    elif fam.merge == "avg_pool":  # the norm runs on the pooled rows: k1 wide
        window, side = int(mod.kernel_size), int(mod.patches_per_image)
        in_features, ok = k1, norm_width in (None, k1)
    elif width is not None:  # Qwen-VL: the norm on each patch, the merged row (k1) holds whole patches
        in_features = norm_width or width
        ok = width == k1 and width % in_features == 0
    else:
        in_features, ok = k1, norm_width in (None, k1)
    if not ok:
        return None, [f"the connector's widths (norm {norm_width}, merged {width}, window {window}) do not fit "
                      f"its first weight's input width {k1}"]
    tp = fc2.tp_size if fc2 is not None else 1
    where = (f"on local shards, tensor-parallel rank {fc2.tp_rank} of {tp}, vLLM's all-reduce kept" if tp > 1 else
             "tensor-parallel size 1" if fc2 is not None else "replicated weights")
    steps = [f"{fam.merge} {window}x{window}"] if fam.merge else []
    steps += [norm[0]] if norm else []
    steps += [fam.linear_1 or fam.weight_in_out] + ([act, fam.linear_2] if fc2 is not None else [])
    desc = f"{' -> '.join(steps)} fused ({where})"
    return Plan(_key(mod, fam), fc1, fc2, act, norm, width, in_features, desc, fam.merge, window, side, w_in_out), []


def defer_reason(plan: Plan, x) -> Optional[str]:
    """Why this call goes to vLLM's forward (input the original treats its own way or rejects), None when fused."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != plan.in_features:
        return f"input of shape {tuple(getattr(x, 'shape', ()))} does not end in {plan.in_features} features"
    if plan.width is not None and x.numel() % plan.width:
        return f"input of shape {tuple(x.shape)} is not whole rows of the merged width {plan.width}"
    if plan.norm is not None and plan.norm[0] == "rmsnorm" and plan.norm[1].dtype != x.dtype:
        return f"RMSNorm weight is {plan.norm[1].dtype} but x is {x.dtype} (vLLM casts through the weight's dtype)"
    if plan.merge is not None:
        if x.dim() != 3 or x.numel() == 0:
            return f"input of shape {tuple(x.shape)} is not a non-empty [batch, tokens, features] grid"
        if plan.merge == "pixel_shuffle" and not x.is_contiguous():  # Idefics3 views x: the original decides
            return "a non-contiguous input (the original's pixel shuffle views it: its result or its error)"
        side = plan.side or math.isqrt(x.shape[1])
        if side * side != x.shape[1] or side % plan.window:
            return f"{x.shape[1]} tokens are not a square grid divisible by {plan.window}"
    if plan.w_in_out is not None and plan.w_in_out.dtype != x.dtype:
        return f"the projection weight is {plan.w_in_out.dtype} but x is {x.dtype} (the original's matmul decides)"
    return None


def run(plan: Plan, x):
    """The connector's output, computed by ``fastvlm.mlp_projector`` on this rank's shards, then vLLM's all-reduce
    exactly where ``RowParallelLinear`` runs it."""
    import fastvlm
    from fastvlm.ops.layout import space_to_depth_rows

    fc1, fc2 = plan.fc1, plan.fc2
    if plan.w_in_out is not None:  # x @ W with W [in, out]: its transposed view, taken per call
        w1, b1 = plan.w_in_out.t(), None
    else:
        w1, b1 = fc1.weight, (None if fc1.skip_bias_add else fc1.bias)  # skip_bias_add: vLLM returns, never adds it
    w2 = b2 = None
    if fc2 is not None:
        w2, b2 = fc2.weight, (None if (fc2.tp_rank > 0 or fc2.skip_bias_add) else fc2.bias)  # rank 0 adds b2 once
    kw = {}
    if plan.norm is not None:
        kind, nw, nb, eps = plan.norm
        kw = dict(norm=kind, norm_weight=nw, norm_bias=nb, eps=eps, norm_group=nw.shape[0])
    shape = None
    if plan.width is not None:  # Qwen-VL: norm(x).view(-1, width); the norm's groups are the patches of a row
        x = x.reshape(-1, plan.width)
    elif plan.merge is not None:  # the merge's source rows, read by the GEMM's A loads
        B, P, D = x.shape
        side = plan.side or math.isqrt(P)
        kw.update(rows=space_to_depth_rows(B, side, side, plan.window, x.device),
                  a_mode="concat" if plan.merge == "pixel_shuffle" else "mean")
        shape = (B, P // plan.window ** 2)
        x = x.reshape(B * P, D)
    y = fastvlm.mlp_projector(x, w1, b1, w2, b2, act=plan.act, **kw)
    if fc2 is not None and fc2.reduce_results and fc2.tp_size > 1:
        y = _vllm()["all_reduce"](y)
    return y if shape is None else y.reshape(*shape, y.shape[-1])
