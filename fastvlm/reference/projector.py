"""Plain-PyTorch reference of the fused MLP projector: the oracle of every projector test and the CPU path.

    y = linear_2(act(linear_1(norm(x))))            norm over groups of ``norm_group`` columns of x

It reproduces the transformers modules' math and cast points exactly:
* "layernorm": torch.nn.LayerNorm (fp32 statistics inside F.layer_norm, output in x's dtype);
* "rmsnorm": the transformers RMSNorm (Qwen2-VL/Qwen2.5-VL, Llama): fp32 statistics, ``(x * rstd).to(x.dtype)``,
  then multiplied by the weight;
* "rmsnorm_1p": Gemma's RMSNorm: everything in fp32 with weight ``1 + w``, one cast at the end;
* linear_1 and linear_2 are F.linear, the activation is the torch op named in fastvlm.reference.activations.
A norm group smaller than the row is Qwen2-VL's merger: LayerNorm(1280) on each patch, then view(-1, 4 * 1280).
"""
import torch
import torch.nn.functional as F

from .activations import act_ref


def norm_ref(x, norm, norm_weight, norm_bias, norm_group, eps):
    """Apply the prologue norm to 2-D ``x`` [M, K] over groups of ``norm_group`` columns; returns x's dtype."""
    if norm == "none":
        return x
    M, K = x.shape
    xg = x.reshape(-1, norm_group)
    if norm == "layernorm":
        y = F.layer_norm(xg, (norm_group,), norm_weight, norm_bias, eps)
    elif norm == "rmsnorm":
        xf = xg.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = norm_weight * xf.to(x.dtype)
    elif norm == "rmsnorm_1p":  # Gemma 3: all in fp32, weight (1 + w), one cast at the end
        xf = xg.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + norm_weight.float())).type_as(xg)
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return y.reshape(M, K)


def mlp_projector_ref(x, w1, b1=None, w2=None, b2=None, *, act="gelu", act2="none", norm="none", norm_weight=None,
                      norm_bias=None, norm_group=None, eps=1e-5, rows=None, a_mode="strided", norm_src=False,
                      gated=False):
    """Reference projector (see fastvlm.ops.projector.mlp_projector for the arguments); differentiable."""
    from fastvlm.ops.layout import gather_ref

    if norm_src:
        a = gather_ref(norm_ref(x, norm, norm_weight, norm_bias, norm_group or x.shape[-1], eps), rows, a_mode)
    else:
        a = gather_ref(x, rows, a_mode)
        a = norm_ref(a, norm, norm_weight, norm_bias, norm_group or a.shape[-1], eps)
    h = F.linear(a, w1, b1)
    if gated:  # Aya Vision's SwiGLU: ``x, gate = h.chunk(2, -1); act(gate) * x``
        up, gate = h.chunk(2, dim=-1)
        h = act_ref(gate, act) * up
    else:
        h = act_ref(h, act)
    return h if w2 is None else act_ref(F.linear(h, w2, b2), act2)


def norm_stats_ref(x, norm, norm_group, eps):
    """fp32 (mean, rstd) per norm row, as kernels/norm_stats.py computes them (mean is None for RMSNorm).
    fp64 inputs get fp64 statistics."""
    xf = x.reshape(-1, norm_group).to(torch.promote_types(x.dtype, torch.float32))
    if norm in ("rmsnorm", "rmsnorm_1p"):
        return None, torch.rsqrt(xf.pow(2).mean(-1) + eps)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)
