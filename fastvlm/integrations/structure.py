"""Recognition by structure: modules that no class recipe names, recognised by what they compute.

Class recipes (fastvlm/nn/*.py) match exact classes: the fast path. transformers' modular converter copies a class
into every family that reuses it (``Qwen2_5OmniPatchMerger`` is Qwen2.5-VL's merger under another name), and new
families write the same few connectors again (``VideoLlama3Projector``, ``DeepseekVLAligner``: Linear-GELU-Linear).
``recognise(module)`` reads a module's parameters and leaf modules, proposes the fused computations they allow and
keeps the first one that reproduces the module's own forward on random probes:

* copies: a class whose code is a recipe class's code under other names (``behaviour.copy_of``: transformers'
  modular converter makes one per family that reuses a class) runs that recipe, as its own ``Fused<Class>``.
* MLP connectors: leaves that are Linear, one known activation and at most one norm, the module owning no tensor of
  its own: Linear, Linear-act-Linear (either order of definition), gate/up/down SwiGLU-style pairs, with the norm
  before the first Linear, or over each patch of a Qwen-style merged row (width = norm width x s^2), or after the
  merge's view; the result's shape tells a per-token MLP from a merged one.
* patch embeddings: a Conv3d with stride == kernel and no padding over pre-patchified rows (Qwen-VL "rows"); a
  Conv2d with stride == kernel and no padding, with an optional class token and a position table (CLIP / SigLIP /
  BLIP-2 style), confirmed at the size it was built for, at a smaller size (does the original take it? then the table
  is sliced, else it must be whole) and, where the forward takes ``interpolate_pos_encoding``, at a larger size with
  it.
* norms and activations by behaviour, not name (fastvlm/integrations/behaviour.py): an RMSNorm-like class is
  compared with the kernel's RMSNorm in fp32 and, bit for bit, in bf16; an unknown activation class with each fused
  activation.

A candidate is confirmed only when the fused module's own kernel path ran (no fallback to the original forward) and
matched within fastvlm's tolerance. ``fastvlm.patch`` reports such a swap as "matched by structure" with the class
found. ``eligible_paths(model)`` keeps recognition out of transformer blocks (a module with an attention child, or
the inside of an element of a stack of repeated layers), where Linear-act-Linear is the block's own MLP.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.integrations import verify as _verify
from fastvlm.integrations.behaviour import act_kind, copy_of, norm_kind
from fastvlm.nn.patch_embed import _FusedEmbedMixin
from fastvlm.nn.patch_embed_recipes import EmbedRecipe
from fastvlm.nn.projector import _FusedProjectorMixin
from fastvlm.nn.projector_recipes import ProjectorRecipe
from fastvlm._cache import once

_QKV = {"q_proj", "k_proj", "v_proj", "q", "k", "v", "query", "key", "value", "wq", "wk", "wv", "to_q", "to_k",
        "to_v", "q_lin", "k_lin", "v_lin"}
_QKV_FUSED = {"qkv", "qkv_proj", "in_proj", "c_attn", "Wqkv", "query_key_value", "qkv_linear"}


@dataclass
class Match:
    fused: nn.Module
    recipe: object
    what: str
    ok: bool  # confirmed on the probes: swap it
    detail: str  # the report's text


# ------------------------------------------------------------------------------------------------ where to look

def _attention_like(m):
    if isinstance(m, nn.MultiheadAttention):
        return True
    names = {n for n, c in m.named_children() if isinstance(c, nn.Linear)}
    return bool(names & _QKV_FUSED) or len(names & _QKV) >= 2


_ATTN_NAMES = ("attn", "attention", "mixer", "token_mixer")


def _block_like(m):
    """A transformer block: a child with q/k/v projections, or a (non-container) child named as attention."""
    return any(_attention_like(c) or (any(w in n.lower() for w in _ATTN_NAMES)
                                      and not isinstance(c, (nn.ModuleList, nn.ModuleDict, nn.Sequential)))
               for n, c in m.named_children())


def eligible_paths(model):
    """Paths of the modules outside every transformer block (a module with an attention child, or an element of a
    ModuleList / Sequential of two or more modules of one class that have children of their own: its MLP is the
    block's own; the element itself stays eligible, as Qwen3-VL's deepstack mergers). The language model is not
    excluded as a whole: in decoder-only families (GIT, Fuyu) it holds the image encoder; its own modules outside
    the blocks (embeddings, final norm, head) match no structure."""
    roots, inside = [], []
    for name, m in model.named_modules():
        if _block_like(m):
            roots.append(name)
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1:
            kinds = {type(c) for c in m}
            if len(kinds) == 1 and all(len(c._modules) > 0 for c in m):
                inside += [f"{name}.{i}" if name else str(i) for i in range(len(m))]
    out = set()
    for name, _ in model.named_modules():
        if (name and not any(name == r or name.startswith(r + ".") for r in roots)
                and not any(name.startswith(r + ".") for r in inside)):
            out.add(name)
    return out


# ------------------------------------------------------------------------------------------- fused classes

def _single_input_forward(param, signature):
    def forward(self, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            return self._fastvlm_forward(args[0])
        if not args and list(kwargs) == [param]:
            return self._fastvlm_forward(kwargs[param])
        return self._fastvlm_base.forward(self, *args, **kwargs)

    forward.__signature__ = signature
    return forward


def _pixels_forward(signature):
    def forward(self, pixel_values, interpolate_pos_encoding=False):
        return self._fastvlm_forward(pixel_values, interpolate_pos_encoding)

    forward.__signature__ = signature
    return forward


class _StructuralMixin:
    """Dropout leaves that would act in training send the call to the original forward (the kernels have none)."""

    _DROPOUT = "dropout is active (module in training mode with p > 0)"

    def _fastvlm_dropout_active(self):
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())

    def _fastvlm_structure(self):
        out = super()._fastvlm_structure()
        if not self._fastvlm_dropout_active():
            return out
        return (None, list(out[1]) + [self._DROPOUT]) if isinstance(out, tuple) else list(out) + [self._DROPOUT]

    def _fastvlm_plan(self, x):  # the projectors' per-call entry (their structure plan is cached)
        plan, reasons = super()._fastvlm_plan(x)
        if not self._fastvlm_dropout_active():
            return plan, reasons
        return None, list(reasons) + [self._DROPOUT]


@once
def fused_structural_class(base, recipe):
    """``Fused<base>``: a subclass of the recognised class running ``recipe``'s fused computation."""
    sig = inspect.signature(base.forward)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    attrs = {"_fastvlm_recipe": recipe, "_fastvlm_base": base, "__module__": "fastvlm.nn",
             "__doc__": f"Fused {base.__name__}, recognised by structure ({recipe.family})."}
    if isinstance(recipe, EmbedRecipe):
        mixin = _FusedEmbedMixin
        attrs["forward"] = (_single_input_forward(params[0].name, sig) if recipe.kind == "rows"
                            else _pixels_forward(sig))
    else:
        mixin = _FusedProjectorMixin
        attrs["forward"] = _single_input_forward(params[0].name, sig)
        first = recipe.linear_1
        attrs["_fastvlm_struct_width"] = property(lambda self: self.get_submodule(first).in_features)
    return type(recipe.fused_name, (_StructuralMixin, mixin, base), attrs)


