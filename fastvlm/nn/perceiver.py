"""Drop-in fused Perceiver resampler and connector of Idefics2: ``FusedIdefics2PerceiverResampler`` and
``FusedIdefics2Connector``, subclasses of transformers' ``Idefics2PerceiverResampler`` / ``Idefics2Connector`` with the
same constructor, state_dict and forward.

The resampler runs ``fastvlm.ops.perceiver.perceiver_resampler``: every RMSNorm except the final one is applied as
its consumer GEMM loads its input, the latent keys/values are a separate GEMM whose output the attention kernel reads
as a second key source (no concat), the attention is grouped-query without repeat_kv, o_proj and down_proj add the
residual in their epilogue, and the SwiGLU MLP is one gated-pair GEMM + one GEMM. The connector runs its SwiGLU
modality projection as ``fastvlm.ops.projector.mlp_projector`` (the same computation as ``FusedIdefics2MLP``), then
the fused resampler.

When the fused path cannot reproduce the module (dropout active in training, a child replaced by a non-Linear or a
LoRA wrapper, biases, hooks on a child, autocast, mixed dtypes, an attention mask that is not [batch, patches]) it
says why (a ``FastVLMFallbackWarning`` once, or an error under FASTVLM_STRICT=1) and runs the original forward.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn import _plan
from fastvlm.nn._base import _FusedBase
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.perceiver import perceiver_resampler
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name
from fastvlm._cache import once


@dataclass(frozen=True)
class PerceiverRecipe:
    family: str
    module: str
    cls: str
    fused_name: str
    role: str  # "resampler" | "connector"


_M = "transformers.models.idefics2.modeling_idefics2"
PERCEIVER_RECIPES = (
    PerceiverRecipe("idefics2", _M, "Idefics2PerceiverResampler", "FusedIdefics2PerceiverResampler", "resampler"),
    PerceiverRecipe("idefics2", _M, "Idefics2Connector", "FusedIdefics2Connector", "connector"),
)
_RMSNORMS = ("Idefics2RMSNorm",)  # weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype): the GEMM's "rmsnorm"


def _linear_reasons(name, lin, reasons):
    if type(lin) is not nn.Linear:
        reasons.append(f"{name} is {type(lin).__name__}, not torch.nn.Linear")
    elif lin.bias is not None:
        reasons.append(f"{name} has a bias (Idefics2's perceiver has none; the fused path omits it)")


def _mlp_reasons(name, mlp, reasons):
    for part in ("gate_proj", "up_proj", "down_proj"):
        _linear_reasons(f"{name}.{part}", getattr(mlp, part, None), reasons)
    act = activation_name(getattr(mlp, "act_fn", None)) if hasattr(mlp, "act_fn") else None
    if act is None:
        reasons.append(f"{name}.act_fn {type(getattr(mlp, 'act_fn', None)).__name__} has no fused kernel")
    return act


def _norm_reasons(name, norm, reasons):
    if type(norm).__name__ not in _RMSNORMS or getattr(norm, "weight", None) is None:
        reasons.append(f"{name} is {type(norm).__name__}, not Idefics2RMSNorm")


def resampler_structure(res):
    """(plan, reasons) of a ``Idefics2PerceiverResampler`` from its structure alone."""
    reasons = []
    layers = []
    eps = None
    for i, layer in enumerate(res.layers):
        p = f"layers.{i}"
        attn = layer.self_attn
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _linear_reasons(f"{p}.self_attn.{part}", getattr(attn, part), reasons)
        for part in ("input_latents_norm", "input_context_norm", "post_attention_layernorm"):
            _norm_reasons(f"{p}.{part}", getattr(layer, part), reasons)
        act = _mlp_reasons(f"{p}.mlp", layer.mlp, reasons)
        if res.training and getattr(attn, "attention_dropout", 0.0):
            reasons.append(f"attention dropout {attn.attention_dropout} is active (training mode)")
        if getattr(attn, "is_causal", False):
            reasons.append(f"{p}.self_attn is causal")
        if reasons:
            continue
        eps = layer.input_latents_norm.variance_epsilon
        if any(getattr(layer, n).variance_epsilon != eps for n in ("input_context_norm", "post_attention_layernorm")):
            reasons.append(f"{p}: the three RMSNorms have different eps")
            continue
        layers.append(dict(latents_norm=layer.input_latents_norm.weight, context_norm=layer.input_context_norm.weight,
                           q=attn.q_proj.weight, k=attn.k_proj.weight, v=attn.v_proj.weight, o=attn.o_proj.weight,
                           post_norm=layer.post_attention_layernorm.weight, gate=layer.mlp.gate_proj.weight,
                           up=layer.mlp.up_proj.weight, down=layer.mlp.down_proj.weight, act=act, eps=eps,
                           shape=(attn.num_heads, attn.num_key_value_heads, attn.head_dim, attn.scaling)))
    _norm_reasons("norm", res.norm, reasons)
    if reasons:
        return None, reasons
    final_eps = res.norm.variance_epsilon
    eps_set = {ly["eps"] for ly in layers} | {final_eps}
    shapes = {ly["shape"] for ly in layers}
    acts = {ly["act"] for ly in layers}
    if len(eps_set) > 1 or len(shapes) > 1 or len(acts) > 1:
        return None, ["layers differ in eps, head shape or activation"]
    if layers:
        heads, kv_heads, head_dim, scaling = layers[0]["shape"]
        if abs(scaling - head_dim ** -0.5) > 1e-12 * scaling:
            return None, [f"attention scaling {scaling} is not head_dim ** -0.5"]
    else:
        heads = kv_heads = head_dim = 1
    plan = dict(layers=layers, norm_weight=res.norm.weight, eps=final_eps, heads=heads, kv_heads=kv_heads,
                head_dim=head_dim, act=(acts.pop() if acts else "silu"))
    return plan, []


def _plan_params(plan, res):
    """The parameters the fused path reads (the latents and every layer's weights)."""
    out = [res.latents, plan["norm_weight"]]
    for ly in plan["layers"]:
        out += [v for v in ly.values() if isinstance(v, torch.Tensor)]
    return out


def _call_reasons(root, x, params):
    reasons = []
    if autocast_on(x.device):
        reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
    bad = {p.dtype for p in params if p.dtype != x.dtype}
    if bad:
        reasons.append(f"input is {x.dtype} but parameters are {sorted(str(d) for d in bad)}")
    return reasons


def _mask_plan(mask, context):
    """The [B, P] keep-flags the kernel reads, or a reason string."""
    B, P = context.shape[:2]
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, P):
        return f"attention_mask of shape {getattr(mask, 'shape', None)} is not a [batch, patches] = [{B}, {P}] mask"
    return mask if mask.dtype == torch.bool else mask != 0


