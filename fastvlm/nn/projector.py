"""Drop-in fused MLP projectors for the transformers connector classes.

Each family is one row of ``RECIPES`` (data, not code): where the original class lives, the attribute paths of its
norm / linear_1 / activation / linear_2, the name of its forward argument, and how its 2x2 merge is expressed. From a
recipe, ``fused_class`` builds ``Fused<Original>``, a subclass of the original class:

* same constructor (inherited), same parameters and state_dict keys (the children are the original nn.Linear /
  norm modules), ``isinstance(fused, Original)`` holds, so transformers' init and output hooks still apply;
* ``forward`` has the original's signature and return type and runs ``fastvlm.ops.mlp_projector``;
* when the fused path cannot reproduce the module (a LoRA-wrapped linear, an activation or norm without a kernel,
  hooks on a child, autocast), it says why (warning once, or an error under FASTVLM_STRICT=1) and runs the original
  class's forward unchanged.

``Fused<Original>.from_module(original)`` and ``fastvlm.nn.from_module(original)`` build the fused module around the
original's own children and parameters: nothing is copied, and both modules see later updates.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.nn import _plan, distributed
from fastvlm.nn._base import _child_reasons, _DeferToOriginal, _FusedBase, _run_original
from fastvlm.nn.linear import FusedLinear
from fastvlm.nn.projector_recipes import ProjectorRecipe
from fastvlm.ops._checks import autocast_on
from fastvlm.ops.layout import pool_rows, ragged_space_to_depth_rows, space_to_depth_rows
from fastvlm.ops import _fast
from fastvlm.ops.projector import mlp_projector
from fastvlm.reference.activations import activation_name
from fastvlm._cache import once


# RMSNorm classes whose math is exactly ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` (checked in the
# transformers 5.x source); others (Gemma's 1 + w, torch.nn.RMSNorm's cast points) take the original path.
_RMSNORM_CLASSES = ("Qwen2_5_VLRMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm", "Mistral3RMSNorm", "Qwen3VLTextRMSNorm")
# RMSNorm classes computing ``(x * rsqrt(mean(x^2) + eps) * (1 + w)).type_as(x)`` entirely in fp32 (Gemma 3)
_RMSNORM_1P_CLASSES = ("Gemma3RMSNorm",)


def _norm_plan(mod, fp=None):
    """(kind, weight, bias, eps) of a supported norm module, or a reason string. With a fingerprint ``fp``
    (fastvlm.nn._plan) the parameters and eps are read through it."""
    fp = fp or _plan.Fingerprint()
    if type(mod) is nn.LayerNorm:
        if len(fp.attr(mod, "normalized_shape")) != 1:
            return f"LayerNorm over {mod.normalized_shape} (only the last dimension is fused)"
        weight = fp.param(mod, "weight")
        if weight is None:
            return "LayerNorm without elementwise_affine has no fused kernel"
        return "layernorm", weight, fp.param(mod, "bias"), fp.attr(mod, "eps")
    name = type(mod).__name__
    if name in _RMSNORM_CLASSES:
        eps = fp.attr(mod, "variance_epsilon", None)
        eps = fp.attr(mod, "eps", None) if eps is None else eps
        weight = fp.param(mod, "weight") if "weight" in mod._parameters else fp.attr(mod, "weight", None)
        if eps is None or weight is None:
            return f"{name} lacks weight/eps attributes"
        return "rmsnorm", weight, None, float(eps)
    if name in _RMSNORM_1P_CLASSES:
        return "rmsnorm_1p", fp.param(mod, "weight"), None, float(fp.attr(mod, "eps"))
    kind = NORMS_BY_BEHAVIOUR.get(type(mod))  # (kind, eps attribute), confirmed on a probe
    if kind is not None:
        weight = fp.param(mod, "weight") if "weight" in mod._parameters else fp.attr(mod, "weight", None)
        if isinstance(weight, torch.Tensor):
            return kind[0], weight, None, float(fp.attr(mod, kind[1]))
    return f"norm {name} has no fused kernel"


# RMSNorm classes whose behaviour (math and cast points) was compared with the kernel's on a probe, by
# fastvlm/integrations/structure.py: {class: (kind, eps attribute)}
NORMS_BY_BEHAVIOUR: dict = {}


def _optional_child(module, path):
    """The child at ``path``, or None where the original keeps None there (LFM2-VL's ``layer_norm`` when off)."""
    owner, _, attr = path.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, attr, None)


