"""Fast modules for connectors fed by convolutional feature maps.

* ``FeatureMapProjector``: a [B, C, H, W] map (any strides) -> [k x k average pool] -> flatten -> Linear [-> act ->
  Linear], the first GEMM reading the map in place (``fastvlm.ops.feature_map``). For ConvNeXt / FastViT-style
  towers whose output map feeds an MLP connector.
* ``FusedFastVlmMultiModalProjector``: transformers' ``fast_vlm`` feeds its LLaVA-style projector
  ``last_hidden_state.flatten(2).permute(0, 2, 1)``, a channel-strided view of the tower's NCHW map. The fused class
  reads that view in place (no transpose copy); contiguous inputs take the projector's usual fused path. Registered
  for ``fastvlm.patch`` / ``apply_to_transformers`` ahead of the generic LLaVA-like recipe.
* ``FusedCAbstractor`` / ``FusedLDPv2Projector``: subclasses of the reference modules in
  ``fastvlm.reference.feature_map`` (same constructor, parameters and state_dict keys; ``from_module(reference)``
  shares the reference's tensors). Convolutions stay on cuDNN through PyTorch; pooling and projections run on
  fastvlm kernels, the pool fused into the projection's loads where the structure allows it.

Every fast module falls back to the reference forward when it cannot reproduce it (hooks on children, autocast,
unsupported activations or pooling shapes), and says why (``fastvlm.FastVLMFallbackWarning`` / FASTVLM_STRICT=1).
"""
from __future__ import annotations


import torch.nn as nn
import torch.nn.functional as F

from fastvlm import _dispatch
from fastvlm.ops._checks import autocast_on
from fastvlm.ops import _fast
from fastvlm.ops.feature_map import feature_map_projector, token_matrix_view, tokens_as_map
from fastvlm.ops.layout import pool_rows
from fastvlm.ops.pool import pool_tokens
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name
from fastvlm.reference.feature_map import CAbstractor, LDPv2Projector, grid_of

from ._base import _child_reasons, _FusedBase
from .projector import fused_class
from .projector_recipes import RECIPES
from fastvlm._cache import once


def _pair(p):
    return (p, p) if isinstance(p, int) else (int(p[0]), int(p[1]))


def _hook_reasons(module, names):
    reasons = []
    for name in names:
        reasons += _child_reasons(name, module.get_submodule(name))
    return reasons


def _autocast_reasons(x):
    return ["autocast is enabled (the reference forward reproduces autocast's casts)"] \
        if autocast_on(x.device) else []  # not torch.is_autocast_enabled: it raises for meta tensors


def _mlp_plan(seq, what):
    """(w1, b1, act, w2, b2) of a Sequential [Linear] or [Linear, act, Linear], or a reason string."""
    mods = list(seq)
    if len(mods) not in (1, 3) or any(type(mods[i]) is not nn.Linear for i in range(0, len(mods), 2)):
        return f"{what} is not Linear or Linear-act-Linear ({[type(m).__name__ for m in mods]})"
    if len(mods) == 1:
        return mods[0].weight, mods[0].bias, "none", None, None
    act = activation_name(mods[1])
    if act is None:
        return f"{what} activation {type(mods[1]).__name__} has no fused kernel"
    return mods[0].weight, mods[0].bias, act, mods[2].weight, mods[2].bias


def is_channels_last(m):
    """True when the [B, C, H, W] map's memory is token rows [B*H*W, C] with unit channel stride."""
    return m.permute(0, 2, 3, 1).is_contiguous()