# ---------------------------------------------------------------------------------------------- candidates

def _mlp_candidates(mod):
    """(recipe, description) candidates for an MLP-like module, most specific first; [] when it is not one."""
    if mod._parameters or mod._buffers:
        return []
    lin, norms, acts, others = [], [], [], []
    for path, m in mod.named_modules():
        if not path or m._modules:
            continue
        if type(m) in (nn.Identity, nn.Dropout):
            continue
        if type(m) is nn.Linear:
            lin.append(path)
        elif norm_kind(m) is not None:
            norms.append(path)
        elif act_kind(m) is not None:
            acts.append(path)
        else:
            others.append(path)
    if others or len(norms) > 1 or len(acts) > 1 or not lin:
        return []
    get = mod.get_submodule
    norm = norms[0] if norms else None
    act = acts[0] if acts else None
    name = type(mod).__name__
    cands = []

    def add(l1, l2=None, up=None, act2=None):
        layers = "Linear" if l2 is None else f"Linear-{type(get(act)).__name__}-Linear"
        if up:
            layers = f"gated {type(get(act)).__name__} pair-Linear"
        if act2:
            layers += f"-{type(get(act)).__name__}"
        a_in = get(l1).in_features
        base = dict(family="structure", module=type(mod).__module__, cls=name, fused_name=f"Fused{name}",
                    input_name="", linear_1=l1, linear_2=l2, act=act if l2 else None, up=up, act2=act2)
        if norm is None:
            cands.append((ProjectorRecipe(**base), layers))
            cands.append((ProjectorRecipe(**base, merged_width="_fastvlm_struct_width"), layers + " on merged rows"))
            return
        nw = _verify._width_of_norm(get(norm))
        nk = type(get(norm)).__name__
        if nw == a_in:
            cands.append((ProjectorRecipe(**base, norm=norm), f"{nk} + {layers}"))
            cands.append((ProjectorRecipe(**base, norm=norm, merged_width="_fastvlm_struct_width"),
                          f"merge, {nk} + {layers}"))
        elif nw and a_in % nw == 0 and math.isqrt(a_in // nw) ** 2 == a_in // nw:
            s = math.isqrt(a_in // nw)
            cands.append((ProjectorRecipe(**base, norm=norm, merged_width="_fastvlm_struct_width"),
                          f"{nk} per patch, {s}x{s} merge, {layers}"))

    if len(lin) == 1 and act is None:
        add(lin[0])
    elif len(lin) == 2 and act is not None:
        for a, b in ((lin[0], lin[1]), (lin[1], lin[0])):
            if get(a).out_features == get(b).in_features:
                add(a, b)
                add(a, b, act2=act)
    elif len(lin) == 3 and act is not None and norm is None:
        for g, u, d in ((0, 1, 2), (1, 0, 2), (0, 2, 1), (2, 0, 1), (1, 2, 0), (2, 1, 0)):
            g, u, d = lin[g], lin[u], lin[d]
            if (get(g).in_features == get(u).in_features and get(g).out_features == get(u).out_features
                    == get(d).in_features):
                add(g, d, up=u)
    return cands


def _conv_children(mod, cls):
    return [(p, m) for p, m in mod.named_children() if type(m) is cls]


def _patch_conv_ok(conv):
    pad = conv.padding
    no_pad = pad == "valid" or (isinstance(pad, tuple) and not any(pad))
    return (conv.stride == conv.kernel_size and no_pad and conv.groups == 1
            and all(d == 1 for d in conv.dilation) and conv.padding_mode == "zeros")


def _embed_candidates(mod):
    name = type(mod).__name__
    base = dict(module=type(mod).__module__, cls=name, fused_name=f"Fused{name}")
    params = [p for p in inspect.signature(type(mod).forward).parameters.values() if p.name != "self"]
    conv3 = _conv_children(mod, nn.Conv3d)
    leaves = [m for p, m in mod.named_modules() if p]
    if len(conv3) == 1 and len(leaves) == 1 and _patch_conv_ok(conv3[0][1]) and not mod._parameters:
        return [(EmbedRecipe(family="structure", kind="rows", conv=conv3[0][0], **base),
                 "Conv3d patch embedding of pre-patchified rows")]
    conv2 = _conv_children(mod, nn.Conv2d)
    if (len(conv2) != 1 or not _patch_conv_ok(conv2[0][1])
            or [p.name for p in params] != ["pixel_values", "interpolate_pos_encoding"]):
        return []
    conv_name, conv = conv2[0]
    D = conv.out_channels
    tables = [n for n, m in mod.named_children() if type(m) is nn.Embedding and m.embedding_dim == D]
    tables += [n for n, p in mod._parameters.items() if p is not None and p.dim() == 3 and p.shape[-1] == D
               and p.shape[0] == 1 and p.shape[1] > 1]
    tokens = [n for n, p in mod._parameters.items() if p is not None and p.numel() == D]
    if set(mod._parameters) - set(tables) - set(tokens):
        return []  # a tensor of its own that the candidate would not use
    extra = set(dict(mod.named_children())) - {conv_name, *tables}
    if len(tables) > 1 or len(tokens) > 1 or any(type(mod.get_submodule(e)) is not nn.Dropout for e in extra):
        return []
    cands = []
    pos = tables[0] if tables else None
    for cls_token in (tokens[0] if tokens else None,):
        for family, kind in (("blip_2", "position table sliced to the grid"), ("clip", "whole position table")):
            what = "Conv2d patch embedding" + (" + class token" if cls_token else "") + (f" + {kind}" if pos else "")
            cands.append((EmbedRecipe(family=family, kind="conv_pos", conv=conv_name, cls_token=cls_token, pos=pos,
                                      **base), what))
            if pos is None:
                break
    return cands


# ------------------------------------------------------------------------------------------------ confirming

def _confirm(original, fused, probe):
    """(ok, detail): the fused module's kernel path ran on ``probe`` and matched the original."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", _dispatch.FastVLMFallbackWarning)
        with _dispatch.trace() as t:
            ok, detail = _verify.compare(original, fused, probe)
    if ok and (any(r.op == type(fused).__name__ for r in t.records) or not any("::" in r.op for r in t.records)):
        return False, "the fused module took the original's path on the probe"
    return ok, detail


def _embed_probes(recipe, fused):
    """The native-size probe, then a size one patch smaller (taken by a sliced table, rejected by a whole one), then
    a larger one with interpolate_pos_encoding=True."""
    first = _verify.build_probe(recipe, fused)
    yield first, None
    if recipe.kind != "conv_pos" or recipe.pos is None:
        return
    x = first[0]
    p = fused.get_submodule(recipe.conv).kernel_size[0]
    H, W = x.shape[-2:]
    if W > p:  # one patch column fewer (a grid of g x (g - 1) never broadcasts against g x g rows)
        yield (x[..., :W - p].contiguous(),), "smaller"
    yield (torch.randn(*x.shape[:2], H + p, W + 2 * p, device=x.device, dtype=x.dtype), True), "interpolate"


def _copy_candidate(mod):
    """The recipe of the class ``type(mod)`` copies, pointed at ``type(mod)``, with its factory; or None."""
    found = copy_of(type(mod))
    if found is None:
        return None
    recipe, factory = found
    name = type(mod).__name__
    recipe = dataclasses.replace(recipe, module=type(mod).__module__, cls=name, fused_name=f"Fused{name}")
    for attr in ("norm", "act", "act2"):  # children whose class fastvlm knows by behaviour only
        path = getattr(recipe, attr, None)
        child = getattr(mod.get_submodule(path.rpartition(".")[0]) if "." in path else mod,
                        path.rpartition(".")[2], None) if path else None
        if isinstance(child, nn.Module):
            (norm_kind if attr == "norm" else act_kind)(child)
    return recipe, factory


def _try(mod, recipe, what, factory=None):
    cls = factory(recipe) if factory is not None else fused_structural_class(type(mod), recipe)
    fused = cls.from_module(mod)
    reasons = fused._fastvlm_structure()
    reasons = reasons[1] if isinstance(reasons, tuple) else reasons
    label = f"matched by structure: {type(mod).__name__} as {what}"
    if reasons:
        return Match(fused, recipe, what, False, f"{label}; not swapped: " + "; ".join(reasons))
    if any(p.device.type == "meta" for p in mod.parameters()):
        return Match(fused, recipe, what, False, f"{label}; not swapped: not confirmed (parameters on the meta device)")
    detail = None
    for probe, stage in (_embed_probes(recipe, fused) if isinstance(recipe, EmbedRecipe)
                         else [(_verify.build_probe(recipe, fused), None)]):
        if stage == "smaller":  # a sliced table (BLIP-2) must take it and match; a whole one (CLIP) defers to the
            if recipe.family != "blip_2":  # original on every size but its own, whatever the original does there
                continue
        ok, d = _confirm(mod, fused, probe)
        if ok is None and stage == "interpolate":
            continue  # the original does not interpolate this table: nothing to compare
        if not ok:
            return None
        detail = detail or d
    return Match(fused, recipe, what, True, f"{label}; {detail}")


def recognise(mod) -> Optional[Match]:
    """The first fused candidate confirmed for ``mod`` (``Match.ok``), a recognised structure that cannot be swapped
    (``Match.ok`` False, with why), or None."""
    cls = type(mod)
    if cls.__module__.startswith(("torch.", "fastvlm.")) or mod._forward_hooks or mod._forward_pre_hooks:
        return None
    try:
        params = [p for p in inspect.signature(cls.forward).parameters.values() if p.name != "self"]
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    found = _copy_candidate(mod)
    if found is not None:
        recipe, factory = found
        try:
            match = _try(mod, recipe, f"a copy of {found[0].family}'s {copy_of(cls)[0].cls}", factory)
        except Exception:
            match = None
        if match is not None and match.ok:
            return match
    cands = _embed_candidates(mod)
    if not cands and len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                             params[0].POSITIONAL_OR_KEYWORD):
        cands = _mlp_candidates(mod)
    unswappable = None
    for recipe, what in cands:
        try:
            match = _try(mod, recipe, what)
        except Exception:
            continue  # this candidate does not fit the module: try the next
        if match is not None and match.ok:
            return match
        if match is not None and unswappable is None:
            unswappable = match
    return unswappable


def plausible(mod):
    """A cheap look at types and shapes only (meta parameters are fine): could ``recognise`` match this module?"""
    cls = type(mod)
    if cls.__module__.startswith(("torch.", "fastvlm.")):
        return False
    if copy_of(cls) is not None:
        return True
    leaves = [m for p, m in mod.named_modules() if p and not m._modules]
    convs = [c for c in mod.children() if type(c) in (nn.Conv2d, nn.Conv3d) and _patch_conv_ok(c)]
    if len(convs) == 1:
        return len(leaves) <= 3
    if mod._parameters or mod._buffers or not leaves:
        return False
    n_lin = 0
    for m in leaves:
        if type(m) is nn.Linear:
            n_lin += 1
        elif list(m.parameters()) and not (set(dict(m.named_parameters())) <= {"weight", "bias"}
                                           and m.weight is not None and m.weight.dim() == 1):
            return False
    return 1 <= n_lin <= 3
