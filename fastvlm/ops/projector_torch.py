"""The PyTorch side of ``fastvlm::mlp_projector``: its configuration (``Spec``), the forward built from
fastvlm.reference (the path on CPU and the fallback) and the backward both paths share.

The backward recomputes the (normalised) logical A from x and the saved fp32 statistics instead of keeping it, and
runs in PyTorch ops (cuBLAS GEMMs, fp32 elementwise math, index_add for the merge's adjoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastvlm.ops.layout import gather_ref, scatter_back
from fastvlm.reference.activations import act_grad_ref, act_ref
from fastvlm.reference.projector import norm_ref, norm_stats_ref


@dataclass(frozen=True)
class Spec:
    norm: str
    norm_group: int
    eps: float
    act: str
    act2: str
    a_mode: str
    norm_src: bool
    gated: bool = False  # linear_1's output is chunked into (up, gate) halves: act(gate) * up (SwiGLU, Aya Vision)


def saves_h(w2, s: Spec):
    """h is kept for backward when something after the first linear needs it (a gated pair always does)."""
    return w2 is not None or s.act != "none" or s.gated


def logical_a(x, nw, nb, rows, s: Spec, normed=True):
    """A (normalised when ``normed``) with torch ops: the PyTorch path and the backward's recomputation."""
    if s.norm == "none" or not normed:
        return gather_ref(x, rows, s.a_mode)
    if s.norm_src:
        return gather_ref(norm_ref(x, s.norm, nw, nb, s.norm_group, s.eps), rows, s.a_mode)
    return norm_ref(gather_ref(x, rows, s.a_mode), s.norm, nw, nb, s.norm_group, s.eps)


def activate(h, s: Spec):
    if s.gated:
        up, gate = h.chunk(2, dim=-1)
        return act_ref(gate, s.act) * up
    return act_ref(h, s.act)


def forward_torch(x, w1, b1, w2, b2, nw, nb, rows, s: Spec, save, w_up=None, b_up=None):
    a = logical_a(x, nw, nb, rows, s)
    h = F.linear(a, w1, b1)
    if w_up is not None:  # the same [up | gate] layout as a chunked Linear
        h = torch.cat([F.linear(a, w_up, b_up), h], dim=-1)
    y = activate(h, s)
    z = None
    if w2 is not None:
        z = F.linear(y, w2, b2)
        y = act_ref(z, s.act2)
    mean = rstd = None
    if save and s.norm != "none":
        stats_of = x if s.norm_src else gather_ref(x, rows, s.a_mode)
        mean, rstd = norm_stats_ref(stats_of, s.norm, s.norm_group, s.eps)
    return (y, h if save and saves_h(w2, s) else None, z if save and s.act2 != "none" else None, mean, rstd)



def _norm_from_stats(x, mean, rstd, nw, nb, norm, group):
    """Recompute a norm's output (x's dtype) from saved statistics (the same cast points as norm_ref)."""
    ct = rstd.dtype  # fp32, or fp64 for fp64 inputs
    xg = x.reshape(-1, group).to(ct)
    if norm == "layernorm":
        y = (xg - mean[:, None]) * rstd[:, None] * nw.to(ct)
        if nb is not None:
            y = y + nb.to(ct)
        return y.to(x.dtype).reshape(x.shape)
    if norm == "rmsnorm_1p":
        return (xg * rstd[:, None] * (1.0 + nw.to(ct))).to(x.dtype).reshape(x.shape)
    return (nw * (xg * rstd[:, None]).to(x.dtype)).reshape(x.shape)


def _norm_backward(gxn, x, mean, rstd, nw, norm, group, need_x, need_w, need_b):
    ct = rstd.dtype
    g = gxn.reshape(-1, group).to(ct)
    xg = x.reshape(-1, group).to(ct)
    xhat = (xg - mean[:, None]) * rstd[:, None] if norm == "layernorm" else xg * rstd[:, None]
    gw = gb = gx = None
    if need_w:
        if norm == "rmsnorm":
            gw = (g * xhat.to(x.dtype).to(ct)).sum(0)
        else:
            gw = (g * xhat).sum(0)
        gw = gw.to(nw.dtype)
    if need_b:
        gb = g.sum(0)
    if need_x:
        gs = g * (1.0 + nw.to(ct)) if norm == "rmsnorm_1p" else g * nw.to(ct)
        gx = gs - xhat * (gs * xhat).mean(-1, keepdim=True)
        if norm == "layernorm":
            gx = gx - gs.mean(-1, keepdim=True)
        gx = (gx * rstd[:, None]).to(x.dtype).reshape(x.shape)
    return gx, gw, gb


