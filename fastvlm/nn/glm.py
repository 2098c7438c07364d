"""GLM-4V's connector chain after the Conv3d patch rows (``Glm4vVisionModel.forward``'s tail)::

    post_layernorm (RMSNorm) -> view(-1, m, m, C).permute(0, 3, 1, 2) -> downsample (Conv2d, kernel == stride == m)
    -> merger: proj (Linear) -> post_projection_norm (LayerNorm) -> act1 (GELU) -> SwiGLU (gate, up, down)

Two drop-in modules:

``FusedMergeConv2d`` (a ``torch.nn.Conv2d``): a convolution whose kernel equals its stride, unpadded, over an input
exactly one kernel window in size is a Linear over each window's (c, i, j) vector. GLM's input is the permuted view
of contiguous rows, so the window's m * m rows are read in place as a channel-major merge (``a_mode="concat_cm"``,
the conv weight's own column order: no weight copy, no im2col copy). ``fastvlm.patch`` swaps it in for the
``downsample`` of a vision model with ``spatial_merge_size == kernel_size``; any other input runs ``Conv2d.forward``
(reported).

``Fused<GLM merger>`` (built from ``GlmMergerRecipe``, a subclass of the original): proj and the LayerNorm in one
``fastvlm::linear_residual_layernorm`` call, the GELU, then gate and up projections as a gated pair in one
``fastvlm::mlp_projector`` GEMM with ``act(gate) * up`` and down_proj (separate weights, no copy).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm._cache import cached_arange, once
from fastvlm.nn._base import _FusedBase, _child_reasons, _run_original
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.linear_norm import linear_residual_layernorm
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name


@dataclass(frozen=True)
class GlmMergerRecipe:
    family: str
    module: str  # transformers module that defines the original class
    cls: str  # original class name
    fused_name: str
    input_name: str = "hidden_state"
    proj: str = "proj"  # Linear(dim, dim)
    norm: str = "post_projection_norm"  # LayerNorm(dim) on proj's output
    act1: str = "act1"  # nn.GELU after the LayerNorm
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "act_fn"  # the SwiGLU's activation (config.hidden_act)


_T = "transformers.models."
# copies under other names (Glm4vMoe, GlmOcr) are recognised by structure (fastvlm/integrations/behaviour.py)
GLM_RECIPES = (GlmMergerRecipe("glm4v", _T + "glm4v.modeling_glm4v", "Glm4vVisionPatchMerger",
                               "FusedGlm4vVisionPatchMerger"),)


def _exact(mod, cls):
    return type(mod) is cls


def _structure_reasons(m, r):
    """Why this merger instance cannot run fused (empty when it can): structure only, no input."""
    reasons = []
    for name in (r.proj, r.gate, r.up, r.down):
        if not _exact(getattr(m, name, None), nn.Linear):
            reasons.append(f"{name} is not a torch.nn.Linear")
    norm = getattr(m, r.norm, None)
    if not _exact(norm, nn.LayerNorm):
        reasons.append(f"{r.norm} is not a torch.nn.LayerNorm")
    elif norm.weight is None or len(norm.normalized_shape) != 1:
        reasons.append(f"{r.norm} has no affine weight or normalises more than the last dimension")
    act1 = getattr(m, r.act1, None)
    if not _exact(act1, nn.GELU):
        reasons.append(f"{r.act1} is not a torch.nn.GELU")
    if activation_name(getattr(m, r.act, None)) in (None, "none"):
        reasons.append(f"{r.act} ({type(getattr(m, r.act, None)).__name__}) has no fused equivalent")
    for name in (r.proj, r.norm, r.act1, r.gate, r.up, r.down, r.act):
        child = getattr(m, name, None)
        if isinstance(child, nn.Module):
            reasons += _child_reasons(name, child)
    if not reasons:
        gate, up = getattr(m, r.gate), getattr(m, r.up)
        if gate.weight.shape != up.weight.shape or (gate.bias is None) != (up.bias is None):
            reasons.append(f"{r.gate} and {r.up} differ in shape or bias")
        dtypes = {p.dtype for p in m.parameters()}
        if len(dtypes) > 1:
            reasons.append(f"parameters of mixed dtypes {sorted(str(d) for d in dtypes)}")
    return reasons


def _merger_forward(self, hidden_state):
    r = self._fastvlm_recipe
    reasons = self._fastvlm_structure()
    if not reasons:
        if autocast_on(hidden_state.device):
            reasons = ["autocast is enabled (the original's Linear and LayerNorm reproduce its casts)"]
        elif hidden_state.dtype != getattr(self, r.proj).weight.dtype:
            reasons = [f"input dtype {hidden_state.dtype} differs from the weights'"]
    if reasons:
        return _run_original(self, "; ".join(reasons), hidden_state)
    proj, norm, gate, up, down = (getattr(self, n) for n in (r.proj, r.norm, r.gate, r.up, r.down))
    h = linear_residual_layernorm(hidden_state, proj.weight, proj.bias, None, norm.weight, norm.bias, norm.eps)
    h = F.gelu(h, approximate=getattr(self, r.act1).approximate)
    return mlp_projector(h, gate.weight, gate.bias, down.weight, down.bias, act=activation_name(getattr(self, r.act)),
                         w_up=up.weight, b_up=up.bias)


def _merger_structure(self):
    return _structure_reasons(self, self._fastvlm_recipe)


def _merger_probe_args(self):
    """A verify probe: 7 merged rows of the merger's width (``fastvlm.patch(verify=True)``)."""
    w = getattr(self, self._fastvlm_recipe.proj).weight
    return (torch.randn(7, w.shape[1], device=w.device, dtype=w.dtype),)


