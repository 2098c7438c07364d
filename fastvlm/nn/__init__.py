"""Drop-in fused modules.

``fastvlm.nn.from_module(module)`` returns the fused equivalent of a supported module, sharing its parameters.
``fastvlm.nn.Fused<Original>`` (e.g. ``FusedLlavaMultiModalProjector``) are subclasses of the transformers classes,
built on first access; ``fastvlm.nn.FusedLinear`` replaces a bare ``torch.nn.Linear``.
"""
import torch.nn as nn

from .patch_embed import EMBED_RECIPES, EmbedRecipe, embed_recipe_for, fused_embed_class
from .projector import RECIPES, FusedLinear, InternVLShuffleProjector, ProjectorRecipe, fused_class, recipe_for

__all__ = ["from_module", "FusedLinear", "InternVLShuffleProjector", "RECIPES", "EMBED_RECIPES", "ProjectorRecipe", "EmbedRecipe", "fused_class",
           "fused_embed_class", "recipe_for", "embed_recipe_for", "fused_class_for", "supported"]


def fused_class_for(module_or_class):
    """The ``Fused<Original>`` class for a module or class, or None when no recipe matches."""
    recipe = recipe_for(module_or_class)
    if recipe is not None:
        return fused_class(recipe)
    recipe = embed_recipe_for(module_or_class)
    return fused_embed_class(recipe) if recipe is not None else None


def from_module(module):
    """The fused equivalent of ``module``, sharing its parameters (no copy); raises TypeError naming why not."""
    if type(module) is nn.Linear:
        return FusedLinear.from_module(module)
    cls = fused_class_for(module)
    if cls is None:
        known = ", ".join(sorted({r.cls for r in RECIPES + EMBED_RECIPES} | {"torch.nn.Linear"}))
        raise TypeError(f"fastvlm.nn.from_module: no fused equivalent for {type(module).__module__}."
                        f"{type(module).__qualname__}; supported classes: {known}")
    return cls.from_module(module)


def supported():
    """{original module.class: fused class name} for every recipe whose original class can be imported."""
    out = {}
    for r, make in [(r, fused_class) for r in RECIPES] + [(r, fused_embed_class) for r in EMBED_RECIPES]:
        try:
            make(r)
        except (ImportError, AttributeError):
            continue
        out[f"{r.module}.{r.cls}"] = r.fused_name
    return out


def __getattr__(name):
    for r in RECIPES:
        if r.fused_name == name:
            return fused_class(r)
    for r in EMBED_RECIPES:
        if r.fused_name == name:
            return fused_embed_class(r)
    raise AttributeError(f"module 'fastvlm.nn' has no attribute {name!r}")