def _resampler_plan(res, holder, prefix=""):
    """(plan, reasons, named modules) of ``res``, kept in ``holder`` (the fused module calling it) until a link in
    the resampler's tree or a module's training flag changes (fastvlm.nn._plan)."""
    def build(fp):
        named = fp.subtree(res)
        for layer in res.layers:  # the settings the plan reads
            for part in ("input_latents_norm", "input_context_norm", "post_attention_layernorm"):
                fp.attr(getattr(layer, part), "variance_epsilon", None)
            for attr in ("num_heads", "num_key_value_heads", "head_dim", "scaling", "is_causal", "attention_dropout"):
                fp.attr(layer.self_attn, attr, None)
        fp.attr(res.norm, "variance_epsilon", None)
        plan, reasons = resampler_structure(res)
        return plan, reasons, tuple((prefix + n if n else n, m) for n, m in named)

    attr = _plan.PLAN_ATTR if holder is res else _plan.PLAN_ATTR + "_resampler"
    return _plan.cached_plan(holder, build, attr)


def fused_resampler_forward(res, context, attention_mask, base_forward, name, prefix="", holder=None, **kwargs):
    """The fused forward of ``res`` (an Idefics2PerceiverResampler, fused or not), or ``base_forward`` with the
    reasons reported. ``holder``: the fused module that keeps the resampler's plan (``res`` itself by default)."""
    plan, reasons, named = _resampler_plan(res, holder if holder is not None else res, prefix)
    reasons = list(reasons) + _plan.hooked(named)
    mask = None
    if not reasons:
        reasons += _call_reasons(res, context, _plan_params(plan, res))
        mask = _mask_plan(attention_mask, context)
        if isinstance(mask, str):
            reasons.append(mask)
    if reasons:
        _dispatch.report_fallback(name, reasons, lambda: f"context{tuple(context.shape)}")
        return base_forward(res, context=context, attention_mask=attention_mask, **kwargs)
    return perceiver_resampler(context, mask, res.latents, plan["layers"], plan["norm_weight"], eps=plan["eps"],
                               heads=plan["heads"], kv_heads=plan["kv_heads"], head_dim=plan["head_dim"],
                               act=plan["act"])