class _FusedProjectorMixin(_FusedBase):
    """The fused forward shared by every ``Fused<Original>`` projector class."""

    _fastvlm_recipe: ProjectorRecipe
    _fastvlm_base: type

    def _fastvlm_linears(self, fp=None):
        r = self._fastvlm_recipe
        fp = fp or _plan.Fingerprint()
        names = [n for n in (r.merger, r.linear_1 or None, r.up, r.linear_2) if n]
        return [(n, fp.child(self, n)) for n in names]

    def _fastvlm_structure(self):
        """(plan, reasons) from the module's structure alone: child types, activations, norm, dropout. Read once and
        kept until a child, parameter or setting it was read from changes (fastvlm.nn._plan); the plan is shared
        between calls: never modify it."""
        return _plan.cached_plan(self, self._fastvlm_read_structure)[:2]

    def _fastvlm_read_structure(self, fp):
        """(plan, reasons, children whose hooks every call checks), read through the fingerprint ``fp``."""
        r = self._fastvlm_recipe
        hooked = tuple((name, fp.child(self, name, optional=True))
                       for name in (r.merger, r.linear_1, r.up, r.linear_2, r.norm) if name)
        reasons = []
        for name, lin in self._fastvlm_linears(fp):
            if type(lin) is not nn.Linear and not isinstance(lin, FusedLinear):
                reasons.append(f"{name} is {type(lin).__name__}, not torch.nn.Linear")
        plan = {}
        for key, path in (("act", r.act), ("act2", r.act2)):
            plan[key] = "none"
            if path:
                act_mod = fp.child(self, path)
                fp.attr(act_mod, "approximate", None), fp.attr(act_mod, "inplace", None)
                plan[key] = activation_name(act_mod)
                if plan[key] is None:
                    reasons.append(f"activation {type(act_mod).__name__} has no fused kernel")
        norm_mod = fp.child(self, r.norm, optional=True) if r.norm else None
        if norm_mod is not None:
            np_ = _norm_plan(norm_mod, fp)
            if isinstance(np_, str):
                reasons.append(np_)
            else:
                kind, w, b, eps = np_
                plan.update(norm=kind, norm_weight=w, norm_bias=b, eps=eps, norm_group=w.shape[0])
        if self.training and any(isinstance(fp.attr(m, "dropout", 0), float) and m.dropout
                                 for m in (self, *self.children())):
            reasons.append("dropout is active (module in training mode with p > 0)")
        zero3 = distributed.zero3_reason(self)
        if zero3:
            reasons.append(zero3)
        if reasons:
            return None, reasons, hooked
        if r.weight_in_out:  # a Parameter [in, out]: transposed per call (a view, never kept)
            plan.update(w1_in_out=fp.param(self, r.weight_in_out), b1=None)
        else:
            lin1 = fp.child(self, r.linear_1)
            plan.update(w1=fp.param(lin1, "weight"), b1=fp.param(lin1, "bias"))
        lin2 = fp.child(self, r.linear_2) if r.linear_2 else None
        plan.update(w2=fp.param(lin2, "weight") if lin2 is not None else None,
                    b2=fp.param(lin2, "bias") if lin2 is not None else None)
        if r.up:
            up = fp.child(self, r.up)
            plan.update(w_up=fp.param(up, "weight"), b_up=fp.param(up, "bias"))
        return self._fastvlm_distributed(plan, fp, hooked)

    def _fastvlm_distributed(self, plan, fp, hooked):
        """(plan, reasons, hooked) with a recognised tensor-parallel plan (``_tp``) or the reasons why not; DTensor
        parameters outside one are a per-call reason (``_dtensor``: FSDP2 shards them between forwards and hands
        the forward plain tensors)."""
        r = self._fastvlm_recipe
        lin1 = fp.child(self, r.linear_1) if r.linear_1 else None
        lin2 = fp.child(self, r.linear_2) if r.linear_2 else None
        others = {k: plan.get(k) for k in ("norm_weight", "norm_bias", "w_up", "b_up", "w1_in_out")}
        if r.merger:
            merging = fp.child(self, r.merger)
            others.update({f"{r.merger}.weight": merging.weight, f"{r.merger}.bias": merging.bias})
        if lin1 is None:
            tp, reasons = None, []
        else:
            tp, reasons = distributed.read(r, lin1, lin2, others)
        if reasons:
            return None, reasons, hooked
        plan["_tp"] = tp
        if tp is None:
            named = {"linear_1.weight": plan.get("w1"), "linear_1.bias": plan.get("b1"), "linear_2.weight": plan["w2"],
                     "linear_2.bias": plan["b2"], **others}
            plan["_dtensor"] = tuple(f"{n} is a DTensor outside a recognised ColwiseParallel/RowwiseParallel plan "
                                     f"(the fused op computes on plain tensors)"
                                     for n, t in named.items() if distributed.is_dtensor(t))
        return plan, [], hooked

    def _fastvlm_plan(self, x):
        """The structure's plan plus the per-call conditions (hooks on children, autocast). The plan is shared:
        read it, never modify it."""
        plan, reasons, hooked = _plan.cached_plan(self, self._fastvlm_read_structure)
        tp = plan.get("_tp") if plan is not None else None
        reasons = list(reasons) + [f"{name} has forward hooks, which the fused path would not call"
                                   for name, mod in hooked if mod is not None and _child_reasons(name, mod)
                                   and not (tp is not None and distributed.plan_hooks(tp, mod))]
        if plan is not None and plan.get("_dtensor"):
            reasons += plan["_dtensor"]
        if autocast_on(x.device):
            reasons.append("autocast is enabled (the original forward reproduces autocast's casts)")
        return (None, reasons) if reasons else (plan, [])

    def _fastvlm_repeat(self, x, extra=()):
        """(result, None) of a repeat call that the plan's chain launches directly (fastvlm.ops._fast), else
        (None, whether the usual path should build the chain again)."""
        held = self.__dict__.get(_plan.PLAN_ATTR)
        if held is None or held[0] != self.training or extra or held[2][0] is None:
            return None, True
        chain = held[2][0].get("_chain")
        if chain is None or not held[1].valid() or any(
                m is not None and (m._forward_hooks or m._forward_pre_hooks) for _, m in held[2][2]):
            return None, True
        y = chain.run(x, chain.params)
        if y is _fast.STALE or y is _fast.PASS:
            return None, y is _fast.STALE
        return y, None

    def _fastvlm_scale(self, fp=None):
        fp = fp or _plan.Fingerprint()
        owner, _, attr = self._fastvlm_recipe.scale.rpartition(".")
        v = fp.attr(fp.child(self, owner), attr)
        return int(round(1 / v)) if v < 1 else int(v)

    def _fastvlm_layout(self, x, extra):
        """(x2d, rows, output shape or None, reasons) for the recipe's merge."""
        r = self._fastvlm_recipe
        if r.merged_width:  # the free 2x2 merge of Qwen-VL: rows of `width` = consecutive patches
            return self._fastvlm_merged_rows(x, getattr(self, r.merged_width)), None, None, []
        if r.merge is None:
            return x, None, None, []
        if r.merge == "unfold":  # Mistral 3: ragged images, channel-major merge windows
            s = self._fastvlm_scale()
            patch = self.patch_merger.patch_size
            if extra is None or extra.device.type == "meta":  # no values to read the image sizes from
                raise _DeferToOriginal("image_sizes has no values (meta tensor)")
            sizes = [(int(h) // patch, int(w) // patch) for h, w in extra.tolist()]
            if any(h % s or w % s for h, w in sizes) or sum(h * w for h, w in sizes) != x.shape[0]:
                return None, None, None, [f"image_sizes {sizes} do not tile the {x.shape[0]} tokens in {s}x{s} windows"]
            return x, ragged_space_to_depth_rows(sizes, s, x.device), None, []
        if r.grid_input:
            s = self._fastvlm_scale()
            if x.dim() != 4 or x.shape[1] % s or x.shape[2] % s:
                return None, None, None, [f"input of shape {tuple(x.shape)} is not a [batch, h, w, features] grid "
                                          f"divisible by the scale {s}"]
            B, gh, gw, D = x.shape
            return x.reshape(B * gh * gw, D), space_to_depth_rows(B, gh, gw, s, x.device), (B, gh // s, gw // s), []
        if x.dim() != 3:
            return None, None, None, [f"input of shape {tuple(x.shape)} is not [batch, tokens, features]"]
        B, P, D = x.shape
        if r.merge == "avg_pool":  # Gemma 3
            side, k = self.patches_per_image, self.kernel_size
            if P != side * side or side % k:
                return None, None, None, [f"{P} tokens are not a {side}x{side} grid poolable by {k}"]
            rows = pool_rows(B, side, side, k, x.device)
            out_tokens = (side // k) ** 2
        else:  # pixel shuffle on a square grid (Idefics3, SmolVLM, Llama 4)
            s = self._fastvlm_scale()
            side = math.isqrt(P)
            if side * side != P or side % s:
                return None, None, None, [f"{P} tokens are not a square grid divisible by the scale {s}"]
            rows = space_to_depth_rows(B, side, side, s, x.device)
            if r.grid_output:
                return x.reshape(B * P, D), rows, (B, side // s, side // s), []
            out_tokens = (side // s) ** 2
        return x.reshape(B * P, D), rows, (B, out_tokens), []  # from the grid, not rows.shape[0] // B: B may be 0

    def _fastvlm_merged_rows(self, x, width):
        """Qwen-VL's ``norm(x).view(-1, width)`` (norm before the merge) or ``norm(x.view(-1, width))`` (after it) as
        the view the fused path reads. Input the original would reject, or treat its own way (a norm broadcasting a
        width-1 input), goes to the original forward unchanged (``_DeferToOriginal``)."""
        norm = _optional_child(self, self._fastvlm_recipe.norm) if self._fastvlm_recipe.norm else None
        group = getattr(norm, "weight", None)
        group = width if group is None else group.shape[0]
        if group != width and (x.dim() == 0 or x.shape[-1] != group):
            raise _DeferToOriginal(f"x of shape {tuple(x.shape)} does not end in the norm's width {group}")
        if x.numel() % width:
            raise _DeferToOriginal(f"x of shape {tuple(x.shape)} is not whole rows of the merged width {width}")
        if group != width:
            return x.reshape(-1, width)  # the original's norm output is contiguous: its view always succeeds
        try:
            return x.view(-1, width)  # the original views x itself: a layout it cannot view, it rejects
        except RuntimeError as exc:
            raise _DeferToOriginal(f"x of shape {tuple(x.shape)} cannot be viewed as rows of width {width}") from exc

    def _fastvlm_forward(self, x, *extra):
        r = self._fastvlm_recipe
        y, rebuild = self._fastvlm_repeat(x, extra)
        if y is not None:
            return y
        plan, reasons = self._fastvlm_plan(x)
        x2 = rows = shape = None
        if not reasons and x.numel() == 0:  # no data: the original decides (some accept 0 images, some reject them)
            return _run_original(self, "empty input: the original forward runs (no data to compute)", x, *extra,
                                 quiet=True)
        if not reasons:
            try:
                x2, rows, shape, reasons = self._fastvlm_layout(x, extra[0] if extra else None)
            except _DeferToOriginal as why:
                return _run_original(self, str(why), x, *extra)
        if reasons:
            _dispatch.report_fallback(r.fused_name, reasons, f"x{tuple(x.shape)}")
            return self._fastvlm_base.forward(self, x, *extra)
        call = plan.get("_call")
        if call is None:  # the call's arguments, derived once per plan (the plan is shared: only this key is added)
            call = plan["_call"] = _call_args(plan, r)
        w1, b1, w2, b2, kw, merger_norm = call
        if r.weight_in_out:  # a Parameter [in, out]: its transposed view, taken per call
            w1 = w1.t()
        mode = _A_MODES.get(r.merge, "strided")
        if r.merger:  # merge (+ norm before it) -> merging linear, then the MLP on the merged rows
            merging = self.get_submodule(r.merger)
            x2 = mlp_projector(x2, merging.weight, merging.bias, act="none", rows=rows, a_mode=mode, norm_src=True,
                               **merger_norm)
            rows, mode = None, "strided"
        if rows is not None and shape is not None:  # the grid's leading dimensions, shaped by the op
            kw = dict(kw, out_lead=shape)
        tp = plan.get("_tp")
        if tp is not None:  # the local shards of a Colwise -> Rowwise plan, reduced by the plan's own collective
            y = distributed.forward(tp, mlp_projector, x2, w1, b1, w2, b2, rows=rows, a_mode=mode, **kw)
        elif rebuild and _chain_layout(r, plan, x, rows) and _fast.wanted(x, call[:4] + (kw.get("w_up"),
                                                                                          kw.get("b_up"))):
            norm = plan.get("norm")
            params = ((w1, b1) if w2 is None else (w1, b1, w2, b2)) + ((kw["w_up"], kw["b_up"]) if r.up else ()) \
                + ((kw["norm_weight"], kw["norm_bias"]) if norm else ())
            memo = {}
            y = mlp_projector(x2, w1, b1, w2, b2, rows=rows, a_mode=mode, _memo_out=memo, **kw)
            plan["_chain"] = _fast.plain_chain(x, y, params, memo.get("memo"), memo.get("token"), rows=rows,
                                               up=bool(r.up), norm=None if not norm else norm != "layernorm")
        else:
            y = mlp_projector(x2, w1, b1, w2, b2, rows=rows, a_mode=mode, gated=r.gated, **kw)
        return y


_A_MODES = {"pixel_shuffle": "concat", "unfold": "concat_cm", "avg_pool": "mean"}


def _chain_layout(r, plan, x, rows):
    """Whether the fused call is plain linear(s) on x's rows, a norm of them first, or on a pixel shuffle of them,
    which a repeat call may launch directly (the op says whether it launched them as planned)."""
    return ((rows is None or r.merge == "pixel_shuffle" and "norm" not in plan) and not r.merger
            and not r.merged_width and not r.gated and not r.weight_in_out and not plan.get("_dtensor")
            and x.dim() >= 2)
_NORM_KEYS = ("norm", "norm_weight", "norm_bias", "eps", "norm_group")


def _call_args(plan, r):
    """(w1 or the [in, out] weight, b1, w2, b2, mlp_projector keywords, the merger's norm keywords) of a plan."""
    kw = {k: v for k, v in plan.items() if k not in ("w1", "w1_in_out", "b1", "w2", "b2") and not k.startswith("_")}
    merger_norm = {}
    if r.merger:  # the norm runs before the merge, in the merging linear's call
        merger_norm = {k: kw.pop(k) for k in _NORM_KEYS}
    w1 = plan["w1_in_out"] if r.weight_in_out else plan["w1"]
    return w1, plan["b1"], plan["w2"], plan["b2"], kw, merger_norm


# one forward per argument name, so that the fused forward's signature is the original's
def _fwd_image_features(self, image_features):
    return self._fastvlm_forward(image_features)


def _fwd_hidden_states(self, hidden_states):
    return self._fastvlm_forward(hidden_states)


def _fwd_x(self, x: torch.Tensor) -> torch.Tensor:
    return self._fastvlm_forward(x)


def _fwd_image_hidden_states(self, image_hidden_states):
    return self._fastvlm_forward(image_hidden_states)


def _fwd_encoded_patches(self, encoded_patches: torch.Tensor) -> torch.Tensor:
    return self._fastvlm_forward(encoded_patches)


def _fwd_vision_outputs(self, vision_outputs: torch.Tensor):
    return self._fastvlm_forward(vision_outputs)


def _fwd_image_features_sizes(self, image_features: torch.Tensor, image_sizes: torch.Tensor):
    return self._fastvlm_forward(image_features, image_sizes)


_FORWARDS = {"image_features": _fwd_image_features, "hidden_states": _fwd_hidden_states, "x": _fwd_x,
             "image_hidden_states": _fwd_image_hidden_states, "encoded_patches": _fwd_encoded_patches,
             "vision_outputs": _fwd_vision_outputs, ("image_features", "image_sizes"): _fwd_image_features_sizes}


@once
def fused_class(recipe: ProjectorRecipe):
    """Build (once) the ``Fused<Original>`` class of a recipe. Raises ImportError when the original is absent."""
    base = getattr(importlib.import_module(recipe.module), recipe.cls)
    forward = _FORWARDS[(recipe.input_name, recipe.extra_input) if recipe.extra_input else recipe.input_name]
    doc = (f"Drop-in fused replacement for transformers' ``{recipe.cls}`` ({recipe.family}): same constructor, "
           f"state_dict and forward; runs fastvlm.ops.mlp_projector.")
    cls = type(recipe.fused_name, (_FusedProjectorMixin, base),
               {"forward": forward, "_fastvlm_recipe": recipe, "_fastvlm_base": base, "__doc__": doc,
                "__module__": "fastvlm.nn"})
    return cls
