"""Plain-PyTorch reference of the fused MLP projector: the oracle of every projector test and the CPU path.

    y = linear_2(act(linear_1(norm(x))))            norm over groups of ``norm_group`` columns of x

It reproduces the transformers modules' math and cast points exactly:
* "layernorm": torch.nn.LayerNorm (fp32 statistics inside F.layer_norm, output in x's dtype);
* "rmsnorm": the transformers RMSNorm (Qwen2-VL/Qwen2.5-VL, Llama): fp32 statistics, ``(x * rstd).to(x.dtype)``,
  then multiplied by the weight;
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
    else:
        raise ValueError(f"unknown norm {norm!r}")
    return y.reshape(M, K)


def mlp_projector_ref(x, w1, b1=None, w2=None, b2=None, *, act="gelu", norm="none", norm_weight=None, norm_bias=None,
                      norm_group=None, eps=1e-5):
    """Reference projector on 2-D ``x`` [M, K]; ``w2=None`` gives a single (optionally activated) linear."""
    xn = norm_ref(x, norm, norm_weight, norm_bias, norm_group or x.shape[-1], eps)
    h = act_ref(F.linear(xn, w1, b1), act)
    return h if w2 is None else F.linear(h, w2, b2)


def norm_stats_ref(x, norm, norm_group, eps):
    """fp32 (mean, rstd) per norm row, as kernels/norm_stats.py computes them (mean is None for RMSNorm).
    fp64 inputs get fp64 statistics."""
    xf = x.reshape(-1, norm_group).to(torch.promote_types(x.dtype, torch.float32))
    if norm == "rmsnorm":
        return None, torch.rsqrt(xf.pow(2).mean(-1) + eps)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)