class _FusedResamplerMixin(_FusedBase):
    _fastvlm_recipe: PerceiverRecipe

    def _fastvlm_structure(self):
        return resampler_structure(self)[1]

    def forward(self, context, attention_mask, **kwargs):
        return fused_resampler_forward(self, context, attention_mask, self._fastvlm_base.forward,
                                       self._fastvlm_recipe.fused_name, **kwargs)


class _FusedConnectorMixin(_FusedBase):
    _fastvlm_recipe: PerceiverRecipe

    def _fastvlm_structure(self):
        reasons = []
        _mlp_reasons("modality_projection", self.modality_projection, reasons)
        return reasons + [f"perceiver_resampler: {r}" for r in resampler_structure(self.perceiver_resampler)[1]]

    def _project(self, x):
        mlp = self.modality_projection
        act = activation_name(mlp.act_fn)
        return mlp_projector(x, mlp.gate_proj.weight, None, mlp.down_proj.weight, None, act=act,
                             w_up=mlp.up_proj.weight)

    def _fastvlm_connector_plan(self):
        """(reasons, the projection's (gate, up, down) weights and activation, named modules), kept until the
        connector's tree changes (fastvlm.nn._plan)."""
        def build(fp):
            named = fp.subtree(self)
            mlp = self.modality_projection
            fp.attr(getattr(mlp, "act_fn", None), "approximate", None)
            reasons = []
            _mlp_reasons("modality_projection", mlp, reasons)
            weights = None if reasons else (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                            activation_name(mlp.act_fn))
            return reasons, weights, named

        return _plan.cached_plan(self, build)

    def forward(self, image_hidden_states, attention_mask):
        name = self._fastvlm_recipe.fused_name
        # the resampler's own structure is checked by fused_resampler_forward (its fallback is the resampler's
        # original forward); hooks anywhere below the connector are checked here, since the fused path calls
        # neither child module
        reasons, weights, named = self._fastvlm_connector_plan()
        reasons = list(reasons) + _plan.hooked(named)
        if not reasons:
            reasons = _call_reasons(self, image_hidden_states, weights[:3])
        if reasons:
            _dispatch.report_fallback(name, reasons, lambda: f"x{tuple(image_hidden_states.shape)}")
            return self._fastvlm_base.forward(self, image_hidden_states, attention_mask)
        gate, up, down, act = weights
        ctx = mlp_projector(image_hidden_states, gate, None, down, None, act=act, w_up=up)
        return fused_resampler_forward(self.perceiver_resampler, ctx, attention_mask, self._fastvlm_resampler_base.forward,
                                       name, prefix="perceiver_resampler.", holder=self)


_MIXINS = {"resampler": _FusedResamplerMixin, "connector": _FusedConnectorMixin}


@once
def fused_perceiver_class(recipe: PerceiverRecipe):
    """Build (once) the ``Fused<Original>`` class of a recipe. Raises ImportError when the original is absent."""
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    base = getattr(base, "_fastvlm_base", base)
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; runs fastvlm.ops.perceiver.")
    attrs = {"_fastvlm_recipe": recipe, "_fastvlm_base": base, "__doc__": doc, "__module__": "fastvlm.nn"}
    if recipe.role == "connector":  # the resampler's original forward (the fallback), resolved once, not per call
        res = importlib.import_module(recipe.module).Idefics2PerceiverResampler
        attrs["_fastvlm_resampler_base"] = getattr(res, "_fastvlm_base", res)  # even under apply_to_transformers()
    return type(recipe.fused_name, (_MIXINS[recipe.role], base), attrs)
