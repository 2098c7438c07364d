"""Drop-in fused modules.

``fastvlm.nn.from_module(module)`` returns the fused equivalent of a supported module, sharing its parameters.
``fastvlm.nn.Fused<Original>`` (e.g. ``FusedLlavaMultiModalProjector``) are subclasses of the original classes,
built on first access; ``fastvlm.nn.FusedLinear`` replaces a bare ``torch.nn.Linear``.

Each kind of module has its recipes (data) and a class factory; ``REGISTRY`` lists them and every lookup
(``fused_class_for``, ``from_module``, ``supported``, ``fastvlm.patch``) goes through it.
"""
import torch.nn as nn

from .patch_embed import EMBED_RECIPES, EmbedRecipe, fused_embed_class
from .pair_pixtral import FusedPixtralPatchConv
from .pair_qwen3 import FusedPairedPositionEmbedding
from .perceiver import PERCEIVER_RECIPES, PerceiverRecipe, fused_perceiver_class
from .pool import POOL_RECIPES, LlavaNextVideoPoolProjector, PoolRecipe, fused_pool_class
from .qformer import QFORMER_RECIPES, QFormerRecipe, fused_qformer_class
from ._base import _FusedBase
from .linear import FusedLinear, InternVLShuffleProjector
from .projector import fused_class
from .projector_recipes import RECIPES, ProjectorRecipe
from .feature_map import FEATURE_MAP_RECIPES, fused_feature_map_class
from . import feature_map as _feature_map

# FEATURE_MAP_RECIPES first: fast_vlm's projector gets the class that reads the tower's map view in place
REGISTRY = ((FEATURE_MAP_RECIPES, fused_feature_map_class), (RECIPES, fused_class), (EMBED_RECIPES, fused_embed_class),
            (POOL_RECIPES, fused_pool_class), (QFORMER_RECIPES, fused_qformer_class),
            (PERCEIVER_RECIPES, fused_perceiver_class))

__all__ = ["from_module", "FusedLinear", "FusedPairedPositionEmbedding", "FusedPixtralPatchConv", "InternVLShuffleProjector", "LlavaNextVideoPoolProjector", "REGISTRY", "RECIPES", "EMBED_RECIPES",
           "POOL_RECIPES", "QFORMER_RECIPES", "PERCEIVER_RECIPES", "PerceiverRecipe", "ProjectorRecipe", "QFormerRecipe", "EmbedRecipe", "PoolRecipe", "recipe_for", "fused_class_for",
           "is_fused", "supported"]


def all_recipes():
    """(recipe, class factory) for every recipe of every kind."""
    for recipes, factory in REGISTRY:
        for r in recipes:
            yield r, factory


def recipe_for(module_or_class):
    """(recipe, factory) whose original class is exactly ``type(module)`` (name and defining module), or None."""
    cls = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for r, factory in all_recipes():
        if cls.__name__ == r.cls and cls.__module__ == r.module:
            return r, factory
    return None


def fused_class_for(module_or_class):
    """The ``Fused<Original>`` class for a module or class, or None when no recipe matches."""
    found = recipe_for(module_or_class)
    return found[1](found[0]) if found else None


def is_fused(module):
    return isinstance(module, (_FusedBase, FusedLinear))


def from_module(module):
    """The fused equivalent of ``module``, sharing its parameters (no copy); raises TypeError naming why not."""
    if type(module) is nn.Linear:
        return FusedLinear.from_module(module)
    cls = fused_class_for(module)
    if cls is None and type(module) in _feature_map.FUSED_REFERENCE_CLASSES:  # fastvlm.reference.feature_map modules
        return _feature_map.from_module(module)
    if cls is None:
        known = ", ".join(sorted({r.cls for r, _ in all_recipes()} | {"torch.nn.Linear"}))
        raise TypeError(f"fastvlm.nn.from_module: no fused equivalent for {type(module).__module__}."
                        f"{type(module).__qualname__}; supported classes: {known}")
    return cls.from_module(module)


def supported():
    """{original module.class: fused class name} for every recipe whose original class can be imported."""
    out = {}
    for r, factory in all_recipes():
        try:
            factory(r)
        except (ImportError, AttributeError):
            continue
        out[f"{r.module}.{r.cls}"] = r.fused_name
    return out


def __getattr__(name):
    for r, factory in all_recipes():
        if r.fused_name == name:
            return factory(r)
    from .pair_prenorm import PAIRED_NORMS, paired_norm_class  # pre-norms paired with a fused patch embedding

    if name in PAIRED_NORMS:
        return paired_norm_class(name)
    if name == "FusedPairedPixtralRMSNorm":  # Pixtral's ln_pre paired with its fused patch conv
        from transformers.models.pixtral.modeling_pixtral import PixtralRMSNorm

        from .pair_pixtral import _paired_rms_class

        return _paired_rms_class(PixtralRMSNorm)
    raise AttributeError(f"module 'fastvlm.nn' has no attribute {name!r}")