@once
def fused_glm_class(recipe: GlmMergerRecipe):
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    return type(recipe.fused_name, (_FusedBase, base), {
        "forward": _merger_forward, "_fastvlm_structure": _merger_structure,
        "_fastvlm_probe_args": _merger_probe_args, "_fastvlm_base": base, "_fastvlm_recipe": recipe,
        "__module__": "fastvlm.nn",
        "__doc__": f"Drop-in ``{recipe.cls}``: proj + LayerNorm in one op, GELU, gated SwiGLU MLP in one op."})


class FusedMergeConv2d(nn.Conv2d):
    """Drop-in ``torch.nn.Conv2d`` for a kernel == stride, unpadded convolution over inputs one window in size (the
    GLM vision models' ``downsample``): one GEMM reading each window's rows in place (see the module docstring)."""

    @staticmethod
    def accepts(conv):
        """Whether ``conv`` is a kernel == stride, unpadded, undilated, ungrouped convolution."""
        return (conv.stride == conv.kernel_size and conv.padding == (0, 0) and conv.dilation == (1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros")

    def _fastvlm_reasons(self, input):
        reasons = []
        if not self.accepts(self):
            reasons.append("the convolution is not kernel == stride, unpadded, undilated and ungrouped")
        elif not isinstance(input, torch.Tensor) or input.dim() != 4 or tuple(input.shape[2:]) != self.kernel_size \
                or input.shape[1] != self.in_channels:
            reasons.append(f"input {tuple(getattr(input, 'shape', ()))} is not [N, {self.in_channels}, "
                           f"{self.kernel_size[0]}, {self.kernel_size[1]}] (one window per item)")
        elif input.dtype != self.weight.dtype:
            reasons.append(f"input dtype {input.dtype} differs from the weight's {self.weight.dtype}")
        elif autocast_on(input.device):
            reasons.append("autocast is enabled (Conv2d's forward reproduces autocast's casts)")
        return reasons

    def forward(self, input):
        reasons = self._fastvlm_reasons(input)
        if reasons:
            _dispatch.report_fallback("FusedMergeConv2d", reasons, f"x{tuple(getattr(input, 'shape', ()))}")
            return super().forward(input)
        n, c, kh, kw = input.shape
        w = self.weight.reshape(self.out_channels, c * kh * kw)  # (c, i, j) columns: a view
        rows = input.permute(0, 2, 3, 1)  # [N, kh, kw, C]: GLM's rows, contiguous
        if rows.is_contiguous():
            table = cached_arange(0, n * kh * kw, input.device).view(n, kh * kw)
            y = mlp_projector(rows.reshape(n * kh * kw, c), w, self.bias, act="none", rows=table, a_mode="concat_cm")
        else:  # NCHW or any other layout: the window as one (c, i, j) row
            y = mlp_projector(input.reshape(n, c * kh * kw), w, self.bias, act="none")
        return y.view(n, self.out_channels, 1, 1)

    def _fastvlm_probe_args(self, items=3):
        """A probe laid out as the GLM vision models pass it: rows viewed as [N, m, m, C], permuted to NCHW."""
        kh, kw = self.kernel_size
        x = torch.randn(items * kh * kw, self.in_channels, device=self.weight.device, dtype=self.weight.dtype)
        return (x.view(items, kh, kw, self.in_channels).permute(0, 3, 1, 2),)

    @classmethod
    def from_module(cls, original):
        if type(original) is not nn.Conv2d:
            raise TypeError(f"FusedMergeConv2d.from_module expects a torch.nn.Conv2d, got {type(original).__name__}")
        from fastvlm.nn._base import _adopt

        return _adopt(cls, original)


def merge_conv_paths(model):
    """Paths of the ``downsample`` convolutions to swap: an exact Conv2d, kernel == stride == its parent's
    ``spatial_merge_size``, unpadded (GLM-4V, GLM-4V-MoE, GLM-OCR, GLM-5-Next vision models)."""
    out = []
    for name, mod in model.named_modules():
        conv = getattr(mod, "_modules", {}).get("downsample")
        m = getattr(mod, "spatial_merge_size", None)
        if (type(conv) is nn.Conv2d and isinstance(m, int) and conv.kernel_size == (m, m)
                and FusedMergeConv2d.accepts(conv)):
            out.append(f"{name}.downsample" if name else "downsample")
    return out