def _acc_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)


def backward(s: Spec, saved, gy, needs, w_up=None):
    """Gradients of (x, w1, b1, w2, b2, norm_weight, norm_bias, w_up, b_up) given dL/dy; ``needs`` flags which are
    wanted. With a separate up weight, w1 is the gate weight and ``h`` holds [up | gate] pre-activations."""
    x, w1, w2, nw, nb, rows, h, z, mean, rstd = saved
    need_x, need_w1, need_b1, need_w2, need_b2, need_nw, need_nb, need_wu, need_bu = needs
    gwu = gbu = None
    if w_up is not None:  # treat [w_up; w1] as one weight whose output is chunked, then split the gradients
        half = w1.shape[0]
    gy = gy.contiguous()
    gx = gw1 = gb1 = gw2 = gb2 = gnw = gnb = None
    if w2 is not None:
        gz = act_grad_ref(z, gy, s.act2) if s.act2 != "none" else gy
        if need_w2:
            gw2 = (gz.t() @ activate(h, s)).to(w2.dtype)
        if need_b2:
            gb2 = gz.to(_acc_dtype(gz)).sum(0).to(w2.dtype)
        ga = gz @ w2
    else:
        ga = gy
    if s.gated:
        up, gate = h.chunk(2, dim=-1)
        gh = torch.cat([(ga.to(_acc_dtype(ga)) * act_ref(gate.to(_acc_dtype(gate)), s.act)).to(ga.dtype),
                        act_grad_ref(gate, (ga.to(_acc_dtype(ga)) * up).to(ga.dtype), s.act)], dim=-1)
    else:
        gh = act_grad_ref(h, ga, s.act) if s.act != "none" else ga
    if need_b1 or need_bu:
        gb = gh.to(_acc_dtype(gh)).sum(0).to(w1.dtype)
        if w_up is not None:
            gbu, gb1 = (gb[:half] if need_bu else None), (gb[half:] if need_b1 else None)
        else:
            gb1 = gb
    if need_w1 or need_wu:
        a_n = (logical_a(x, nw, nb, rows, s) if s.norm == "none" else
               _normalised_from_stats(x, nw, nb, rows, mean, rstd, s))
        if w_up is not None:
            gw1 = (gh[:, half:].t() @ a_n).to(w1.dtype) if need_w1 else None
            gwu = (gh[:, :half].t() @ a_n).to(w_up.dtype) if need_wu else None
        else:
            gw1 = (gh.t() @ a_n).to(w1.dtype)
    if need_x or need_nw or need_nb:
        # gradient of the (normalised) logical A
        g_a = gh @ w1 if w_up is None else gh[:, :half] @ w_up + gh[:, half:] @ w1
        if s.norm == "none":
            gx = scatter_back(g_a, rows, s.a_mode, x.shape[0], x) if need_x else None
        elif s.norm_src:
            g_xn = scatter_back(g_a, rows, s.a_mode, x.shape[0])
            gx, gnw, gnb = _norm_backward(g_xn, x, mean, rstd, nw, s.norm, s.norm_group, need_x, need_nw, need_nb)
        else:
            a_raw = gather_ref(x, rows, s.a_mode)
            g_raw, gnw, gnb = _norm_backward(g_a, a_raw, mean, rstd, nw, s.norm, s.norm_group, need_x, need_nw,
                                             need_nb)
            gx = scatter_back(g_raw, rows, s.a_mode, x.shape[0]) if need_x else None
        if gnb is not None:
            gnb = gnb.to(nb.dtype)
    return gx, gw1, gb1, gw2, gb2, gnw, gnb, gwu, gbu


def _normalised_from_stats(x, nw, nb, rows, mean, rstd, s: Spec):
    if s.norm_src:
        return gather_ref(_norm_from_stats(x, mean, rstd, nw, nb, s.norm, s.norm_group), rows, s.a_mode)
    return _norm_from_stats(gather_ref(x, rows, s.a_mode), mean, rstd, nw, nb, s.norm, s.norm_group)
