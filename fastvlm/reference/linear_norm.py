"""Plain-PyTorch references for ``LayerNorm(x @ W^T + b + residual)`` (BERT SelfOutput / Output in eval mode).

``linear_norm_eager`` has transformers' cast points (dense output and the residual sum rounded to the input dtype, then
``F.layer_norm``): it is the op's PyTorch path and bit-identical to ``Blip2QFormerSelfOutput`` in eval mode.
``linear_norm_ref`` computes in ``compute_dtype`` (float64 in the tests) and rounds once at the end.
"""
import torch
import torch.nn.functional as F


def linear_norm_eager(x, w, b, residual, ln_w, ln_b, eps):
    h = F.linear(x, w, b)
    if residual is not None:
        h = h + residual
    return F.layer_norm(h, (w.shape[0],), ln_w, ln_b, eps)


def linear_norm_ref(x, w, b, residual, ln_w, ln_b, eps, compute_dtype=torch.float64):
    c = lambda t: None if t is None else t.to(compute_dtype)  # noqa: E731
    return linear_norm_eager(c(x), c(w), c(b), c(residual), c(ln_w), c(ln_b), eps)
