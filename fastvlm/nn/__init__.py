"""Drop-in fused modules.

``fastvlm.nn.from_module(module)`` returns the fused equivalent of a supported module, sharing its parameters.
``fastvlm.nn.Fused<Original>`` (e.g. ``FusedLlavaMultiModalProjector``) are subclasses of the transformers classes,
built on first access; ``fastvlm.nn.FusedLinear`` replaces a bare ``torch.nn.Linear``.
"""
import torch.nn as nn

from .projector import RECIPES, FusedLinear, ProjectorRecipe, fused_class, recipe_for

__all__ = ["from_module", "FusedLinear", "RECIPES", "ProjectorRecipe", "fused_class", "recipe_for", "supported"]


def from_module(module):
    """The fused equivalent of ``module``, sharing its parameters (no copy); raises TypeError naming why not."""
    if type(module) is nn.Linear:
        return FusedLinear.from_module(module)
    recipe = recipe_for(module)
    if recipe is None:
        known = ", ".join(sorted({r.cls for r in RECIPES} | {"torch.nn.Linear"}))
        raise TypeError(f"fastvlm.nn.from_module: no fused equivalent for {type(module).__module__}."
                        f"{type(module).__qualname__}; supported classes: {known}")
    return fused_class(recipe).from_module(module)


def supported():
    """{original class name: fused class name} for every recipe whose transformers class can be imported."""
    out = {}
    for r in RECIPES:
        try:
            fused_class(r)
        except (ImportError, AttributeError):
            continue
        out[r.cls] = r.fused_name
    return out


def __getattr__(name):
    for r in RECIPES:
        if r.fused_name == name:
            return fused_class(r)
    raise AttributeError(f"module 'fastvlm.nn' has no attribute {name!r}")
