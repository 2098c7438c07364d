"""The connector-to-LLM hand-off inside patched models: image features written straight into ``inputs_embeds``.

transformers' multimodal models embed the text, run ``get_image_features``, check the image-token count in
``get_placeholder_mask`` and ``masked_scatter`` the rows in, then call the language model with ``inputs_embeds``.
``install(model)`` gives each supported inner model (``LlavaModel`` and friends) an instance-level ``forward`` that
does the image branch itself with ``fastvlm.ops.scatter.scatter_image_features`` (one pass over the image rows,
the same count check and error) and then calls the class's own forward with ``inputs_embeds`` and no pixels, so the
language-model part is the original code path. The output's ``image_outputs`` is set to what
``get_image_features`` returned, as the original does.

Where it is exact: the family's forward uses ``input_ids`` only to embed the text and to find the image tokens, and
calls ``get_image_features`` in a way each ``HandoffRecipe`` below describes as data (positional and keyword
arguments, defaults taken from the config, ``return_dict``, whether the per-image outputs are concatenated). The
call falls through to the original forward (reported by ``fastvlm.trace()``, never silently wrong) when the inputs
are outside that: no ``input_ids`` or pixels, ``inputs_embeds`` or ``mm_encoder_outputs`` given, videos, a tuple
output. Families whose forward also reads ``input_ids`` elsewhere (Qwen2-VL's rope index, Gemma 3 and
PaliGemma's token-type masks, Idefics' own merger) are listed in ``NOT_EXACT`` and keep their forward.

The wrapper is an instance attribute: nothing in transformers' classes changes, ``remove(model)`` deletes it, and
hooks, ``state_dict`` and ``save_pretrained`` are unaffected.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastvlm import _dispatch
from fastvlm.ops.scatter import check_token_count, scatter_image_features

OP = "fastvlm.handoff"
_MARK = "_fastvlm_handoff"
_IMAGE_KWARGS = ("vision_feature_layer", "vision_feature_select_strategy")


@dataclass(frozen=True)
class HandoffRecipe:
    family: str
    cls: str  # the inner model class (the one whose forward does the masked_scatter)
    positional: tuple = ()  # forward arguments passed positionally to get_image_features, after pixel_values
    keywords: tuple = _IMAGE_KWARGS  # forward arguments passed by keyword
    return_dict: bool = True  # the forward passes return_dict=True
    pass_kwargs: bool = False  # the forward passes its **kwargs on to get_image_features
    concat: bool = False  # pooler_output is a list of per-image tensors that the forward concatenates
    config_defaults: tuple = ()  # keyword arguments the forward fills from the config when None
    needs_none: tuple = ()  # forward arguments that must be None (e.g. videos) for the hand-off to apply
    nonempty_pixels: bool = False  # the forward skips the image branch when pixel_values has no images


RECIPES = (
    HandoffRecipe("llava", "LlavaModel", keywords=_IMAGE_KWARGS + ("image_sizes",), pass_kwargs=True, concat=True),
    HandoffRecipe("llava_next", "LlavaNextModel", positional=("image_sizes",), concat=True, nonempty_pixels=True),
    HandoffRecipe("llava_next_video", "LlavaNextVideoModel", positional=("image_sizes",), concat=True,
                  needs_none=("pixel_values_videos",)),
    HandoffRecipe("llava_onevision", "LlavaOnevisionModel", positional=("image_sizes",),
                  keywords=_IMAGE_KWARGS + ("batch_num_images",), concat=True, needs_none=("pixel_values_videos",)),
    HandoffRecipe("vipllava", "VipLlavaModel", keywords=("vision_feature_layer",), return_dict=False,
                  config_defaults=("vision_feature_layer",)),
    HandoffRecipe("fast_vlm", "FastVlmModel"),
    HandoffRecipe("mistral3", "Mistral3Model", keywords=("vision_feature_layer", "image_sizes"), concat=True),
    HandoffRecipe("aya_vision", "AyaVisionModel"),
    HandoffRecipe("cohere2_vision", "Cohere2VisionModel", keywords=()),
    HandoffRecipe("internvl", "InternVLModel"),
)

NOT_EXACT = {
    "Qwen2VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Qwen2_5_VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Qwen3VLModel": "input_ids also give the rope positions (get_rope_index)",
    "Gemma3Model": "input_ids also build the bidirectional image-token attention mask",
    "PaliGemmaModel": "input_ids also build the prefix attention mask",
    "Idefics2Model": "merges with its own inputs_merger",
    "Idefics3Model": "merges with its own inputs_merger",
    "SmolVLMModel": "merges with its own inputs_merger",
    "Blip2Model": "the Q-Former output goes through language_projection before the merge",
    "Llama4Model": "reads the vision outputs in a version-specific way",
}


def recipe_for(module):
    name = type(module).__name__
    if not type(module).__module__.startswith("transformers."):
        return None
    return next((r for r in RECIPES if r.cls == name), None)


def _image_token_id(config):
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(config, attr, None)
        if value is not None:
            return value
    return None


def _as_keywords(fn, self, args, kwargs):
    bound = inspect.signature(fn).bind(self, *args, **kwargs)
    out = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("extra positional arguments")
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def _fallback(self, forward, why, args, kwargs):
    _dispatch.report_fallback(OP, (why,), type(self).__name__, explicit=True)
    return forward(*args, **kwargs)


def _handoff_forward(self, *args, **kwargs):
    recipe = self.__dict__[_MARK]
    forward = functools.partial(type(self).forward, self)
    if args:  # name every argument, as the forward's signature does
        try:
            kwargs = _as_keywords(type(self).forward, self, args, kwargs)
        except TypeError as exc:
            return _fallback(self, forward, f"arguments do not bind to the forward's signature ({exc})", args, kwargs)
    input_ids = kwargs.get("input_ids")
    pixels = kwargs.get("pixel_values")
    token_id = _image_token_id(self.config)
    why = None
    if pixels is None:
        why = "no pixel_values"
    elif input_ids is None:
        why = "no input_ids (inputs_embeds given)"
    elif kwargs.get("inputs_embeds") is not None or kwargs.get("mm_encoder_outputs") is not None:
        why = "inputs_embeds or mm_encoder_outputs given"
    elif any(kwargs.get(name) is not None for name in recipe.needs_none):
        why = " / ".join(recipe.needs_none) + " given"
    elif recipe.nonempty_pixels and pixels.size(0) == 0:
        why = "pixel_values has no images"
    elif token_id is None:
        why = "config has no image_token_id"
    elif kwargs.get("return_dict") is False or (kwargs.get("return_dict") is None
                                                 and getattr(self.config, "return_dict", True) is False):
        why = "return_dict=False (tuple output)"
    if why is not None:
        return _fallback(self, forward, why, (), kwargs)

    rest = dict(kwargs)
    call_kw = {}
    for name in recipe.keywords:
        value = rest.pop(name, None)
        if value is None and name in recipe.config_defaults:
            value = getattr(self.config, name)
        call_kw[name] = value
    positional = [rest.pop(name, None) for name in recipe.positional]
    if recipe.return_dict:
        call_kw["return_dict"] = True
    known = set(inspect.signature(type(self).forward).parameters)
    extra = {k: v for k, v in rest.items() if k not in known}  # the forward's **kwargs bucket
    if recipe.pass_kwargs:
        call_kw.update(extra)
    for name in ("input_ids", "pixel_values", "inputs_embeds", "mm_encoder_outputs"):
        rest.pop(name, None)

    inputs_embeds = self.get_input_embeddings()(input_ids)
    image_outputs = self.get_image_features(pixels, *positional, **call_kw)
    features = image_outputs.pooler_output
    if recipe.concat:
        features = torch.cat(features, dim=0)
    features = features.to(inputs_embeds.device, inputs_embeds.dtype)
    # the image-token count is checked after the language model's launches are queued (no synchronisation in the
    # connector path); a mismatch meanwhile gives NaN rows, never a read past the features, and then the same
    # ValueError as transformers. Not read while a CUDA graph is captured or under torch.compile.
    inputs_embeds, n_tokens = scatter_image_features(inputs_embeds, input_ids == token_id, features, check="lazy")
    if _dispatch.tracing():
        _dispatch._record(_dispatch.OpRecord(OP, "fastvlm", (), f"{type(self).__name__} rows{tuple(features.shape)}"))
    out = forward(input_ids=None, inputs_embeds=inputs_embeds, pixel_values=None, **rest)
    if not _no_host_reads():
        check_token_count(n_tokens, features.numel() // max(features.shape[-1], 1))  # feature rows
    out.image_outputs = image_outputs
    return out


def _no_host_reads():
    """True while a CUDA graph is being captured or torch.compile traces (a host read is not allowed there)."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def install(model: nn.Module, selected=lambda family: True):
    """Give every supported inner model of ``model`` the hand-off forward. Returns report rows
    (path, class, status, detail) for the inner models found, including those left as they are and why."""
    rows = []
    for name, mod in model.named_modules():
        recipe = recipe_for(mod)
        cls = type(mod).__name__
        if recipe is None:
            if cls in NOT_EXACT and type(mod).__module__.startswith("transformers."):
                rows.append((name, cls, "not swapped", "hand-off: " + NOT_EXACT[cls]))
            continue
        if _MARK in mod.__dict__:
            rows.append((name, cls, "already fused", "hand-off"))
            continue
        if not selected(recipe.family) and not selected("handoff"):
            rows.append((name, cls, "skipped", "not in ops"))
            continue
        mod.__dict__[_MARK] = recipe
        mod.forward = _handoff_forward.__get__(mod)
        rows.append((name, cls, "patched", "hand-off: features scattered into inputs_embeds by fastvlm"))
    return rows


def remove(model: nn.Module) -> int:
    """Delete the hand-off forward from every inner model of ``model``; returns how many were removed."""
    n = 0
    for mod in model.modules():
        if mod.__dict__.pop(_MARK, None) is not None:
            mod.__dict__.pop("forward", None)
            n += 1
    return n


def is_installed(module: nn.Module) -> bool:
    return _MARK in module.__dict__
