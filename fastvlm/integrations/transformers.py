"""Accelerate an existing transformers model in one call.

Instance level: ``fastvlm.patch(model)`` walks ``model.named_modules()`` and swaps each module that a recipe
recognises (the recipes of fastvlm.nn.REGISTRY, matched by exact class and defining module) for its ``Fused<Original>`` built with
``from_module`` (same child modules, same tensors: nothing is copied and state_dict keys are unchanged).
``fastvlm.unpatch(model)`` puts the original module objects back.

Class level: ``fastvlm.apply_to_transformers()`` replaces each recognised class *in the one transformers module that
defines it* by its fused subclass, so every later construction route (``from_pretrained``, ``from_config``, calling
the class) builds fused modules; ``fastvlm.revert_transformers()`` puts the saved class objects back. transformers'
``register_patch_mapping`` is not used: it matches class *names* across every transformers module (a generic name
such as Qwen2-VL's ``PatchMerger`` could hit another model's class of that name) and covers only the
``from_pretrained``/``from_config`` routes, while the module attribute covers all three.

Nothing in torch.nn or torch.nn.functional is modified, and no transformers forward is copied.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastvlm._table import text_table
from fastvlm.integrations import handoff
from fastvlm.integrations import structure as _structure
from fastvlm.integrations import verify as _verify_mod
from fastvlm.nn import all_recipes, is_fused, recipe_for
from fastvlm.nn.distributed import zero3_reason
from fastvlm.nn.glm import FusedMergeConv2d, merge_conv_paths
from fastvlm.nn.linear import FusedLinear

# bare nn.Linear connectors, by (owner class name, attribute): BLIP-2's projection into the LLM, Fuyu's patch
# projection (pre-patchified pixels into the decoder), Mllama's projection of the vision features
LINEAR_SLOTS = {
    ("Blip2ForConditionalGeneration", "language_projection"),
    ("InstructBlipForConditionalGeneration", "language_projection"),
    ("InstructBlipVideoForConditionalGeneration", "language_projection"),
    ("FuyuModel", "vision_embed_tokens"),
    ("MllamaModel", "multi_modal_projector"),
}

# recognised connector / embedding classes whose kernels do not exist yet: reported, never swapped
NOT_YET = {
}

_ORIGINALS = "_fastvlm_originals"


@dataclass
class PatchEntry:
    path: str
    original: str
    fused: str
    status: str  # "patched" | "already fused" | "not swapped" | "skipped"
    detail: str = ""


@dataclass
class PatchReport:
    """What ``fastvlm.patch`` did to each recognised module. ``print(report)`` gives a table."""

    model: str
    entries: list[PatchEntry] = field(default_factory=list)

    @property
    def patched(self):
        return [e for e in self.entries if e.status == "patched"]

    @property
    def not_swapped(self):
        return [e for e in self.entries if e.status == "not swapped"]

    def counts(self):
        out = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out

    def __str__(self):
        if not self.entries:
            return f"fastvlm.patch({self.model}): no recognised connector or embedding module"
        rows = [("module", "original", "fastvlm", "status", "detail")]
        rows += [(e.path or "<root>", e.original, e.fused or "-", e.status, e.detail or "-") for e in self.entries]
        summary = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        return f"fastvlm.patch({self.model}): {summary}\n" + text_table(rows)

    __repr__ = __str__


def _set_submodule(root, path, module):
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def probe_args(recipe, fused):
    """Random forward arguments shaped as the family's caller passes them, on the module's device and dtype, every
    size read off the module (fastvlm/integrations/verify.py); raises ``ProbeUnavailable`` saying why not."""
    return _verify_mod.build_probe(recipe, fused)


def _selected(ops, recipe=None, name=None):
    if ops is None:
        return True
    keys = {name} if name else {recipe.family, recipe.cls, recipe.fused_name}
    return bool(keys & set(ops))


def patch(model: nn.Module, *, ops=None, verify: bool = False, still_images: bool = False,
          structure: bool = True) -> PatchReport:
    """Swap every supported connector module of ``model`` for its fused equivalent, in place.

    ``ops``: restrict to these families / class names (e.g. ``{"llava"}`` or ``{"PatchMerger"}``; ``"FusedLinear"``
    selects BLIP-2's language_projection; ``"structure"`` the modules recognised by structure). ``verify``: run
    original and fused module on a random probe built from the module's own sizes and record the relative error
    against the fastvlm tolerance for the module's dtype; a fused module that raises or mismatches on the probe is not
    swapped, and a module no probe can be built for is reported "not verified: why". ``structure``: modules that no
    class recipe names are recognised by what they compute (fastvlm/integrations/structure.py), each confirmed on a
    probe before the swap. ``still_images`` (Qwen-VL): inside ``get_image_features`` the patch embedding reads one of
    the frames the image processor repeated, against the time-summed kernel (half the FLOPs; equal up to one
    rounding of the summed kernel). Only for image rows made by the processor (which repeats every image's frame);
    videos go through ``get_video_features`` and keep the full kernel. Returns a ``PatchReport``.

    Atomic: if anything inside raises, every swap, pairing and hand-off made by this call is undone before the
    exception propagates.

    ``model`` is the container whose modules are swapped; it cannot swap itself (``patch`` works in place and
    returns a report, and no caller's reference to ``model`` could be updated). Given a recognised module itself,
    a bare ``LlavaMultiModalProjector`` say, it raises ValueError pointing at ``fastvlm.nn.from_module(module)``,
    which returns the fused replacement (sharing the module's parameters), and changes nothing.
    """
    found = recipe_for(model)
    if found is not None and not is_fused(model) and _selected(ops, found[0]):
        raise ValueError(
            f"fastvlm.patch swaps the recognised modules inside a model in place, and cannot replace the module it is "
            f"given: a {type(model).__name__}. Use fastvlm.nn.from_module(module), which returns its fused "
            f"replacement ({found[1](found[0]).__name__}, sharing its parameters), or patch the model that holds it")
    report = PatchReport(type(model).__name__)
    txn = _Transaction(model)
    try:
        _patch_into(model, report, ops, verify, still_images, structure)
    except BaseException:
        txn.rollback()
        raise
    return report


def _patch_into(model, report, ops, verify, still_images, structure):
    originals = model.__dict__.setdefault(_ORIGINALS, {})
    owners = {name: type(mod).__name__ for name, mod in model.named_modules()}
    eligible = _structure.eligible_paths(model) if structure else set()
    merge_convs = set(merge_conv_paths(model))  # GLM vision models' downsample (fastvlm/nn/glm.py)
    swapped = []  # paths replaced in this walk: their old descendants are not visited
    for name, mod in list(model.named_modules()):
        if any(name.startswith(p + ".") for p in swapped):
            continue
        if is_fused(mod):
            base = ("Linear" if isinstance(mod, FusedLinear) else "Conv2d" if isinstance(mod, FusedMergeConv2d)
                    else type(mod)._fastvlm_base.__name__)
            report.entries.append(PatchEntry(name, base, type(mod).__name__, "already fused"))
            continue
        found = recipe_for(mod)
        parent, _, attr = name.rpartition(".")
        if found is not None:
            recipe, factory = found
            cls = factory(recipe)
            if not _selected(ops, recipe):
                report.entries.append(PatchEntry(name, recipe.cls, cls.__name__, "skipped", "not in ops"))
                continue
            zero3 = zero3_reason(mod)
            if zero3:  # before building anything: the fused module would read empty placeholders
                report.entries.append(PatchEntry(name, recipe.cls, cls.__name__, "not swapped", zero3))
                continue
            fused = cls.from_module(mod)
            reasons = fused._fastvlm_structure()
            reasons = reasons[1] if isinstance(reasons, tuple) else reasons  # projectors also return their plan
            if reasons:
                report.entries.append(PatchEntry(name, recipe.cls, cls.__name__, "not swapped", "; ".join(reasons)))
                continue
            status, detail = _swap(model, originals, name, mod, fused, verify, recipe)
            report.entries.append(PatchEntry(name, recipe.cls, cls.__name__, status, detail))
            swapped.append(name)
        elif type(mod) is nn.Linear and (owners.get(parent), attr) in LINEAR_SLOTS:
            if not _selected(ops, name="FusedLinear"):
                report.entries.append(PatchEntry(name, "Linear", "FusedLinear", "skipped", "not in ops"))
                continue
            if zero3_reason(mod):
                report.entries.append(PatchEntry(name, "Linear", "FusedLinear", "not swapped", zero3_reason(mod)))
                continue
            fused = FusedLinear.from_module(mod)
            probe = None
            if verify:
                probe = (torch.randn(2, 5, mod.in_features, device=mod.weight.device, dtype=mod.weight.dtype),)
            status, detail = _swap(model, originals, name, mod, fused, verify, None, probe)
            report.entries.append(PatchEntry(name, "Linear", "FusedLinear", status, detail))
        elif name in merge_convs:
            if not (_selected(ops, name="FusedMergeConv2d") or _selected(ops, name="glm4v")):
                report.entries.append(PatchEntry(name, "Conv2d", "FusedMergeConv2d", "skipped", "not in ops"))
                continue
            fused = FusedMergeConv2d.from_module(mod)
            probe = fused._fastvlm_probe_args() if verify else None
            status, detail = _swap(model, originals, name, mod, fused, verify, None, probe)
            report.entries.append(PatchEntry(name, "Conv2d", "FusedMergeConv2d", status, detail))
        elif type(mod).__name__ in NOT_YET:
            report.entries.append(PatchEntry(name, type(mod).__name__, "", "not swapped", NOT_YET[type(mod).__name__]))
        elif name in eligible:
            match = _structure.recognise(mod)
            if match is None:
                continue
            if not _selected(ops, match.recipe, name="structure") and not _selected(ops, match.recipe):
                report.entries.append(PatchEntry(name, type(mod).__name__, type(match.fused).__name__, "skipped",
                                                 "not in ops"))
                continue
            if not match.ok:  # recognised, but the candidate did not reproduce the module on the probe
                report.entries.append(PatchEntry(name, type(mod).__name__, type(match.fused).__name__,
                                                 "not swapped", match.detail))
                continue
            _set_submodule(model, name, match.fused)
            originals[name] = mod
            swapped.append(name)
            report.entries.append(PatchEntry(name, type(mod).__name__, type(match.fused).__name__, "patched",
                                             match.detail))
    # pre-norms (CLIP pre_layrnorm, timm norm_pre) and timm's _pos_embed fused into the patch embedding
    from fastvlm.nn.embed_pairing import pair_embeddings

    selected = lambda fam: _selected(ops, name=fam)  # noqa: E731
    inner = _Transaction(model)
    try:
        rows = pair_embeddings(model, originals, verify=verify, selected=selected)
    except Exception as exc:  # a pairing's probe failed: pair without verifying, and say so
        if not verify:
            raise
        inner.rollback()
        why = f"not verified: {_verify_mod._describe(exc)}"
        rows = [(*r[:4], f"{r[4]}; {why}" if r[3] == "patched" else r[4])
                for r in pair_embeddings(model, originals, verify=False, selected=selected)]
    for row in rows:
        report.entries.append(PatchEntry(*row))
    if still_images:
        from fastvlm.nn.embed_pairing import enable_still_images

        for row in enable_still_images(model):
            report.entries.append(PatchEntry(*row))
    # the image rows written straight into inputs_embeds (fastvlm/integrations/handoff.py), where that is exact
    for path, cls, status, detail in handoff.install(model, selected=lambda fam: _selected(ops, name=fam)):
        report.entries.append(PatchEntry(path, cls, "hand-off" if status != "not swapped" else "", status, detail))


def _swap(model, originals, name, original, fused, verify, recipe, probe=None):
    """(status, detail): swap ``fused`` in for ``original`` unless ``verify`` shows it raising or mismatching."""
    detail = ""
    if verify:
        ok, detail = _verify_mod.verify(original, fused, recipe, probe)
        if ok is False:
            return "not swapped", detail + " (the original is kept)"
    _set_submodule(model, name, fused)
    originals[name] = original
    return "patched", detail


class _Transaction:
    """What ``patch`` may change on ``model``, recorded before it starts, so that a failure undoes all of it: the
    swapped modules (``originals``), the pairing and still-image instance attributes (the undo list) and the hand-off
    forwards."""

    def __init__(self, model):
        from fastvlm.nn.embed_pairing import _UNDO

        self.model, self.undo_key = model, _UNDO
        self.had_originals = _ORIGINALS in model.__dict__
        self.originals = dict(model.__dict__.get(_ORIGINALS, {}))
        self.had_undo = _UNDO in model.__dict__
        self.undo_len = len(model.__dict__.get(_UNDO, ()))
        self.handoffs = {id(m) for m in model.modules() if handoff.is_installed(m)}

    def rollback(self):
        model, d = self.model, self.model.__dict__
        undo = d.get(self.undo_key, [])
        for obj, name, had, prev in reversed(undo[self.undo_len:]):
            if had:
                obj.__dict__[name] = prev
            else:
                obj.__dict__.pop(name, None)
        del undo[self.undo_len:]
        if not self.had_undo:
            d.pop(self.undo_key, None)
        for m in model.modules():
            if handoff.is_installed(m) and id(m) not in self.handoffs:
                m.__dict__.pop(handoff._MARK, None)
                m.__dict__.pop(handoff._KWARGS, None)
                m.__dict__.pop("forward", None)
        originals = d.get(_ORIGINALS, {})
        for name in reversed([n for n in originals if n not in self.originals or originals[n] is not self.originals[n]]):
            _set_submodule(model, name, originals.pop(name))
        originals.update(self.originals)
        if not self.had_originals:
            d.pop(_ORIGINALS, None)


def unpatch(model: nn.Module) -> int:
    """Put back the original module objects that ``patch`` replaced and remove its hand-off forwards; returns how
    many were restored (modules, hand-offs and still-image wrappers: one per "patched" report row)."""
    from fastvlm.nn.embed_pairing import unpair_embeddings

    n_still = unpair_embeddings(model)
    n_handoff = handoff.remove(model)
    originals = model.__dict__.pop(_ORIGINALS, {})
    for name, original in originals.items():
        _set_submodule(model, name, original)
    return len(originals) + n_handoff + n_still


# ------------------------------------------------------------------------------------------------ class level

_SAVED_CLASSES: dict = {}


def apply_to_transformers(ops=None) -> list[str]:
    """Make transformers build fused connector modules by every route; returns the replaced class names.

    BLIP-2's ``language_projection`` is a bare ``nn.Linear`` created through ``torch.nn``; it is left to the
    instance-level ``patch`` rather than touching torch.nn.
    """
    replaced = []
    for recipe, factory in all_recipes():
        if not _selected(ops, recipe):
            continue
        if not recipe.module.startswith("transformers."):
            continue  # class-level patching is for transformers; timm modules are patched per instance
        try:
            module = importlib.import_module(recipe.module)
        except ImportError:
            continue
        key = (recipe.module, recipe.cls)
        if key in _SAVED_CLASSES:
            replaced.append(recipe.cls)
            continue
        original = getattr(module, recipe.cls, None)
        if original is None:
            continue
        fused = factory(recipe)
        _SAVED_CLASSES[key] = original
        setattr(module, recipe.cls, fused)
        replaced.append(recipe.cls)
    return replaced


def revert_transformers() -> list[str]:
    """Restore every class object saved by ``apply_to_transformers``; returns the restored class names."""
    restored = []
    for (module_name, cls_name), original in list(_SAVED_CLASSES.items()):
        setattr(importlib.import_module(module_name), cls_name, original)
        restored.append(cls_name)
        del _SAVED_CLASSES[(module_name, cls_name)]
    return restored