def avg_pool_map(m, k):
    """``F.avg_pool2d(m, k)`` for a map whose sides k divides. A channels-last map (what the token views and cuDNN's
    NHWC convolutions produce) is pooled by fastvlm's pooling kernel reading the token rows in place; the result is
    a channels-last map again."""
    B, C, H, W = m.shape
    if H % k or W % k:
        raise ValueError(f"avg_pool_map: a {H}x{W} map is not divisible by {k}")
    if not is_channels_last(m):
        _dispatch.report_fallback("fastvlm::pool_tokens", ("the map is not channels-last (token rows with unit "
                                                           "channel stride): torch avg_pool2d pools it",),
                                  f"map{tuple(m.shape)}")
        return F.avg_pool2d(m, k)
    y = pool_tokens(m.permute(0, 2, 3, 1).reshape(B * H * W, C), pool_rows(B, H, W, k, m.device), "mean")
    return y.view(B, H // k, W // k, C).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ generic projector


class FeatureMapProjector(nn.Module):
    """[B, C, H, W] map -> [avg_pool2d(pool)] -> tokens [B, T, C] -> linear_1 -> act [-> linear_2 -> act2].

    Equivalent eager code: ``mlp(F.avg_pool2d(x, pool).flatten(2).transpose(1, 2))``. ``hidden=None``: a single
    Linear (with ``act``); otherwise linear_1 (C -> hidden), act, linear_2 (hidden -> out).
    """

    def __init__(self, in_channels, out_features, hidden=None, act="gelu", pool=1, bias=True, act2="none"):
        super().__init__()
        self.pool = _pair(pool)
        self.act_name, self.act2_name = act, act2
        first = hidden if hidden is not None else out_features
        self.linear_1 = nn.Linear(in_channels, first, bias=bias)
        self.linear_2 = nn.Linear(hidden, out_features, bias=bias) if hidden is not None else None

    @classmethod
    def from_projector(cls, projector, pool=1):
        """Wrap a LLaVA-style projector (``linear_1``, ``act``, ``linear_2``) without copying its parameters; the
        result takes the encoder's map directly."""
        fm = cls.__new__(cls)
        nn.Module.__init__(fm)
        fm.pool = _pair(pool)
        act_mod = getattr(projector, "act", None) or nn.Identity()
        act = activation_name(act_mod)
        if act is None:
            raise TypeError(f"FeatureMapProjector: activation {type(act_mod).__name__} has no fused kernel")
        fm.act_name, fm.act2_name = act, "none"
        fm.linear_1, fm.linear_2 = projector.linear_1, getattr(projector, "linear_2", None)
        return fm

    def forward(self, x):
        l2 = self.linear_2
        return feature_map_projector(x, self.linear_1.weight, self.linear_1.bias,
                                     None if l2 is None else l2.weight, None if l2 is None else l2.bias,
                                     act=self.act_name, act2=self.act2_name, pool=self.pool)


# ------------------------------------------------------------------------------------------------ transformers fast_vlm


FEATURE_MAP_RECIPES = tuple(r for r in RECIPES if r.family == "fast_vlm")


class _FeatureMapProjectorMixin:
    """Reads a channel-strided [B, T, C] token view (``map.flatten(2).permute(0, 2, 1)``) in place."""

    def _fastvlm_forward(self, x, *extra):
        if x.dim() == 3 and x.stride(-1) != 1 and x.shape[-1] > 1 and not extra:
            y, rebuild = self._fastvlm_repeat(x)  # the repeat path (fastvlm.ops._fast)
            if y is not None:
                return y
            plan, reasons = self._fastvlm_plan(x)
            if not reasons and plan.get("norm", "none") == "none" and not self._fastvlm_recipe.gated:
                m = tokens_as_map(x)
                params = (plan["w1"], plan["b1"]) if plan["w2"] is None else \
                    (plan["w1"], plan["b1"], plan["w2"], plan["b2"])
                if not (rebuild and plan.get("_tp") is None and not self._fastvlm_recipe.weight_in_out
                        and _fast.wanted(x, params)):
                    return feature_map_projector(m, plan["w1"], plan["b1"], plan["w2"], plan["b2"],
                                                 act=plan["act"], act2=plan["act2"])
                memo = {}
                y = feature_map_projector(m, plan["w1"], plan["b1"], plan["w2"], plan["b2"], act=plan["act"],
                                          act2=plan["act2"], _memo_out=memo)
                a = token_matrix_view(m)
                plan["_chain"] = _fast.plain_chain(x, y, params, memo.get("memo"), memo.get("token"), a)
                return y
        return super()._fastvlm_forward(x, *extra)


@once
def fused_feature_map_class(recipe):
    base = fused_class(recipe)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; a feature map's token view is read in place by fastvlm.ops.feature_map.")
    return type(recipe.fused_name, (_FeatureMapProjectorMixin, base),
                {"__doc__": doc, "__module__": "fastvlm.nn"})


# ------------------------------------------------------------------------------------------------ C-Abstractor


class FusedCAbstractor(_FusedBase, CAbstractor):
    """``CAbstractor`` with the pooling and the readout MLP on fastvlm kernels (convolutions stay on cuDNN).

    The input tokens are viewed as a channels-last map (no copy), so the residual stages run NHWC; the adaptive
    pooling (an exact k x k pool when the grids divide) reads the stage-1 map's token rows in place; the readout
    reads the stage-2 map in place through the fused GEMM. With ``depth=0`` the pooling itself is fused into the
    readout's loads (one kernel for pool + Linear + act, then the second Linear).
    """

    _fastvlm_base = CAbstractor

    def _fastvlm_structure(self):
        reasons = []
        plan = _mlp_plan(self.readout, "readout")
        if isinstance(plan, str):
            reasons.append(plan)
        if self.in_side % self.out_side:
            reasons.append(f"adaptive pooling {self.in_side}x{self.in_side} -> {self.out_side}x{self.out_side} has "
                           f"uneven windows (no fused pool)")
        return (None, reasons) if reasons else (plan, [])

    def forward(self, x):
        plan, reasons = self._fastvlm_structure()
        reasons = reasons + _autocast_reasons(x) + _hook_reasons(self, ("sampler", "readout", "stage1", "stage2"))
        if not reasons and (x.dim() != 3 or x.shape[1] != self.num_input_tokens):
            reasons.append(f"input {tuple(x.shape)} is not [B, {self.num_input_tokens}, C]")
        if reasons:
            _dispatch.report_fallback("FusedCAbstractor", reasons, f"x{tuple(x.shape)}")
            return CAbstractor.forward(self, x)
        w1, b1, act, w2, b2 = plan
        B, L, C = x.shape
        if self.pos_emb is not None:
            x = x + self.pos_emb
        s = self.in_side
        m = x.reshape(B, s, s, C).permute(0, 3, 1, 2)  # channels-last map view of the tokens
        m = self.stage1(m)
        k = self.in_side // self.out_side
        if len(self.stage2) == 0:  # pool fused into the readout's loads
            return feature_map_projector(m, w1, b1, w2, b2, act=act, pool=k)
        if k > 1:
            m = avg_pool_map(m, k)
        m = self.stage2(m)
        return feature_map_projector(m, w1, b1, w2, b2, act=act)


# ------------------------------------------------------------------------------------------------ LDPv2


class FusedLDPv2Projector(_FusedBase, LDPv2Projector):
    """``LDPv2Projector`` with MLP and pooling on fastvlm kernels, the depthwise position conv on cuDNN.

    Average pooling is linear, so ``pool(linear_2(g)) == linear_2(pool(g))``: the fast path runs linear_1 + GELU
    as one fused GEMM, then linear_2 as a fused GEMM whose A loads average each 2x2 window of GELU outputs (the
    pool happens inside the loads, and linear_2 does 4x fewer FLOPs). The result is a channels-last map for the
    depthwise 3x3 conv (cuDNN) and its residual add; the final flatten is then a free view.
    """

    _fastvlm_base = LDPv2Projector

    def _fastvlm_structure(self):
        plan = _mlp_plan(self.mlp, "mlp")
        if isinstance(plan, str):
            return None, [plan]
        if plan[3] is None:
            return None, ["mlp has a single Linear (LDPv2 has Linear-GELU-Linear)"]
        return plan, []

    def forward(self, x):
        plan, reasons = self._fastvlm_structure()
        reasons = reasons + _autocast_reasons(x) + _hook_reasons(self, ("mlp", "mlp.0", "mlp.2", "pool", "peg"))
        side = k = None
        if not reasons:
            if x.dim() != 3:
                reasons.append(f"input {tuple(x.shape)} is not [B, tokens, C]")
            else:
                side = grid_of(x.shape[1])
                if side % self.out_side:
                    reasons.append(f"adaptive pooling {side}x{side} -> {self.out_side}x{self.out_side} has uneven "
                                   f"windows (no fused pool)")
                k = side // self.out_side
        if reasons:
            _dispatch.report_fallback("FusedLDPv2Projector", reasons, f"x{tuple(x.shape)}")
            return LDPv2Projector.forward(self, x)
        w1, b1, act, w2, b2 = plan
        B, L, C = x.shape
        if B == 0:  # MobileVLM's reshape(B, -1, side, side) rejects an empty batch: the original's own error
            return LDPv2Projector.forward(self, x)
        g = mlp_projector(x.reshape(B * L, C), w1, b1, act=act)
        o = self.out_side
        if k > 1:
            y = mlp_projector(g, w2, b2, act="none", rows=pool_rows(B, side, side, k, x.device), a_mode="mean")
        else:
            y = mlp_projector(g, w2, b2, act="none")
        m = y.view(B, o, o, y.shape[-1]).permute(0, 3, 1, 2)  # channels-last map, no copy
        return self.peg(m).flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------------ lookup


FUSED_REFERENCE_CLASSES = {CAbstractor: FusedCAbstractor, LDPv2Projector: FusedLDPv2Projector}


def from_module(module):
    """The fast module for a reference ``CAbstractor`` / ``LDPv2Projector`` (shares its parameters), or None."""
    cls = FUSED_REFERENCE_CLASSES.get(type(module))
    return None if cls is None else cls.from_module(module)
